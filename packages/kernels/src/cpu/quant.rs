//! Fine-grained FP8 quantisation (docs/numerics.md, scaling groups), bit-exact with `@moe8/fp8-core`.
//!
//! Per group: amax = max(max|x|, eps); inv = f32(FMAX / amax); q = encode(f32(x * inv));
//! scale = f32(amax / FMAX). As in the reference, NaNs are ignored by the amax (they encode to the
//! NaN code themselves) and an infinite amax gives an infinite scale.

use super::fp8::{encode_e4m3, encode_e5m2, Fp8Format};
use crate::ops::util::multiversion;
use rayon::prelude::*;

/// Group layouts of the scales of a stored `rows x cols` matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    /// 1x128 along the stored columns: scales `[rows, ceil(cols/128)]`.
    Tile,
    /// 128x128: scales `[ceil(rows/128), ceil(cols/128)]`.
    Block,
    /// 128x1 (128 consecutive rows of one column): scales `[ceil(rows/128), cols]`, or with segments
    /// `[sum_e ceil(len_e/128), cols]` (groups restart at every segment start).
    ColumnTile,
    /// One scale per row: `[rows]`.
    Row,
    /// One scale: `[1]`.
    Tensor,
}

pub const G: usize = 128;

impl Group {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "tile" => Ok(Group::Tile),
            "block" => Ok(Group::Block),
            "column-tile" => Ok(Group::ColumnTile),
            "row" => Ok(Group::Row),
            "tensor" => Ok(Group::Tensor),
            _ => Err(format!(
                "unknown scale group \"{s}\" (allowed: tile, block, column-tile, row, tensor)"
            )),
        }
    }

    /// Number of scales of a `rows x cols` matrix (without segments).
    pub fn scale_count(self, rows: usize, cols: usize) -> usize {
        match self {
            Group::Tile => rows * cols.div_ceil(G),
            Group::Block => rows.div_ceil(G) * cols.div_ceil(G),
            Group::ColumnTile => rows.div_ceil(G) * cols,
            Group::Row => rows,
            Group::Tensor => 1,
        }
    }

    /// Index into the scales of element (r, c) of a `rows x cols` matrix (without segments).
    #[inline]
    pub fn scale_index(self, r: usize, c: usize, cols: usize) -> usize {
        match self {
            Group::Tile => r * cols.div_ceil(G) + c / G,
            Group::Block => (r / G) * cols.div_ceil(G) + c / G,
            Group::ColumnTile => (r / G) * cols + c,
            Group::Row => r,
            Group::Tensor => 0,
        }
    }
}

/// How scales are chosen.
#[derive(Clone, Copy, Debug)]
pub enum ScaleMode {
    /// scale = amax / FMAX, the default (docs/numerics.md, scaling groups).
    Amax { eps: f32 },
    /// scale = the smallest power of two >= f32(amax / FMAX); q = encode(x / scale).
    Pow2 { eps: f32 },
    /// scale = 1, q = encode(x) (the `fp8-unscaled` negative control).
    Unit,
}

/// Smallest power of two >= s, computed from the bits so it is exact for every f32. A zero (or
/// NaN) s gives the smallest positive f32, 2^-149, so a scale is never zero (as the reference).
pub fn pow2_ceil(s: f32) -> f32 {
    let b = s.to_bits();
    if s.is_nan() || s <= 0.0 {
        return f32::from_bits(1);
    }
    if s.is_infinite() {
        return s;
    }
    let exp = b >> 23;
    let man = b & 0x7f_ffff;
    if exp == 0 {
        // Subnormal: the next power of two of the integer mantissa (0x800000 is the smallest normal).
        return f32::from_bits(man.next_power_of_two());
    }
    if man == 0 {
        s
    } else {
        f32::from_bits((exp + 1) << 23) // exponent 255 gives inf, the honest answer
    }
}

/// |x| as bits, with NaN mapped to 0 so the amax ignores it. For non-negative floats the order of
/// the bit patterns is the order of the values, so an integer max is an exact, order-independent
/// (deterministic) amax that vectorises.
#[inline(always)]
fn abs_bits(v: f32) -> u32 {
    let b = v.to_bits() & 0x7fff_ffff;
    if b > 0x7f80_0000 {
        0
    } else {
        b
    }
}

