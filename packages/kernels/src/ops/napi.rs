//! JavaScript bindings of the non-GEMM kernels (names are camelCase in JS): elementwise, dense
//! layers, attention and FP8 dequantisation here; routing, dispatch, losses and the optimiser in
//! napi_moe.rs. Every function takes its outputs as preallocated typed arrays and writes them in
//! place; sizes are checked and a mismatch throws. An input that is also an output must be passed
//! as two distinct arrays. Sizes and flags arrive as one options object per call.

use super::{attention, elementwise, nn};
use crate::cpu::napi::JsFp8Layout;
use napi::bindgen_prelude::*;
// Output arrays arrive as `*ArraySlice` views of the caller's typed arrays; `as_mut` is sound here
// because JavaScript is blocked for the duration of the call and the TypeScript side never passes
// one array both as an output and as another argument.
use napi_derive::napi;

pub(super) fn js<T>(r: std::result::Result<T, String>) -> Result<T> {
    r.map_err(|e| Error::new(Status::InvalidArg, e))
}

/// Errors when the bytes of an output overlap those of an input.
pub(super) fn no_alias<T, U>(out: &[T], input: &[U], what: &str) -> Result<()> {
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

/// A row-major matrix's size.
#[napi(object)]
pub struct MatrixShape {
    pub rows: u32,
    pub cols: u32,
}

impl MatrixShape {
    fn shape(&self) -> nn::Shape {
        nn::Shape {
            rows: self.rows as usize,
            cols: self.cols as usize,
        }
    }
}

/// RMSNorm of x [rows, cols]: y and rstd [rows].
#[napi]
pub fn rmsnorm(
    x: &[f32],
    w: &[f32],
    shape: MatrixShape,
    eps: f64,
    mut y: Float32ArraySlice,
    mut rstd: Float32ArraySlice,
) -> Result<()> {
    let y = unsafe { y.as_mut() };
    let rstd = unsafe { rstd.as_mut() };
    js(nn::rmsnorm(x, w, shape.shape(), eps, y, rstd))
}

/// RMSNorm backward: dx [rows, cols] and dw [cols].
#[napi]
pub fn rmsnorm_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    shape: MatrixShape,
    mut dx: Float32ArraySlice,
    mut dw: Float32ArraySlice,
) -> Result<()> {
    let dx = unsafe { dx.as_mut() };
    let dw = unsafe { dw.as_mut() };
    js(nn::rmsnorm_backward(dy, x, w, rstd, shape.shape(), dx, dw))
}

/// RoPE of x [rows, heads * width]: the Backend's RopeOptions and the row count.
#[napi(object)]
pub struct RopeParams {
    pub rows: u32,
    pub heads: u32,
    pub width: u32,
    pub offset: u32,
    pub dim: u32,
    pub seq_len: u32,
    pub start: Option<u32>,
    pub theta: f64,
    pub inverse: Option<bool>,
}

/// RoPE on [rows, heads * width]; y is written in full.
#[napi]
pub fn rope(x: &[f32], p: RopeParams, mut y: Float32ArraySlice) -> Result<()> {
    let y = unsafe { y.as_mut() };
    let r = nn::Rope {
        rows: p.rows as usize,
        heads: p.heads as usize,
        width: p.width as usize,
        offset: p.offset as usize,
        dim: p.dim as usize,
        seq_len: p.seq_len as usize,
        start: p.start.unwrap_or(0) as usize,
        theta: p.theta,
        inverse: p.inverse.unwrap_or(false),
    };
    js(nn::rope(x, &r, y))
}

/// The slice [start, start + len) of every head of a [rows, heads * width] matrix: the Backend's
/// HeadSliceOptions and the row count. sumHeads (headSlice only) sums the slices over heads.
#[napi(object)]
pub struct HeadSliceParams {
    pub rows: u32,
    pub heads: u32,
    pub width: u32,
    pub start: u32,
    pub len: u32,
    pub sum_heads: Option<bool>,
}

impl HeadSliceParams {
    fn range(&self) -> nn::HeadRange {
        nn::HeadRange {
            rows: self.rows as usize,
            heads: self.heads as usize,
            width: self.width as usize,
            start: self.start as usize,
            len: self.len as usize,
        }
    }
}

/// y = x[:, h, start:start+len] per head (or summed over heads).
#[napi]
pub fn head_slice(x: &[f32], p: HeadSliceParams, mut y: Float32ArraySlice) -> Result<()> {
    let y = unsafe { y.as_mut() };
    js(nn::head_slice(
        x,
        &p.range(),
        p.sum_heads.unwrap_or(false),
        y,
    ))
}

/// dst[:, h, start:start+len] += src (in place); sumHeads is not read.
#[napi]
pub fn head_scatter_add(mut dst: Float32ArraySlice, src: &[f32], p: HeadSliceParams) -> Result<()> {
    let dst = unsafe { dst.as_mut() };
    no_alias(dst, src, "headScatterAdd")?;
    super::util::prefault_for_write(dst);
    js(nn::head_scatter_add(dst, src, &p.range()))
}

/// Per head, a's la columns then b's lb; b has bHeads = heads or 1 (shared by every head).
#[napi(object)]
pub struct HeadConcatParams {
    pub rows: u32,
    pub heads: u32,
    pub la: u32,
    pub lb: u32,
    pub b_heads: u32,
}

