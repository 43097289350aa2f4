//! JavaScript bindings of the non-GEMM kernels (names are camelCase in JS). Every function takes
//! its outputs as preallocated typed arrays and writes them in place; sizes are checked and a
//! mismatch throws. An input that is also an output must be passed as two distinct arrays.

use super::{attention, elementwise, moe, nn, optim};
use napi::bindgen_prelude::*;
// Output arrays arrive as `*ArraySlice` views of the caller's typed arrays; `as_mut` is sound here
// because JavaScript is blocked for the duration of the call and the TypeScript side never passes
// one array both as an output and as another argument.
use napi_derive::napi;

fn js<T>(r: std::result::Result<T, String>) -> Result<T> {
    r.map_err(|e| Error::new(Status::InvalidArg, e))
}

/// Errors when the bytes of an output overlap those of an input.
fn no_alias<T, U>(out: &[T], input: &[U], what: &str) -> Result<()> {
    if out.is_empty() || input.is_empty() {
        return Ok(());
    }
    let (o0, o1) = (
        out.as_ptr() as usize,
        out.as_ptr() as usize + std::mem::size_of_val(out),
    );
    let (i0, i1) = (
        input.as_ptr() as usize,
        input.as_ptr() as usize + std::mem::size_of_val(input),
    );
    if o0 < i1 && i0 < o1 {
        return Err(Error::new(
            Status::InvalidArg,
            format!("{what}: an output shares memory with an input"),
        ));
    }
    Ok(())
}

fn same_len(op: &str, a: usize, b: usize) -> Result<()> {
    if a == b {
        Ok(())
    } else {
        Err(Error::new(
            Status::InvalidArg,
            format!("{op}: sizes {a} and {b} differ"),
        ))
    }
}

/// out = a + b.
#[napi]
pub fn add_f32(a: &[f32], b: &[f32], mut out: Float32ArraySlice) -> Result<()> {
    let out = unsafe { out.as_mut() };
    same_len("add", a.len(), b.len())?;
    same_len("add", a.len(), out.len())?;
    elementwise::add(a, b, out);
    Ok(())
}

/// dst += alpha * src (in place).
#[napi]
pub fn add_into_f32(mut dst: Float32ArraySlice, src: &[f32], alpha: f64) -> Result<()> {
    let dst = unsafe { dst.as_mut() };
    no_alias(dst, src, "addInto")?;
    same_len("addInto", dst.len(), src.len())?;
    super::util::prefault_for_write(dst);
    elementwise::add_into(dst, src, alpha);
    Ok(())
}

/// out = a * s.
#[napi]
pub fn scale_f32(a: &[f32], s: f64, mut out: Float32ArraySlice) -> Result<()> {
    let out = unsafe { out.as_mut() };
    same_len("scale", a.len(), out.len())?;
    elementwise::scale(a, s, out);
    Ok(())
}

/// Sum of all elements (f64 accumulation, deterministic).
#[napi]
pub fn sum_f32(x: &[f32]) -> f64 {
    elementwise::sum(x)
}

/// f32 to BF16 bits (RNE, NaN to 0x7fff).
#[napi]
pub fn cast_f32_to_bf16(x: &[f32], mut out: Uint16ArraySlice) -> Result<()> {
    let out = unsafe { out.as_mut() };
    same_len("cast", x.len(), out.len())?;
    elementwise::cast_to_bf16(x, out);
    Ok(())
}

/// BF16 bits to f32.
#[napi]
pub fn cast_bf16_to_f32(x: &[u16], mut out: Float32ArraySlice) -> Result<()> {
    let out = unsafe { out.as_mut() };
    same_len("cast", x.len(), out.len())?;
    elementwise::cast_to_f32(x, out);
    Ok(())
}

/// RMSNorm of [rows, cols]: y and rstd [rows].
#[napi]
pub fn rmsnorm(
    x: &[f32],
    w: &[f32],
    rows: u32,
    cols: u32,
    eps: f64,
    mut y: Float32ArraySlice,
    mut rstd: Float32ArraySlice,
) -> Result<()> {
    let y = unsafe { y.as_mut() };
    let rstd = unsafe { rstd.as_mut() };
    js(nn::rmsnorm(
        x,
        w,
        rows as usize,
        cols as usize,
        eps,
        y,
        rstd,
    ))
}

/// RMSNorm backward: dx [rows, cols] and dw [cols].
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    rows: u32,
    cols: u32,
    mut dx: Float32ArraySlice,
    mut dw: Float32ArraySlice,
) -> Result<()> {
    let dx = unsafe { dx.as_mut() };
    let dw = unsafe { dw.as_mut() };
    js(nn::rmsnorm_backward(
        dy,
        x,
        w,
        rstd,
        rows as usize,
        cols as usize,
        dx,
        dw,
    ))
}

