//! napi bindings of the CPU kernels. Typed arrays arrive as slices that borrow the JS memory (no
//! copies); outputs are preallocated by the caller and written in place. Because an output slice
//! is `&mut`, it must not overlap an input: that is checked (same memory passed twice is an error),
//! except for `bf16Round`, which supports rounding in place.

use super::fp8::{bf16_round as round1, decode_slice, encode_slice, Fp8Format};
use super::gemm::{gemm_f32 as core_f32, gemm_fp8 as core_fp8, Fp8Mat};
use super::grouped::{grouped_gemm_f32 as core_gf32, grouped_gemm_fp8 as core_gfp8, Segment};
use super::quant::{quantize, Group, ScaleMode};
use napi::bindgen_prelude::{Float32ArraySlice, Uint8ArraySlice};
use napi::{Error, Result, Status};
use napi_derive::napi;
use rayon::prelude::*;

fn err(msg: String) -> Error {
    Error::new(Status::InvalidArg, msg)
}

/// Errors when the bytes of `out` overlap those of `input`.
fn no_alias<T, U>(out: &[T], input: &[U], what: &str) -> Result<()> {
    let (o0, o1) = (
        out.as_ptr() as usize,
        out.as_ptr() as usize + std::mem::size_of_val(out),
    );
    let (i0, i1) = (
        input.as_ptr() as usize,
        input.as_ptr() as usize + std::mem::size_of_val(input),
    );
    if o0 < i1 && i0 < o1 {
        return Err(err(format!(
            "{what}: the output shares memory with an input"
        )));
    }
    Ok(())
}

fn fmt(s: &str) -> Result<Fp8Format> {
    Fp8Format::parse(s).map_err(err)
}

fn fp8_mat<'a>(q: &'a [u8], scales: &'a [f32], group: &str, format: &str) -> Result<Fp8Mat<'a>> {
    Ok(Fp8Mat {
        q,
        scales,
        group: Group::parse(group).map_err(err)?,
        format: fmt(format)?,
    })
}

/// C[M,N] (row-major) = op(A) op(B) (+ C when accumulate); f32 accumulation. A is stored [M,K]
/// ([K,M] when transA), B [K,N] ([N,K] when transB). inputsBf16 rounds the operands to BF16 first
/// (the BF16 GEMM); outputBf16 rounds the final C to BF16.
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn gemm_f32(
    a: &[f32],
    b: &[f32],
    mut c: Float32ArraySlice,
    m: u32,
    n: u32,
    k: u32,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
    inputs_bf16: bool,
    output_bf16: bool,
) -> Result<()> {
    let c = unsafe { c.as_mut() };
    if accumulate {
        crate::ops::util::prefault_for_write(c);
    }
    no_alias(c, a, "gemmF32")?;
    no_alias(c, b, "gemmF32")?;
    core_f32(
        a,
        b,
        c,
        m as usize,
        n as usize,
        k as usize,
        trans_a,
        trans_b,
        accumulate,
        inputs_bf16,
        output_bf16,
    )
    .map_err(err)
}

/// FP8 GEMM with fine-grained scales and promotion to f32 every `promotion` (default 128) elements
/// of K. Groups: "tile" | "block" | "column-tile" | "row" | "tensor" of the stored matrix; formats
/// "e4m3" | "e5m2". Layouts whose scale changes inside a promotion chunk are rejected.
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn gemm_fp8(
    a: &[u8],
    a_scales: &[f32],
    a_group: String,
    a_format: String,
    b: &[u8],
    b_scales: &[f32],
    b_group: String,
    b_format: String,
    mut c: Float32ArraySlice,
    m: u32,
    n: u32,
    k: u32,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
    output_bf16: bool,
    promotion: Option<u32>,
) -> Result<()> {
    let c = unsafe { c.as_mut() };
    if accumulate {
        crate::ops::util::prefault_for_write(c);
    }
    for (x, w) in [(a_scales, "aScales"), (b_scales, "bScales")] {
        no_alias(c, x, w)?;
    }
    no_alias(c, a, "gemmFp8")?;
    no_alias(c, b, "gemmFp8")?;
    let (am, bm) = (
        fp8_mat(a, a_scales, &a_group, &a_format)?,
        fp8_mat(b, b_scales, &b_group, &b_format)?,
    );
    core_fp8(
        am,
        bm,
        c,
        m as usize,
        n as usize,
        k as usize,
        trans_a,
        trans_b,
        accumulate,
        output_bf16,
        promotion.unwrap_or(128) as usize,
    )
    .map_err(err)
}

