//! napi bindings of the CPU kernels. Typed arrays arrive as slices that borrow the JS memory (no
//! copies); outputs are preallocated by the caller and written in place. Because an output slice
//! is `&mut`, it must not overlap an input: that is checked (same memory passed twice is an error),
//! except for `bf16Round`, which supports rounding in place.

use super::fp8::{bf16_round as round1, decode_slice, encode_slice, Fp8Format};
use super::gemm::{gemm_f32 as core_f32, gemm_fp8 as core_fp8, Fp8Mat, GemmParams, Inputs};
use super::grouped::{
    grouped_gemm_f32 as core_gf32, grouped_gemm_fp8 as core_gfp8, Groups, Segment,
};
use super::quant::{quantize, Fp8Layout, Group, ScaleMode};
use napi::bindgen_prelude::{Float32Array, Float32ArraySlice, Uint8Array, Uint8ArraySlice};
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

/// C[M,N] (+)= op(A) op(B) as JavaScript describes it. A is stored [M,K] ([K,M] when transA), B
/// [K,N] ([N,K] when transB); absent flags are false.
#[napi(object)]
pub struct GemmOptions {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub trans_a: Option<bool>,
    pub trans_b: Option<bool>,
    /// C += product (otherwise C = product).
    pub accumulate: Option<bool>,
    /// Round the operands to BF16 first (the BF16 GEMM).
    pub inputs_bf16: Option<bool>,
    /// Round the final C to BF16.
    pub output_bf16: Option<bool>,
}

/// The FP8 GEMM's options: those of GemmOptions but the operand rounding (FP8 operands come
/// quantised), and the promotion interval.
#[napi(object)]
pub struct Fp8GemmOptions {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub trans_a: Option<bool>,
    pub trans_b: Option<bool>,
    pub accumulate: Option<bool>,
    pub output_bf16: Option<bool>,
    /// Elements of K per promotion of the partial sums into the f32 accumulator (default 128).
    pub promotion: Option<u32>,
}

impl GemmOptions {
    fn params(&self) -> (GemmParams, Inputs) {
        let p = GemmParams {
            m: self.m as usize,
            n: self.n as usize,
            k: self.k as usize,
            trans_a: self.trans_a.unwrap_or(false),
            trans_b: self.trans_b.unwrap_or(false),
            accumulate: self.accumulate.unwrap_or(false),
            output_bf16: self.output_bf16.unwrap_or(false),
        };
        let inputs = if self.inputs_bf16.unwrap_or(false) {
            Inputs::Bf16
        } else {
            Inputs::F32
        };
        (p, inputs)
    }
}

impl Fp8GemmOptions {
    fn params(&self) -> (GemmParams, usize) {
        let p = GemmParams {
            m: self.m as usize,
            n: self.n as usize,
            k: self.k as usize,
            trans_a: self.trans_a.unwrap_or(false),
            trans_b: self.trans_b.unwrap_or(false),
            accumulate: self.accumulate.unwrap_or(false),
            output_bf16: self.output_bf16.unwrap_or(false),
        };
        (p, self.promotion.unwrap_or(128) as usize)
    }
}

/// One quantised FP8 operand: its codes, its scales, and their group ("tile" | "block" |
/// "column-tile" | "row" | "tensor", of the stored matrix) and format ("e4m3" | "e5m2").
#[napi(object, object_to_js = false)]
pub struct Fp8Operand {
    pub data: Uint8Array,
    pub scales: Float32Array,
    pub group: String,
    pub format: String,
}

impl Fp8Operand {
    /// The operand for the kernels, checked not to share memory with the output `c`.
    fn mat(&self, c: &[f32], what: &str) -> Result<Fp8Mat<'_>> {
        no_alias(c, &self.data, what)?;
        no_alias(c, &self.scales, what)?;
        Ok(Fp8Mat {
            q: &self.data,
            scales: &self.scales,
            group: Group::parse(&self.group).map_err(err)?,
            format: fmt(&self.format)?,
        })
    }
}