/// RoPE on [rows, heads * width] (see RopeOptions); y is written in full.
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn rope(
    x: &[f32],
    rows: u32,
    heads: u32,
    width: u32,
    offset: u32,
    dim: u32,
    seq_len: u32,
    theta: f64,
    inverse: bool,
    mut y: Float32ArraySlice,
) -> Result<()> {
    let y = unsafe { y.as_mut() };
    js(nn::rope(
        x,
        rows as usize,
        heads as usize,
        width as usize,
        offset as usize,
        dim as usize,
        seq_len as usize,
        theta,
        inverse,
        y,
    ))
}

/// y = x[:, h, start:start+len] per head (or summed over heads).
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn head_slice(
    x: &[f32],
    rows: u32,
    heads: u32,
    width: u32,
    start: u32,
    len: u32,
    sum_heads: bool,
    mut y: Float32ArraySlice,
) -> Result<()> {
    let y = unsafe { y.as_mut() };
    js(nn::head_slice(
        x,
        rows as usize,
        heads as usize,
        width as usize,
        start as usize,
        len as usize,
        sum_heads,
        y,
    ))
}

/// dst[:, h, start:start+len] += src (in place).
#[napi]
pub fn head_scatter_add(
    mut dst: Float32ArraySlice,
    src: &[f32],
    rows: u32,
    heads: u32,
    width: u32,
    start: u32,
    len: u32,
) -> Result<()> {
    let dst = unsafe { dst.as_mut() };
    no_alias(dst, src, "headScatterAdd")?;
    super::util::prefault_for_write(dst);
    js(nn::head_scatter_add(
        dst,
        src,
        rows as usize,
        heads as usize,
        width as usize,
        start as usize,
        len as usize,
    ))
}

/// Per head [a_h | b_h] (b with bHeads = heads or 1).
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn head_concat(
    a: &[f32],
    b: &[f32],
    rows: u32,
    heads: u32,
    la: u32,
    lb: u32,
    b_heads: u32,
    mut y: Float32ArraySlice,
) -> Result<()> {
    let y = unsafe { y.as_mut() };
    js(nn::head_concat(
        a,
        b,
        rows as usize,
        heads as usize,
        la as usize,
        lb as usize,
        b_heads as usize,
        y,
    ))
}

fn dims(
    batch: u32,
    seq: u32,
    heads: u32,
    dqk: u32,
    dv: u32,
    scale: f64,
    precision: String,
) -> Result<attention::Dims> {
    let lowp = match precision.as_str() {
        "f32" => false,
        "bf16" => true,
        p => {
            return Err(Error::new(
                Status::InvalidArg,
                format!("attention: precision \"{p}\" (allowed: f32, bf16)"),
            ))
        }
    };
    Ok(attention::Dims {
        b: batch as usize,
        t: seq as usize,
        h: heads as usize,
        dqk: dqk as usize,
        dv: dv as usize,
        scale: scale as f32,
        lowp,
    })
}

/// Causal attention forward: o [B*T, H*dv] and lse [B*H*T]. precision "f32" | "bf16".
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batch: u32,
    seq: u32,
    heads: u32,
    dqk: u32,
    dv: u32,
    scale: f64,
    precision: String,
    mut o: Float32ArraySlice,
    mut lse: Float32ArraySlice,
) -> Result<()> {
    let o = unsafe { o.as_mut() };
    let lse = unsafe { lse.as_mut() };
    let d = dims(batch, seq, heads, dqk, dv, scale, precision)?;
    js(attention::attention_forward(q, k, v, d, o, lse))
}

/// Causal attention backward: dq, dk, dv from dO, o and lse.
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    d_o: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    batch: u32,
    seq: u32,
    heads: u32,
    dqk: u32,
    dv: u32,
    scale: f64,
    precision: String,
    mut dq: Float32ArraySlice,
    mut dk: Float32ArraySlice,
    mut dv_out: Float32ArraySlice,
) -> Result<()> {
    let dq = unsafe { dq.as_mut() };
    let dk = unsafe { dk.as_mut() };
    let dv_out = unsafe { dv_out.as_mut() };
    let d = dims(batch, seq, heads, dqk, dv, scale, precision)?;
    js(attention::attention_backward(
        d_o, q, k, v, o, lse, d, dq, dk, dv_out,
    ))
}

/// h = silu(g) * u.
#[napi]
pub fn swiglu(g: &[f32], u: &[f32], mut h: Float32ArraySlice) -> Result<()> {
    let h = unsafe { h.as_mut() };
    js(nn::swiglu(g, u, h))
}

