//! Dense-layer kernels: RMSNorm, RoPE, head slicing, SwiGLU and the embedding, forward and
//! backward, following packages/tensor/src/ts/nn.ts (sums in f64 where the reference's are).

use super::util::{dot3_f64, multiversion, rows_per_task, sigmoid_f32, sum_f64_by};
use rayon::prelude::*;

pub type R<T> = Result<T, String>;

/// A row-major matrix's size.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub rows: usize,
    pub cols: usize,
}

fn check(cond: bool, msg: impl FnOnce() -> String) -> R<()> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

// --- RMSNorm ---------------------------------------------------------------------------------

multiversion! {
    fn rmsnorm_rows(x: &[f32], w: &[f32], cols: usize, eps: f64, y: &mut [f32], rstd: &mut [f32]) {
        for ((xr, yr), rs) in x.chunks_exact(cols).zip(y.chunks_exact_mut(cols)).zip(rstd.iter_mut()) {
            let ss = sum_f64_by(xr, |v| { let d = v as f64; d * d });
            let s = 1.0 / (ss / cols as f64 + eps).sqrt();
            *rs = s as f32;
            for ((y, &x), &w) in yr.iter_mut().zip(xr).zip(w) {
                *y = (x as f64 * s * w as f64) as f32;
            }
        }
    }
}

/// y = x * rstd * w per row, rstd = 1 / sqrt(mean(x^2) + eps).
pub fn rmsnorm(x: &[f32], w: &[f32], s: Shape, eps: f64, y: &mut [f32], rstd: &mut [f32]) -> R<()> {
    let Shape { rows, cols } = s;
    check(
        x.len() == rows * cols && y.len() == x.len() && w.len() == cols && rstd.len() == rows,
        || {
            format!(
                "rmsnorm: sizes x {} y {} w {} rstd {} for [{rows}, {cols}]",
                x.len(),
                y.len(),
                w.len(),
                rstd.len()
            )
        },
    )?;
    if cols == 0 {
        return Ok(());
    }
    let rt = rows_per_task(cols);
    y.par_chunks_mut(rt * cols)
        .zip(rstd.par_chunks_mut(rt))
        .zip(x.par_chunks(rt * cols))
        .for_each(|((y, rs), x)| rmsnorm_rows(x, w, cols, eps, y, rs));
    Ok(())
}

multiversion! {
    fn rmsnorm_bw_rows(dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32], cols: usize, dx: &mut [f32], dw: &mut [f64]) {
        for (((dyr, xr), dxr), &s) in dy.chunks_exact(cols).zip(x.chunks_exact(cols)).zip(dx.chunks_exact_mut(cols)).zip(rstd) {
            let s = s as f64;
            let dot = dot3_f64(dyr, w, xr);
            let k = s * s * dot / cols as f64;
            for c in 0..cols {
                let (g, xv) = (dyr[c] as f64, xr[c] as f64);
                dxr[c] = (s * (g * w[c] as f64 - xv * k)) as f32;
                dw[c] += g * xv * s;
            }
        }
    }
}