/// How FP8 codes and scales are laid out (cpu::quant::Fp8Layout, without the segments, which
/// travel as their own typed array): `batch` matrices of rows x cols, the scale group and format.
#[napi(object, js_name = "Fp8Layout")]
pub struct JsFp8Layout {
    pub rows: u32,
    pub cols: u32,
    pub batch: u32,
    pub group: String,
    pub format: String,
}

impl JsFp8Layout {
    pub(crate) fn layout<'a>(&self, segments: Option<&'a [i32]>) -> Result<Fp8Layout<'a>> {
        Ok(Fp8Layout {
            rows: self.rows as usize,
            cols: self.cols as usize,
            batch: self.batch as usize,
            group: Group::parse(&self.group).map_err(err)?,
            format: fmt(&self.format)?,
            segments,
        })
    }
}

/// How quantizeFp8 chooses scales: mode "amax" (scale = amax / FMAX), "pow2" (that rounded up to
/// a power of two) or "unit" (scale 1, the unscaled control); eps floors the amax.
#[napi(object)]
pub struct Scaling {
    pub mode: String,
    pub eps: f64,
}

impl Scaling {
    fn mode(&self) -> Result<ScaleMode> {
        let eps = self.eps as f32;
        match self.mode.as_str() {
            "amax" => Ok(ScaleMode::Amax { eps }),
            "pow2" => Ok(ScaleMode::Pow2 { eps }),
            "unit" => Ok(ScaleMode::Unit),
            m => Err(err(format!(
                "unknown scaling mode \"{m}\" (allowed: amax, pow2, unit)"
            ))),
        }
    }
}

/// Prefaults C for a read-modify-write (see ops::util::prefault_for_write) and checks that it
/// shares no memory with the f32 operands.
fn output<'a>(
    c: &'a mut Float32ArraySlice,
    accumulate: bool,
    inputs: &[&[f32]],
    what: &str,
) -> Result<&'a mut [f32]> {
    let c = unsafe { c.as_mut() };
    if accumulate {
        crate::ops::util::prefault_for_write(c);
    }
    for x in inputs {
        no_alias(c, x, what)?;
    }
    Ok(c)
}

/// C[M,N] (row-major) = op(A) op(B) (+ C when accumulate) in f32 (see GemmOptions).
#[napi]
pub fn gemm_f32(a: &[f32], b: &[f32], mut c: Float32ArraySlice, o: GemmOptions) -> Result<()> {
    let (p, inputs) = o.params();
    let c = output(&mut c, p.accumulate, &[a, b], "gemmF32")?;
    core_f32(a, b, c, p, inputs).map_err(err)
}

/// FP8 GEMM with fine-grained scales and promotion to f32 every `promotion` elements of K.
/// Layouts whose scale changes inside a promotion chunk are rejected.
#[napi]
pub fn gemm_fp8(
    a: Fp8Operand,
    b: Fp8Operand,
    mut c: Float32ArraySlice,
    o: Fp8GemmOptions,
) -> Result<()> {
    let (p, promotion) = o.params();
    let c = output(&mut c, p.accumulate, &[], "gemmFp8")?;
    let (am, bm) = (a.mat(c, "gemmFp8")?, b.mat(c, "gemmFp8")?);
    core_fp8(am, bm, c, p, promotion).map_err(err)
}

fn groups<'a>(offsets: &'a [i32], segment: &str) -> Result<Groups<'a>> {
    Ok(Groups {
        offsets,
        segment: Segment::parse(segment).map_err(err)?,
    })
}

/// Per-expert GEMM (see grouped.rs): offsets has E+1 entries; segment "m" splits the rows of A and
/// C (B holds E matrices), segment "k" splits the reduction (C holds E matrices [M,N]).
#[napi]
pub fn grouped_gemm_f32(
    a: &[f32],
    b: &[f32],
    mut c: Float32ArraySlice,
    offsets: &[i32],
    segment: String,
    o: GemmOptions,
) -> Result<()> {
    let (p, inputs) = o.params();
    let c = output(&mut c, p.accumulate, &[a, b], "groupedGemmF32")?;
    core_gf32(a, b, c, groups(offsets, &segment)?, p, inputs).map_err(err)
}