/// dg, du of h = silu(g) * u.
#[napi]
pub fn swiglu_backward(
    dh: &[f32],
    g: &[f32],
    u: &[f32],
    mut dg: Float32ArraySlice,
    mut du: Float32ArraySlice,
) -> Result<()> {
    let dg = unsafe { dg.as_mut() };
    let du = unsafe { du.as_mut() };
    js(nn::swiglu_backward(dh, g, u, dg, du))
}

/// out[n] = w[ids[n]] for w [vocab, d].
#[napi]
pub fn embedding(
    w: &[f32],
    vocab: u32,
    d: u32,
    ids: &[i32],
    mut out: Float32ArraySlice,
) -> Result<()> {
    let out = unsafe { out.as_mut() };
    js(nn::embedding(w, vocab as usize, d as usize, ids, out))
}

/// dw[ids[n]] += dy[n] (deterministic, in token order per row).
#[napi]
pub fn embedding_backward(
    mut dw: Float32ArraySlice,
    vocab: u32,
    d: u32,
    dy: &[f32],
    ids: &[i32],
) -> Result<()> {
    let dw = unsafe { dw.as_mut() };
    no_alias(dw, dy, "embeddingBackward")?;
    super::util::prefault_for_write(dw);
    js(nn::embedding_backward(
        dw,
        vocab as usize,
        d as usize,
        dy,
        ids,
    ))
}

/// Router: scores [N, E], topIdx [N, k], weights [N, k].
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn router(
    logits: &[f32],
    bias: &[f32],
    n: u32,
    e: u32,
    k: u32,
    scaling: f64,
    mut scores: Float32ArraySlice,
    mut top_idx: Int32ArraySlice,
    mut weights: Float32ArraySlice,
) -> Result<()> {
    let scores = unsafe { scores.as_mut() };
    let top_idx = unsafe { top_idx.as_mut() };
    let weights = unsafe { weights.as_mut() };
    if k == 0 {
        return Err(Error::new(
            Status::InvalidArg,
            "router: k must be at least 1".to_string(),
        ));
    }
    js(moe::router(
        logits, bias, n as usize, e as usize, k as usize, scaling, scores, top_idx, weights,
    ))
}

/// d(logits) [N, E]; `dscores` empty when absent.
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn router_backward(
    dweights: &[f32],
    scores: &[f32],
    top_idx: &[i32],
    n: u32,
    e: u32,
    k: u32,
    scaling: f64,
    dscores: &[f32],
    mut dlogits: Float32ArraySlice,
) -> Result<()> {
    let dlogits = unsafe { dlogits.as_mut() };
    js(moe::router_backward(
        dweights, scores, top_idx, n as usize, e as usize, k as usize, scaling, dscores, dlogits,
    ))
}

/// Balance loss (returned) and d(loss)/d(scores) written into `dscores`.
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn balance_loss(
    scores: &[f32],
    top_idx: &[i32],
    batch: u32,
    seq: u32,
    e: u32,
    k: u32,
    alpha: f64,
    mut dscores: Float32ArraySlice,
) -> Result<f64> {
    let dscores = unsafe { dscores.as_mut() };
    js(moe::balance_loss(
        scores,
        top_idx,
        batch as usize,
        seq as usize,
        e as usize,
        k as usize,
        alpha,
        dscores,
    ))
}

/// Permute token rows by expert: xs [N*k, d], slot [N*k], offsets [E+1].
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn moe_permute(
    x: &[f32],
    d: u32,
    top_idx: &[i32],
    n: u32,
    k: u32,
    experts: u32,
    mut xs: Float32ArraySlice,
    mut slot: Int32ArraySlice,
    mut offsets: Int32ArraySlice,
) -> Result<()> {
    let xs = unsafe { xs.as_mut() };
    let slot = unsafe { slot.as_mut() };
    let offsets = unsafe { offsets.as_mut() };
    js(moe::permute(
        x,
        d as usize,
        top_idx,
        n as usize,
        k as usize,
        experts as usize,
        xs,
        slot,
        offsets,
    ))
}

/// dx [N, d] from d(xs).
#[napi]
pub fn moe_permute_backward(
    dxs: &[f32],
    slot: &[i32],
    tokens: u32,
    d: u32,
    mut dx: Float32ArraySlice,
) -> Result<()> {
    let dx = unsafe { dx.as_mut() };
    js(moe::permute_backward(
        dxs,
        slot,
        tokens as usize,
        d as usize,
        dx,
    ))
}

/// y [N, d] = weighted sum of each token's expert outputs.
#[napi]
pub fn moe_combine(
    ys: &[f32],
    slot: &[i32],
    weights: &[f32],
    n: u32,
    d: u32,
    mut y: Float32ArraySlice,
) -> Result<()> {
    let y = unsafe { y.as_mut() };
    js(moe::combine(ys, slot, weights, n as usize, d as usize, y))
}