/// Per head [a_h | b_h] (b with bHeads = heads or 1).
#[napi]
pub fn head_concat(
    a: &[f32],
    b: &[f32],
    p: HeadConcatParams,
    mut y: Float32ArraySlice,
) -> Result<()> {
    let y = unsafe { y.as_mut() };
    let c = nn::HeadConcat {
        rows: p.rows as usize,
        heads: p.heads as usize,
        la: p.la as usize,
        lb: p.lb as usize,
        b_heads: p.b_heads as usize,
    };
    js(nn::head_concat(a, b, &c, y))
}

/// Attention's sizes: q [batch*seq, heads*dqk], o [batch*seq, heads*dv], k [batch*kvSeq,
/// heads*dqk] and v [batch*kvSeq, heads*dv] (kvSeq >= seq, default seq: the queries are the last
/// seq positions); the softmax scale; precision "f32" | "bf16".
#[napi(object)]
pub struct AttentionDims {
    pub batch: u32,
    pub seq: u32,
    pub kv_seq: Option<u32>,
    pub heads: u32,
    pub dqk: u32,
    pub dv: u32,
    pub scale: f64,
    pub precision: String,
}

impl AttentionDims {
    fn dims(&self) -> Result<attention::Dims> {
        let lowp = match self.precision.as_str() {
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
            b: self.batch as usize,
            t: self.seq as usize,
            tk: self.kv_seq.unwrap_or(self.seq) as usize,
            h: self.heads as usize,
            dqk: self.dqk as usize,
            dv: self.dv as usize,
            scale: self.scale as f32,
            lowp,
        })
    }
}

/// An attention input: f32 values, or a bf16 tensor's codes (decoded as the kernel copies its tiles).
fn src<'a>(x: &'a Either<&'a [f32], &'a [u16]>) -> attention::Src<'a> {
    match x {
        Either::A(f) => attention::Src::F32(f),
        Either::B(h) => attention::Src::Bf16(h),
    }
}

/// The same for an array held in an object.
fn src_array(x: &Either<Float32Array, Uint16Array>) -> attention::Src<'_> {
    match x {
        Either::A(f) => attention::Src::F32(f),
        Either::B(h) => attention::Src::Bf16(h),
    }
}

/// Causal attention forward: o [B*T, H*dv] and lse [B*H*T] (k, v [B*Tk, ...]); q, k and v as f32
/// values or BF16 codes.
#[napi]
pub fn attention_forward(
    q: Either<&[f32], &[u16]>,
    k: Either<&[f32], &[u16]>,
    v: Either<&[f32], &[u16]>,
    dims: AttentionDims,
    mut o: Float32ArraySlice,
    mut lse: Float32ArraySlice,
) -> Result<()> {
    let o = unsafe { o.as_mut() };
    let lse = unsafe { lse.as_mut() };
    let d = dims.dims()?;
    js(attention::attention_forward(
        src(&q),
        src(&k),
        src(&v),
        d,
        o,
        lse,
    ))
}

/// What attentionBackward reads of the forward pass: its inputs and its outputs o and lse (q, k, v
/// and o as f32 values or BF16 codes).
#[napi(object, object_to_js = false)]
pub struct AttentionSaved {
    pub q: Either<Float32Array, Uint16Array>,
    pub k: Either<Float32Array, Uint16Array>,
    pub v: Either<Float32Array, Uint16Array>,
    pub o: Either<Float32Array, Uint16Array>,
    pub lse: Float32Array,
}

/// attentionBackward's outputs, written in place (shaped as q, k and v).
#[napi(object, object_to_js = false)]
pub struct AttentionGrads {
    pub dq: Float32Array,
    pub dk: Float32Array,
    pub dv: Float32Array,
}

/// Causal attention backward: dq, dk, dv from dO and what the forward saved.
#[napi]
pub fn attention_backward(
    d_o: Either<&[f32], &[u16]>,
    saved: AttentionSaved,
    dims: AttentionDims,
    mut grads: AttentionGrads,
) -> Result<()> {
    let d = dims.dims()?;
    let fwd = attention::Saved {
        q: src_array(&saved.q),
        k: src_array(&saved.k),
        v: src_array(&saved.v),
        o: src_array(&saved.o),
        lse: &saved.lse,
    };
    let g = unsafe {
        attention::Grads {
            dq: grads.dq.as_mut(),
            dk: grads.dk.as_mut(),
            dv: grads.dv.as_mut(),
        }
    };
    js(attention::attention_backward(src(&d_o), fwd, d, g))
}

/// h = silu(g) * u for each row of gu = [g | u] ([rows, 2 inter]); h is [rows, inter].
#[napi]
pub fn swiglu(gu: &[f32], inter: u32, mut h: Float32ArraySlice) -> Result<()> {
    let h = unsafe { h.as_mut() };
    js(nn::swiglu(gu, inter as usize, h))
}

/// d[g | u] ([rows, 2 inter]) of h = silu(g) * u from dh ([rows, inter]).
#[napi]
pub fn swiglu_backward(
    dh: &[f32],
    gu: &[f32],
    inter: u32,
    mut dgu: Float32ArraySlice,
) -> Result<()> {
    let dgu = unsafe { dgu.as_mut() };
    js(nn::swiglu_backward(dh, gu, inter as usize, dgu))
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

/// Dequantises FP8 codes with their scales (see quantizeFp8 for the layouts): out = decode(q) * s.
#[napi]
pub fn dequantize_fp8(
    data: &[u8],
    scales: &[f32],
    layout: JsFp8Layout,
    mut out: Float32ArraySlice,
    segments: Option<&[i32]>,
) -> Result<()> {
    let out = unsafe { out.as_mut() };
    let l = layout.layout(segments)?;
    js(super::dequant::dequantize(data, scales, &l, out))
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