/// Max of `abs_bits` over `x`. The hot loop takes the max of the raw |x| bits (a NaN's bits exceed
/// every other value's): an integer max reduction, which LLVM vectorises at the full vector width
/// (an explicit 16-lane array became four 128-bit vectors); only when a NaN is present does a
/// second pass recompute the max without the NaNs.
#[inline(always)]
fn amax_bits(x: &[f32]) -> u32 {
    let r = x
        .iter()
        .fold(0u32, |a, &v| a.max(v.to_bits() & 0x7fff_ffff));
    if r > 0x7f80_0000 {
        x.iter().fold(0, |a, &v| a.max(abs_bits(v)))
    } else {
        r
    }
}

/// Per-column `amax_bits` over the rows of `x` (`m.len()` columns), same NaN treatment.
#[inline(always)]
fn amax_cols(m: &mut [u32], x: &[f32]) {
    let cols = m.len();
    m.fill(0);
    for xr in x.chunks_exact(cols) {
        for (mv, &v) in m.iter_mut().zip(xr) {
            *mv = (*mv).max(v.to_bits() & 0x7fff_ffff);
        }
    }
    for (c, mv) in m.iter_mut().enumerate() {
        if *mv > 0x7f80_0000 {
            *mv = x.chunks_exact(cols).fold(0, |a, xr| a.max(abs_bits(xr[c])));
        }
    }
}

/// (scale, encoder) of a group from its amax bits.
#[derive(Clone, Copy)]
enum Enc {
    Mul(f32),
    Div(f32),
    Unit,
}

fn group_scale(amax_bits: u32, mode: ScaleMode, f: Fp8Format) -> (f32, Enc) {
    let fmax = f.max();
    let amax_of = |eps: f32| f32::from_bits(amax_bits).max(eps);
    match mode {
        ScaleMode::Amax { eps } => {
            let a = amax_of(eps);
            (a / fmax, Enc::Mul(fmax / a))
        }
        ScaleMode::Pow2 { eps } => {
            let s = pow2_ceil(amax_of(eps) / fmax);
            (s, Enc::Div(s))
        }
        ScaleMode::Unit => (1.0, Enc::Unit),
    }
}

/// Encodes a span with one group's encoder (format and encoder hoisted out of the loop).
#[inline(always)]
fn encode_span(x: &[f32], q: &mut [u8], e: Enc, f: Fp8Format) {
    #[inline(always)]
    fn go(x: &[f32], q: &mut [u8], e: Enc, enc: impl Fn(f32) -> u8 + Copy) {
        match e {
            Enc::Mul(inv) => q.iter_mut().zip(x).for_each(|(o, &v)| *o = enc(v * inv)),
            Enc::Div(s) => q.iter_mut().zip(x).for_each(|(o, &v)| *o = enc(v / s)),
            Enc::Unit => q.iter_mut().zip(x).for_each(|(o, &v)| *o = enc(v)),
        }
    }
    match f {
        Fp8Format::E4M3 => go(x, q, e, encode_e4m3),
        Fp8Format::E5M2 => go(x, q, e, encode_e5m2),
    }
}

/// Encodes a row whose columns have their own factors: `fac[c]` multiplies (Mul), divides (Div)
/// or is ignored (Unit), as `e`'s kind says.
#[inline(always)]
fn encode_row_cols(x: &[f32], q: &mut [u8], fac: &[f32], e: Enc, f: Fp8Format) {
    #[inline(always)]
    fn go(x: &[f32], q: &mut [u8], fac: &[f32], e: Enc, enc: impl Fn(f32) -> u8 + Copy) {
        let it = q.iter_mut().zip(x).zip(fac);
        match e {
            Enc::Mul(_) => it.for_each(|((o, &v), &a)| *o = enc(v * a)),
            Enc::Div(_) => it.for_each(|((o, &v), &a)| *o = enc(v / a)),
            Enc::Unit => it.for_each(|((o, &v), _)| *o = enc(v)),
        }
    }
    match f {
        Fp8Format::E4M3 => go(x, q, fac, e, encode_e4m3),
        Fp8Format::E5M2 => go(x, q, fac, e, encode_e5m2),
    }
}

multiversion! {
    /// Rows of a Tile (groups of `width` = 128 columns) or Row (`width` = cols) quantisation.
    fn tile_rows(x: &[f32], q: &mut [u8], s: &mut [f32], cols: usize, width: usize, mode: ScaleMode, f: Fp8Format) {
        let per = cols.div_ceil(width);
        for ((qr, xr), sr) in q.chunks_mut(cols).zip(x.chunks(cols)).zip(s.chunks_mut(per)) {
            for ((qg, xg), sg) in qr.chunks_mut(width).zip(xr.chunks(width)).zip(sr.iter_mut()) {
                let (scale, e) = group_scale(amax_bits(xg), mode, f);
                *sg = scale;
                encode_span(xg, qg, e, f);
            }
        }
    }
}