/// d(ys) and d(weights) of moeCombine.
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn moe_combine_backward(
    dy: &[f32],
    ys: &[f32],
    slot: &[i32],
    weights: &[f32],
    n: u32,
    d: u32,
    mut dys: Float32ArraySlice,
    mut dweights: Float32ArraySlice,
) -> Result<()> {
    let dys = unsafe { dys.as_mut() };
    let dweights = unsafe { dweights.as_mut() };
    js(moe::combine_backward(
        dy, ys, slot, weights, n as usize, d as usize, dys, dweights,
    ))
}

/// bias += gamma * sign(mean load - load), in place.
#[napi]
pub fn bias_update(mut bias: Float32ArraySlice, offsets: &[i32], gamma: f64) -> Result<()> {
    let bias = unsafe { bias.as_mut() };
    js(moe::bias_update(bias, offsets, gamma))
}

/// Mean cross-entropy (returned) and dlogits (written).
#[napi]
pub fn cross_entropy(
    logits: &[f32],
    targets: &[i32],
    n: u32,
    v: u32,
    grad_scale: f64,
    mut dlogits: Float32ArraySlice,
) -> Result<f64> {
    let dlogits = unsafe { dlogits.as_mut() };
    js(moe::cross_entropy(
        logits, targets, n as usize, v as usize, grad_scale, dlogits,
    ))
}

/// [norm, scale] of global-norm clipping over all `grads`.
#[napi]
pub fn clip_scale(grads: Vec<Float32Array>, max_norm: f64) -> Vec<f64> {
    let slices: Vec<&[f32]> = grads.iter().map(|g| g.as_ref()).collect();
    let (n, s) = optim::clip_scale(&slices, max_norm);
    vec![n, s]
}

/// AdamW in place. Each moment is given as f32 (`mF32`) or BF16 bits (`mBf16`); pass an empty
/// array for the storage not used.
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    mut p: Float32ArraySlice,
    g: &[f32],
    mut m_f32: Float32ArraySlice,
    mut m_bf16: Uint16ArraySlice,
    mut v_f32: Float32ArraySlice,
    mut v_bf16: Uint16ArraySlice,
    grad_scale: f64,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    step: f64,
) -> Result<()> {
    let p = unsafe { p.as_mut() };
    let m_f32 = unsafe { m_f32.as_mut() };
    let m_bf16 = unsafe { m_bf16.as_mut() };
    let v_f32 = unsafe { v_f32.as_mut() };
    let v_bf16 = unsafe { v_bf16.as_mut() };
    for (what, o) in [("p", &*p as &[f32]), ("m", &*m_f32), ("v", &*v_f32)] {
        no_alias(o, g, &format!("adamw ({what} and g)"))?;
    }
    no_alias(m_bf16, v_bf16, "adamw (m and v)")?;
    no_alias(m_f32, v_f32, "adamw (m and v)")?;
    no_alias(p, m_f32, "adamw (p and m)")?;
    no_alias(p, v_f32, "adamw (p and v)")?;
    let m = if m_bf16.is_empty() {
        optim::Moment::F32(m_f32)
    } else {
        optim::Moment::Bf16(m_bf16)
    };
    let v = if v_bf16.is_empty() {
        optim::Moment::F32(v_f32)
    } else {
        optim::Moment::Bf16(v_bf16)
    };
    let o = optim::AdamW {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        step,
        grad_scale,
    };
    js(optim::adamw(p, g, m, v, o))
}

/// Dequantises FP8 codes with their scales (see quantizeFp8 for the layouts): out = decode(q) * s.
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn dequantize_fp8(
    data: &[u8],
    scales: &[f32],
    rows: u32,
    cols: u32,
    batch: u32,
    group: String,
    format: String,
    mut out: Float32ArraySlice,
    segments: Option<&[i32]>,
) -> Result<()> {
    let out = unsafe { out.as_mut() };
    let g = js(crate::cpu::quant::Group::parse(&group))?;
    let f = js(crate::cpu::fp8::Fp8Format::parse(&format))?;
    js(super::dequant::dequantize(
        data,
        scales,
        rows as usize,
        cols as usize,
        batch as usize,
        g,
        f,
        segments,
        out,
    ))
}

/// FP8 overflow/underflow counts of a quantisation (see ops::dequant::flow_counts), written to out[0..2].
#[napi]
pub fn fp8_flow(
    x: &[f32],
    codes: &[u8],
    deq: &[f32],
    format: String,
    mut out: Float32ArraySlice,
) -> Result<()> {
    let out = unsafe { out.as_mut() };
    let f = js(crate::cpu::fp8::Fp8Format::parse(&format))?;
    let [o, u] = js(super::dequant::flow_counts(x, codes, deq, f))?;
    out[0] = o as f32;
    out[1] = u as f32;
    Ok(())
}