/// Per-expert FP8 GEMM. Segment "m": A [M_total,K] quantised as one matrix, B E matrices with
/// their scales back to back. Segment "k": both operands column-tile quantised with
/// `segments = offsets` (quantizeFp8), so promotion chunks start at each segment start.
#[napi]
pub fn grouped_gemm_fp8(
    a: Fp8Operand,
    b: Fp8Operand,
    mut c: Float32ArraySlice,
    offsets: &[i32],
    segment: String,
    o: Fp8GemmOptions,
) -> Result<()> {
    let (p, promotion) = o.params();
    let c = output(&mut c, p.accumulate, &[], "groupedGemmFp8")?;
    let (am, bm) = (a.mat(c, "groupedGemmFp8")?, b.mat(c, "groupedGemmFp8")?);
    core_gfp8(am, bm, c, groups(offsets, &segment)?, p, promotion).map_err(err)
}

/// Quantises `x` into FP8 codes (`data`, same layout as x) and scales (the group's layout, per
/// matrix back to back), bit-exact with @moe8/fp8-core. segments (column-tile only): E+1 row
/// offsets; 128-row groups restart at each segment, scales [sum_e ceil(len_e/128), cols].
#[napi]
pub fn quantize_fp8(
    x: &[f32],
    layout: JsFp8Layout,
    scaling: Scaling,
    mut data: Uint8ArraySlice,
    mut scales: Float32ArraySlice,
    segments: Option<&[i32]>,
) -> Result<()> {
    let (data, scales) = unsafe { (data.as_mut(), scales.as_mut()) };
    no_alias(data, x, "quantizeFp8")?;
    no_alias(scales, x, "quantizeFp8")?;
    no_alias(scales, data, "quantizeFp8")?;
    let l = layout.layout(segments)?;
    quantize(x, &l, scaling.mode()?, data, scales).map_err(err)
}

/// Requantises FP8 codes (`data`, `scales` as `layout` lays them out: one matrix, no segments)
/// into 128x1 column tiles of `format` (`outData`, `outScales`), restarted at each of `segments`
/// (E+1 row offsets) when given: bit for bit quantizeFp8(dequantizeFp8(...)) without the f32 copy.
#[napi]
#[allow(clippy::too_many_arguments)]
pub fn requantize_fp8(
    data: &[u8],
    scales: &[f32],
    layout: JsFp8Layout,
    scaling: Scaling,
    format: String,
    mut out_data: Uint8ArraySlice,
    mut out_scales: Float32ArraySlice,
    segments: Option<&[i32]>,
) -> Result<()> {
    let (q, s) = unsafe { (out_data.as_mut(), out_scales.as_mut()) };
    no_alias(q, data, "requantizeFp8")?;
    no_alias(s, scales, "requantizeFp8")?;
    no_alias(q, scales, "requantizeFp8")?;
    no_alias(s, data, "requantizeFp8")?;
    no_alias(s, q, "requantizeFp8")?;
    let l = layout.layout(None)?;
    if l.batch != 1 {
        return Err(err("requantizeFp8: one matrix (batch 1) only".into()));
    }
    let src = super::requant::Source {
        codes: data,
        scales,
        rows: l.rows,
        cols: l.cols,
        group: l.group,
        format: l.format,
    };
    let f = fmt(&format)?;
    super::requant::requantize_column_tiles(&src, f, scaling.mode()?, segments, q, s).map_err(err)
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
pub fn bench_gemm(
    precision: String,
    m: u32,
    n: u32,
    k: u32,
    trans_a: bool,
    trans_b: bool,
    reps: u32,
) -> Result<f64> {
    let p = GemmParams {
        m: m as usize,
        n: n as usize,
        k: k as usize,
        trans_a,
        trans_b,
        ..GemmParams::default()
    };
    super::bench::bench_gemm(&precision, p, reps.max(1) as usize).map_err(err)
}