/// dx per row, and dw summed over rows in f64 (fixed row blocks added in order).
pub fn rmsnorm_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    s: Shape,
    dx: &mut [f32],
    dw: &mut [f32],
) -> R<()> {
    let Shape { rows, cols } = s;
    check(
        x.len() == rows * cols
            && dy.len() == x.len()
            && dx.len() == x.len()
            && w.len() == cols
            && dw.len() == cols
            && rstd.len() == rows,
        || format!("rmsnormBackward: sizes do not match [{rows}, {cols}]"),
    )?;
    if cols == 0 {
        return Ok(());
    }
    let rt = rows_per_task(cols);
    let parts: Vec<Vec<f64>> = dx
        .par_chunks_mut(rt * cols)
        .zip(dy.par_chunks(rt * cols).zip(x.par_chunks(rt * cols)))
        .zip(rstd.par_chunks(rt))
        .map(|((dx, (dy, x)), rs)| {
            let mut part = vec![0f64; cols];
            rmsnorm_bw_rows(dy, x, w, rs, cols, dx, &mut part);
            part
        })
        .collect();
    let mut acc = vec![0f64; cols];
    for p in &parts {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
    for (d, a) in dw.iter_mut().zip(&acc) {
        *d = *a as f32;
    }
    Ok(())
}

// --- RoPE ------------------------------------------------------------------------------------

/// RoPE on x [rows, heads * width]: which part of each head rotates, and by what angles.
#[derive(Clone, Copy, Debug)]
pub struct Rope {
    pub rows: usize,
    pub heads: usize,
    pub width: usize,
    /// The rotated slice [offset, offset + dim) of every head (dim even).
    pub offset: usize,
    pub dim: usize,
    /// Row r is at position start + r % seq_len.
    pub seq_len: usize,
    pub start: usize,
    pub theta: f64,
    /// Rotate by the negated angles (the backward pass).
    pub inverse: bool,
}

/// Interleaved-pair rotation of [offset, offset+dim) of every head, by pos * theta^(-2i/dim) with
/// pos = start + row % seq_len; angles and products in f64 as ts. `y` starts as a copy of `x`.
pub fn rope(x: &[f32], r: &Rope, y: &mut [f32]) -> R<()> {
    let Rope {
        rows,
        heads,
        width,
        offset,
        dim,
        seq_len,
        start,
        theta,
        inverse,
    } = *r;
    let row_len = heads * width;
    check(x.len() == rows * row_len && y.len() == x.len(), || {
        format!(
            "rope: {} elements for {rows} rows of {heads} heads x {width}",
            x.len()
        )
    })?;
    check(
        dim.is_multiple_of(2) && offset + dim <= width && seq_len > 0,
        || {
            format!("rope: slice [{offset}, {offset}+{dim}) of a head of width {width} (dim must be even, seqLen > 0)")
        },
    )?;
    let half = dim / 2;
    let npos = rows.min(seq_len);
    // cos/sin table [pos - start][i], computed once per call.
    let mut cs = vec![(0f64, 0f64); npos * half];
    cs.par_chunks_mut(half.max(1))
        .enumerate()
        .for_each(|(p, row)| {
            let pos = start + p;
            for (i, e) in row.iter_mut().enumerate() {
                let angle = pos as f64 * theta.powf((-2.0 * i as f64) / dim as f64);
                let s = angle.sin();
                *e = (angle.cos(), if inverse { -s } else { s });
            }
        });
    if row_len == 0 {
        return Ok(());
    }
    y.par_chunks_mut(row_len)
        .zip(x.par_chunks(row_len))
        .enumerate()
        .for_each(|(r, (yr, xr))| {
            yr.copy_from_slice(xr);
            if half == 0 {
                return;
            }
            let t = &cs[(r % seq_len) * half..][..half];
            for h in 0..heads {
                let base = h * width + offset;
                for (i, &(c, s)) in t.iter().enumerate() {
                    let j = base + 2 * i;
                    let (a, b) = (xr[j] as f64, xr[j + 1] as f64);
                    yr[j] = (a * c - b * s) as f32;
                    yr[j + 1] = (a * s + b * c) as f32;
                }
            }
        });
    Ok(())
}

// --- head slicing ----------------------------------------------------------------------------

/// The slice [start, start + len) of every head of a [rows, heads * width] matrix.
#[derive(Clone, Copy, Debug)]
pub struct HeadRange {
    pub rows: usize,
    pub heads: usize,
    pub width: usize,
    pub start: usize,
    pub len: usize,
}

fn check_slice(op: &str, x_len: usize, r: &HeadRange) -> R<()> {
    let HeadRange {
        rows,
        heads,
        width,
        start,
        len,
    } = *r;
    check(
        start + len <= width && x_len == rows * heads * width,
        || {
            format!("{op}: slice [{start}, {start}+{len}) of heads of width {width}; {x_len} elements for {rows} rows x {heads} heads")
        },
    )
}

/// y[r, h, :] = x[r, h, start:start+len] (or summed over heads in f32, in head order).
pub fn head_slice(x: &[f32], r: &HeadRange, sum_heads: bool, y: &mut [f32]) -> R<()> {
    check_slice("headSlice", x.len(), r)?;
    let HeadRange {
        rows,
        heads,
        width,
        start,
        len,
    } = *r;
    let out_heads = if sum_heads { 1 } else { heads };
    check(y.len() == rows * out_heads * len, || {
        "headSlice: output size".into()
    })?;
    if len == 0 || heads == 0 {
        return Ok(());
    }
    let rt = rows_per_task(heads * width);
    y.par_chunks_mut(rt * out_heads * len)
        .zip(x.par_chunks(rt * heads * width))
        .for_each(|(y, x)| {
            for (yr, xr) in y
                .chunks_exact_mut(out_heads * len)
                .zip(x.chunks_exact(heads * width))
            {
                if sum_heads {
                    yr.fill(0.0);
                    for h in 0..heads {
                        for (o, &v) in yr.iter_mut().zip(&xr[h * width + start..][..len]) {
                            *o += v;
                        }
                    }
                } else {
                    for h in 0..heads {
                        yr[h * len..][..len].copy_from_slice(&xr[h * width + start..][..len]);
                    }
                }
            }
        });
    Ok(())
}

/// dst[r, h, start:start+len] += src[r, h, :] (f32 adds).
pub fn head_scatter_add(dst: &mut [f32], src: &[f32], r: &HeadRange) -> R<()> {
    check_slice("headScatterAdd", dst.len(), r)?;
    let HeadRange {
        rows,
        heads,
        width,
        start,
        len,
    } = *r;
    check(src.len() == rows * heads * len, || {
        format!(
            "headScatterAdd: src has {} elements, want {}",
            src.len(),
            rows * heads * len
        )
    })?;
    if len == 0 || heads == 0 {
        return Ok(());
    }
    let rt = rows_per_task(heads * width);
    dst.par_chunks_mut(rt * heads * width)
        .zip(src.par_chunks(rt * heads * len))
        .for_each(|(d, s)| {
            for (dr, sr) in d
                .chunks_exact_mut(heads * width)
                .zip(s.chunks_exact(heads * len))
            {
                for h in 0..heads {
                    for (o, &v) in dr[h * width + start..][..len]
                        .iter_mut()
                        .zip(&sr[h * len..][..len])
                    {
                        *o += v;
                    }
                }
            }
        });
    Ok(())
}

/// Per head, a's head of width la then b's of width lb; b has `b_heads` = heads or 1 (shared).
#[derive(Clone, Copy, Debug)]
pub struct HeadConcat {
    pub rows: usize,
    pub heads: usize,
    pub la: usize,
    pub lb: usize,
    pub b_heads: usize,
}

/// y[r, h] = [a[r, h] | b[r, bHeads == 1 ? 0 : h]].
pub fn head_concat(a: &[f32], b: &[f32], c: &HeadConcat, y: &mut [f32]) -> R<()> {
    let HeadConcat {
        rows,
        heads,
        la,
        lb,
        b_heads,
    } = *c;
    check(
        a.len() == rows * heads * la
            && b.len() == rows * b_heads * lb
            && y.len() == rows * heads * (la + lb)
            && (b_heads == 1 || b_heads == heads),
        || {
            format!(
                "headConcat: sizes a {} b {} y {} for {rows} rows, {heads} heads, {la} + {lb}, bHeads {b_heads}",
                a.len(),
                b.len(),
                y.len()
            )
        },
    )?;
    let w = la + lb;
    if w == 0 || heads == 0 {
        return Ok(());
    }
    let rt = rows_per_task(heads * w);
    y.par_chunks_mut(rt * heads * w)
        .enumerate()
        .for_each(|(t, yb)| {
            for (i, yr) in yb.chunks_exact_mut(heads * w).enumerate() {
                let r = t * rt + i;
                for h in 0..heads {
                    yr[h * w..][..la].copy_from_slice(&a[(r * heads + h) * la..][..la]);
                    let bh = if b_heads == 1 { 0 } else { h };
                    yr[h * w + la..][..lb].copy_from_slice(&b[(r * b_heads + bh) * lb..][..lb]);
                }
            }
        });
    Ok(())
}

// --- SwiGLU ----------------------------------------------------------------------------------
// The gate and up projections run as one GEMM, so their outputs arrive side by side in each row:
// gu = [g | u], [rows, 2 inter]; h = silu(g) * u is [rows, inter], and the backward writes d[g | u]
// in the same packed layout for the one Dgrad and Wgrad of the fused projection.

multiversion! {
    fn swiglu_row(g: &[f32], u: &[f32], h: &mut [f32]) {
        for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) { *h = g * sigmoid_f32(g) * u; }
    }
}