multiversion! {
    fn amax_span(x: &[f32]) -> u32 { amax_bits(x) }
}

multiversion! {
    fn encode_span_mv(x: &[f32], q: &mut [u8], e: Enc, f: Fp8Format) { encode_span(x, q, e, f) }
}

multiversion! {
    /// One 128-row group of a column-tile quantisation (scales `s[cols]`).
    pub(crate) fn column_tile_group(x: &[f32], q: &mut [u8], s: &mut [f32], cols: usize, mode: ScaleMode, f: Fp8Format) {
        let mut m = vec![0u32; cols];
        amax_cols(&mut m, x);
        let mut fac = vec![0f32; cols];
        let mut kind = Enc::Unit;
        for ((&mb, sv), fv) in m.iter().zip(s.iter_mut()).zip(fac.iter_mut()) {
            let (scale, e) = group_scale(mb, mode, f);
            *sv = scale;
            *fv = match e { Enc::Mul(v) | Enc::Div(v) => v, Enc::Unit => 1.0 };
            kind = e;
        }
        for (qr, xr) in q.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
            encode_row_cols(xr, qr, &fac, kind, f);
        }
    }
}

multiversion! {
    /// One 128-row group of a block quantisation (scales `s[ceil(cols/128)]`).
    fn block_group(x: &[f32], q: &mut [u8], s: &mut [f32], cols: usize, mode: ScaleMode, f: Fp8Format) {
        let rows = x.len() / cols;
        for (cb, sv) in s.iter_mut().enumerate() {
            let (c0, c1) = (cb * G, ((cb + 1) * G).min(cols));
            let mb = (0..rows)
                .map(|r| amax_bits(&x[r * cols + c0..r * cols + c1]))
                .fold(0, |a, b| a.max(b));
            let (scale, e) = group_scale(mb, mode, f);
            *sv = scale;
            for r in 0..rows {
                encode_span(&x[r * cols + c0..r * cols + c1], &mut q[r * cols + c0..r * cols + c1], e, f);
            }
        }
    }
}

/// Row ranges of the 128-row groups (ColumnTile/Block): start at 0 and at every segment start.
pub fn row_groups(rows: usize, segments: Option<&[i32]>) -> Result<Vec<(usize, usize)>, String> {
    let mut out = Vec::new();
    let bounds: Vec<usize> = match segments {
        None => vec![0, rows],
        Some(s) => {
            check_offsets(s, rows, "segments")?;
            s.iter().map(|&v| v as usize).collect()
        }
    };
    for w in bounds.windows(2) {
        let mut r = w[0];
        while r < w[1] {
            let e = (r + G).min(w[1]);
            out.push((r, e));
            r = e;
        }
    }
    Ok(out)
}

/// Offsets must be E+1 non-decreasing entries from 0 to `total`.
pub fn check_offsets(o: &[i32], total: usize, what: &str) -> Result<(), String> {
    if o.is_empty() || o[0] != 0 || *o.last().unwrap() as i64 != total as i64 {
        return Err(format!(
            "{what} must start at 0 and end at {total} (got {o:?})"
        ));
    }
    if o.windows(2).any(|w| w[1] < w[0]) {
        return Err(format!("{what} must be non-decreasing (got {o:?})"));
    }
    Ok(())
}

/// Number of scales `quantize` writes per matrix.
pub fn scales_len(
    rows: usize,
    cols: usize,
    g: Group,
    segments: Option<&[i32]>,
) -> Result<usize, String> {
    Ok(match (g, segments) {
        (Group::ColumnTile, Some(_)) => row_groups(rows, segments)?.len() * cols,
        (_, Some(_)) => return Err("segments are only supported with the column-tile group".into()),
        _ => g.scale_count(rows, cols),
    })
}

/// How FP8 codes and their scales are laid out: `batch` row-major matrices of `rows x cols`
/// codes back to back, each with its scales in `group` layout (back to back too), and for a
/// column-tile group optional `segments` (E+1 row offsets) at which the 128-row groups restart.
#[derive(Clone, Copy, Debug)]
pub struct Fp8Layout<'a> {
    pub rows: usize,
    pub cols: usize,
    pub batch: usize,
    pub group: Group,
    pub format: Fp8Format,
    pub segments: Option<&'a [i32]>,
}