/// Per-expert GEMM (see grouped.rs): offsets has E+1 entries; segment "m" splits the rows of A and
/// C (B holds E matrices), segment "k" splits the reduction (C holds E matrices [M,N]).
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm_f32(
    a: &[f32],
    b: &[f32],
    mut c: Float32ArraySlice,
    offsets: &[i32],
    segment: String,
    m: u32,
    n: u32,
    k: u32,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
    inputs_bf16: bool,
    output_bf16: bool,
) -> Result<()> {
    let c = unsafe { c.as_mut() };
    if accumulate {
        crate::ops::util::prefault_for_write(c);
    }
    no_alias(c, a, "groupedGemmF32")?;
    no_alias(c, b, "groupedGemmF32")?;
    let seg = Segment::parse(&segment).map_err(err)?;
    core_gf32(
        a,
        b,
        c,
        offsets,
        seg,
        m as usize,
        n as usize,
        k as usize,
        trans_a,
        trans_b,
        accumulate,
        inputs_bf16,
        output_bf16,
    )
    .map_err(err)
}

/// Per-expert FP8 GEMM. Segment "m": A [M_total,K] quantised as one matrix, B E matrices with
/// their scales back to back. Segment "k": both operands column-tile quantised with
/// `segments = offsets` (quantizeFp8), so promotion chunks start at each segment start.
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm_fp8(
    a: &[u8],
    a_scales: &[f32],
    a_group: String,
    a_format: String,
    b: &[u8],
    b_scales: &[f32],
    b_group: String,
    b_format: String,
    mut c: Float32ArraySlice,
    offsets: &[i32],
    segment: String,
    m: u32,
    n: u32,
    k: u32,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
    output_bf16: bool,
    promotion: Option<u32>,
) -> Result<()> {
    let c = unsafe { c.as_mut() };
    if accumulate {
        crate::ops::util::prefault_for_write(c);
    }
    for (x, w) in [(a_scales, "aScales"), (b_scales, "bScales")] {
        no_alias(c, x, w)?;
    }
    no_alias(c, a, "groupedGemmFp8")?;
    no_alias(c, b, "groupedGemmFp8")?;
    let seg = Segment::parse(&segment).map_err(err)?;
    let (am, bm) = (
        fp8_mat(a, a_scales, &a_group, &a_format)?,
        fp8_mat(b, b_scales, &b_group, &b_format)?,
    );
    core_gfp8(
        am,
        bm,
        c,
        offsets,
        seg,
        m as usize,
        n as usize,
        k as usize,
        trans_a,
        trans_b,
        accumulate,
        output_bf16,
        promotion.unwrap_or(128) as usize,
    )
    .map_err(err)
}