fn check_packed(op: &str, gu: usize, h: usize, inter: usize) -> R<()> {
    check(inter > 0 && h % inter == 0 && gu == 2 * h, || {
        format!("{op}: gate|up has {gu} values, want 2 x {h} ([rows, 2 x {inter}])")
    })
}

/// h = silu(g) * u for each row of gu = [g | u].
pub fn swiglu(gu: &[f32], inter: usize, h: &mut [f32]) -> R<()> {
    check_packed("swiglu", gu.len(), h.len(), inter)?;
    let rt = rows_per_task(inter);
    h.par_chunks_mut(rt * inter)
        .zip(gu.par_chunks(rt * 2 * inter))
        .for_each(|(h, gu)| {
            for (h, gu) in h.chunks_mut(inter).zip(gu.chunks(2 * inter)) {
                let (g, u) = gu.split_at(inter);
                swiglu_row(g, u, h);
            }
        });
    Ok(())
}

multiversion! {
    fn swiglu_bw_row(dh: &[f32], g: &[f32], u: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for i in 0..dg.len().min(du.len()).min(dh.len()).min(g.len()).min(u.len()) {
            let s = sigmoid_f32(g[i]);
            du[i] = dh[i] * g[i] * s;
            dg[i] = dh[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        }
    }
}

/// d[g | u] of h = silu(g) * u: dg = dh * u * s * (1 + g (1 - s)), du = dh * g * s, s = sigmoid(g).
pub fn swiglu_backward(dh: &[f32], gu: &[f32], inter: usize, dgu: &mut [f32]) -> R<()> {
    check_packed("swigluBackward", gu.len(), dh.len(), inter)?;
    check(dgu.len() == gu.len(), || {
        "swigluBackward: d(gate|up) and gate|up differ in size".into()
    })?;
    let rt = rows_per_task(inter);
    dgu.par_chunks_mut(rt * 2 * inter)
        .zip(gu.par_chunks(rt * 2 * inter).zip(dh.par_chunks(rt * inter)))
        .for_each(|(dgu, (gu, dh))| {
            for ((dgu, gu), dh) in dgu
                .chunks_mut(2 * inter)
                .zip(gu.chunks(2 * inter))
                .zip(dh.chunks(inter))
            {
                let (g, u) = gu.split_at(inter);
                let (dg, du) = dgu.split_at_mut(inter);
                swiglu_bw_row(dh, g, u, dg, du);
            }
        });
    Ok(())
}

// --- embedding -------------------------------------------------------------------------------

/// out[n] = w[ids[n]].
pub fn embedding(w: &[f32], vocab: usize, d: usize, ids: &[i32], out: &mut [f32]) -> R<()> {
    check(w.len() == vocab * d && out.len() == ids.len() * d, || {
        "embedding: sizes do not match".into()
    })?;
    if let Some(&bad) = ids.iter().find(|&&i| i < 0 || i as usize >= vocab) {
        return Err(format!(
            "embedding: token id {bad} outside the vocabulary of {vocab}"
        ));
    }
    if d == 0 {
        return Ok(());
    }
    out.par_chunks_mut(rows_per_task(d) * d)
        .enumerate()
        .for_each(|(t, o)| {
            for (i, orow) in o.chunks_exact_mut(d).enumerate() {
                let id = ids[t * rows_per_task(d) + i] as usize;
                orow.copy_from_slice(&w[id * d..][..d]);
            }
        });
    Ok(())
}

/// dw[ids[n]] += dy[n]: tokens are bucketed by id (stable), then each vocabulary row adds its
/// tokens in increasing n, the order ts uses, so the result is bit-identical and race-free.
pub fn embedding_backward(
    dw: &mut [f32],
    vocab: usize,
    d: usize,
    dy: &[f32],
    ids: &[i32],
) -> R<()> {
    check(dw.len() == vocab * d && dy.len() == ids.len() * d, || {
        "embeddingBackward: sizes do not match".into()
    })?;
    if let Some(&bad) = ids.iter().find(|&&i| i < 0 || i as usize >= vocab) {
        return Err(format!(
            "embeddingBackward: token id {bad} outside the vocabulary of {vocab}"
        ));
    }
    if d == 0 {
        return Ok(());
    }
    let mut start = vec![0u32; vocab + 1];
    for &i in ids {
        start[i as usize + 1] += 1;
    }
    for v in 0..vocab {
        start[v + 1] += start[v];
    }
    let mut fill = start.clone();
    let mut order = vec![0u32; ids.len()];
    for (n, &i) in ids.iter().enumerate() {
        order[fill[i as usize] as usize] = n as u32;
        fill[i as usize] += 1;
    }
    dw.par_chunks_mut(d).enumerate().for_each(|(v, row)| {
        for &n in &order[start[v] as usize..start[v + 1] as usize] {
            for (o, &g) in row.iter_mut().zip(&dy[n as usize * d..][..d]) {
                *o += g;
            }
        }
    });
    Ok(())
}