/// Quantises `x` into codes (`data`, x's layout) and `scales` as `l` lays them out.
pub fn quantize(
    x: &[f32],
    l: &Fp8Layout,
    mode: ScaleMode,
    data: &mut [u8],
    scales: &mut [f32],
) -> Result<(), String> {
    let Fp8Layout {
        rows,
        cols,
        batch,
        group: g,
        segments,
        ..
    } = *l;
    let n = rows * cols;
    let ns = scales_len(rows, cols, g, segments)?;
    if let ScaleMode::Amax { eps } | ScaleMode::Pow2 { eps } = mode {
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(format!(
                "quantize: eps must be a positive finite f32 (got {eps})"
            ));
        }
    }
    if x.len() < n * batch || data.len() < n * batch || scales.len() < ns * batch {
        return Err(format!(
            "quantize: need x and data of {} elements and scales of {} (got {}, {}, {})",
            n * batch,
            ns * batch,
            x.len(),
            data.len(),
            scales.len()
        ));
    }
    if batch == 1 {
        return quantize_one(&x[..n], l, mode, &mut data[..n], &mut scales[..ns]);
    }
    if n == 0 {
        for s in scales[..ns * batch].chunks_mut(ns.max(1)) {
            quantize_one(&[], l, mode, &mut [], s)?;
        }
        return Ok(());
    }
    // The matrices are independent: quantise them in parallel (each may split further).
    data[..n * batch]
        .par_chunks_mut(n)
        .zip(x[..n * batch].par_chunks(n))
        .zip(scales[..ns * batch].par_chunks_mut(ns.max(1)))
        .try_for_each(|((q, x), s)| quantize_one(x, l, mode, q, s))
}

/// One matrix of `l` (its `batch` is not used).
fn quantize_one(
    x: &[f32],
    l: &Fp8Layout,
    mode: ScaleMode,
    q: &mut [u8],
    s: &mut [f32],
) -> Result<(), String> {
    let Fp8Layout {
        rows,
        cols,
        group: g,
        format: f,
        segments,
        ..
    } = *l;
    if rows == 0 || cols == 0 {
        if g == Group::Tensor {
            s[0] = group_scale(0, mode, f).0;
        }
        return Ok(());
    }
    match g {
        Group::Tile | Group::Row => {
            let width = if g == Group::Tile { G } else { cols };
            let per = cols.div_ceil(width);
            // About 16K elements per task.
            let rt = (1usize << 14).div_ceil(cols).max(1);
            q.par_chunks_mut(rt * cols)
                .zip(s.par_chunks_mut(rt * per))
                .zip(x.par_chunks(rt * cols))
                .for_each(|((q, s), x)| tile_rows(x, q, s, cols, width, mode, f))
        }
        Group::Tensor => {
            let m = x.par_chunks(1 << 14).map(amax_span).max().unwrap_or(0);
            let (scale, e) = group_scale(m, mode, f);
            s[0] = scale;
            q.par_chunks_mut(1 << 14)
                .zip(x.par_chunks(1 << 14))
                .for_each(|(q, x)| encode_span_mv(x, q, e, f));
        }
        Group::Block | Group::ColumnTile => {
            // Split codes and scales into the disjoint pieces of each 128-row group, then run the
            // groups in parallel.
            let groups = row_groups(
                rows,
                if g == Group::ColumnTile {
                    segments
                } else {
                    None
                },
            )?;
            let per = if g == Group::Block {
                cols.div_ceil(G)
            } else {
                cols
            };
            let mut work = Vec::with_capacity(groups.len());
            let (mut qrest, mut srest) = (q, s);
            for &(r0, r1) in &groups {
                let (qh, qt) = qrest.split_at_mut((r1 - r0) * cols);
                let (sh, st) = srest.split_at_mut(per);
                work.push((&x[r0 * cols..r1 * cols], qh, sh));
                qrest = qt;
                srest = st;
            }
            work.into_par_iter().for_each(|(x, q, s)| {
                if g == Group::ColumnTile {
                    column_tile_group(x, q, s, cols, mode, f);
                } else {
                    block_group(x, q, s, cols, mode, f);
                }
            });
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "quant_tests.rs"]
mod tests;