/// Quantises `batch` row-major matrices of rows x cols into FP8 codes (`data`, same layout as x)
/// and scales (the group's layout, per matrix back to back), bit-exact with @moe8/fp8-core.
/// pow2: power-of-two scales; unit: scale 1 (unscaled control). segments (column-tile only): E+1
/// row offsets; 128-row groups restart at each segment, scales [sum_e ceil(len_e/128), cols].
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn quantize_fp8(
    x: &[f32],
    rows: u32,
    cols: u32,
    batch: u32,
    group: String,
    format: String,
    pow2: bool,
    unit: bool,
    eps: f64,
    mut data: Uint8ArraySlice,
    mut scales: Float32ArraySlice,
    segments: Option<&[i32]>,
) -> Result<()> {
    let (data, scales) = unsafe { (data.as_mut(), scales.as_mut()) };
    no_alias(data, x, "quantizeFp8")?;
    no_alias(scales, x, "quantizeFp8")?;
    no_alias(scales, data, "quantizeFp8")?;
    let mode = if unit {
        ScaleMode::Unit
    } else if pow2 {
        ScaleMode::Pow2 { eps: eps as f32 }
    } else {
        ScaleMode::Amax { eps: eps as f32 }
    };
    let g = Group::parse(&group).map_err(err)?;
    quantize(
        x,
        rows as usize,
        cols as usize,
        batch as usize,
        g,
        fmt(&format)?,
        mode,
        data,
        scales,
        segments,
    )
    .map_err(err)
}

/// Encodes f32 to FP8 codes (RNE, saturating, NaN -> 0x7f), no scaling.
#[napi]
pub fn fp8_encode(x: &[f32], format: String, mut out: Uint8ArraySlice) -> Result<()> {
    let out = unsafe { out.as_mut() };
    no_alias(out, x, "fp8Encode")?;
    let f = fmt(&format)?;
    let n = x.len().min(out.len());
    out[..n]
        .par_chunks_mut(1 << 14)
        .zip(x[..n].par_chunks(1 << 14))
        .for_each(|(o, x)| encode_slice(x, f, o));
    Ok(())
}

/// Decodes FP8 codes to f32 (exact), no scaling.
#[napi]
pub fn fp8_decode(q: &[u8], format: String, mut out: Float32ArraySlice) -> Result<()> {
    let out = unsafe { out.as_mut() };
    no_alias(out, q, "fp8Decode")?;
    let f = fmt(&format)?;
    let n = q.len().min(out.len());
    out[..n]
        .par_chunks_mut(1 << 14)
        .zip(q[..n].par_chunks(1 << 14))
        .for_each(|(o, q)| decode_slice(q, f, o));
    Ok(())
}

/// Rounds to BF16 (RNE, inf kept, NaN -> 0x7fff). `out` may be `x` itself (in place).
#[napi]
pub fn bf16_round(x: Float32ArraySlice, mut out: Float32ArraySlice) -> Result<()> {
    let (xp, xl) = (x.as_ptr(), x.len());
    let o = unsafe { out.as_mut() };
    let n = xl.min(o.len());
    if xp == o.as_ptr() {
        o[..n]
            .par_chunks_mut(1 << 14)
            .for_each(|o| o.iter_mut().for_each(|v| *v = round1(*v)));
        return Ok(());
    }
    // Distinct arrays: only the shared view of x is ever formed.
    let xs = unsafe { std::slice::from_raw_parts(xp, xl) };
    no_alias(o, xs, "bf16Round")?;
    o[..n]
        .par_chunks_mut(1 << 14)
        .zip(xs[..n].par_chunks(1 << 14))
        .for_each(|(o, x)| {
            o.iter_mut().zip(x).for_each(|(o, &v)| *o = round1(v));
        });
    Ok(())
}

/// Median wall time (ms) of `reps` GEMMs of the given precision ("fp32" | "f32", "bf16", "fp8")
/// on random inputs it allocates itself, after warm-up. FP8 uses the recipe's layouts: A tile
/// 1x128 (column-tile when transA), B block 128x128, E4M3, promotion 128; quantisation is not timed.
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn bench_gemm(
    precision: String,
    m: u32,
    n: u32,
    k: u32,
    trans_a: bool,
    trans_b: bool,
    reps: u32,
) -> Result<f64> {
    super::bench::bench_gemm(
        &precision,
        m as usize,
        n as usize,
        k as usize,
        trans_a,
        trans_b,
        reps.max(1) as usize,
    )
    .map_err(err)
}
