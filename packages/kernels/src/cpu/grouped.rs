//! Grouped (per-expert) GEMMs: one call for all experts of an MoE layer.
//!
//! segment "m" (Fprop/Dgrad): rows [off_e, off_e+1) of A [M_total, K] times expert e's B (E
//! matrices back to back) into the same rows of C. segment "k" (Wgrad): C[e] (E matrices [M, N]
//! back to back) (+)= A_e^T B_e with A stored [K_total, M] and B stored [K_total, N], rows of
//! segment e. Each expert runs the ordinary GEMM on sub-views, so every precision path and its
//! checks are shared; the FP8 promotion chunks restart at each segment start.

use super::gemm::{check_len, gemm_f32, gemm_fp8, Fp8Mat, GemmParams, Inputs};
use super::quant::{check_offsets, row_groups, Group, G};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    M,
    K,
}

impl Segment {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "m" => Ok(Segment::M),
            "k" => Ok(Segment::K),
            _ => Err(format!("unknown segment \"{s}\" (allowed: m, k)")),
        }
    }
}

/// How a grouped GEMM splits its experts: `offsets` (E+1 entries, from 0 to the segmented
/// dimension's total) cut the rows of A and C (`Segment::M`) or the reduction (`Segment::K`).
#[derive(Clone, Copy, Debug)]
pub struct Groups<'a> {
    pub offsets: &'a [i32],
    pub segment: Segment,
}

fn ranges(offsets: &[i32]) -> impl Iterator<Item = (usize, usize)> + '_ {
    offsets
        .windows(2)
        .map(|w| (w[0] as usize, (w[1] - w[0]) as usize))
}

/// Checks the segment-specific shapes; returns the number of experts.
fn check_shapes(g: Groups, p: &GemmParams) -> Result<usize, String> {
    match g.segment {
        Segment::M => {
            check_offsets(g.offsets, p.m, "offsets")?;
            if p.trans_a {
                return Err(
                    "grouped gemm, segment m: A is stored [M_total, K] (trans_a must be false)"
                        .into(),
                );
            }
        }
        Segment::K => {
            check_offsets(g.offsets, p.k, "offsets")?;
            if !p.trans_a || p.trans_b {
                return Err(
                    "grouped gemm, segment k: A is stored [K_total, M] and B [K_total, N] (trans_a true, trans_b false)".into(),
                );
            }
        }
    }
    Ok(g.offsets.len() - 1)
}

/// Per-expert f32 (or BF16-input) GEMMs; `p` describes the whole call (M or K the total).
pub fn grouped_gemm_f32(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    g: Groups,
    p: GemmParams,
    inputs: Inputs,
) -> Result<(), String> {
    let e_count = check_shapes(g, &p)?;
    let GemmParams { m, n, k, .. } = p;
    match g.segment {
        Segment::M => {
            check_len("grouped gemm: a", a.len(), m * k)?;
            check_len("grouped gemm: b", b.len(), e_count * k * n)?;
            check_len("grouped gemm: c", c.len(), m * n)?;
            for (e, (o, len)) in ranges(g.offsets).enumerate() {
                let bb = &b[e * k * n..(e + 1) * k * n];
                let pe = GemmParams { m: len, ..p };
                gemm_f32(
                    &a[o * k..(o + len) * k],
                    bb,
                    &mut c[o * n..(o + len) * n],
                    pe,
                    inputs,
                )?;
            }
        }
        Segment::K => {
            check_len("grouped gemm: a", a.len(), k * m)?;
            check_len("grouped gemm: b", b.len(), k * n)?;
            check_len("grouped gemm: c", c.len(), e_count * m * n)?;
            for (e, (o, len)) in ranges(g.offsets).enumerate() {
                let ce = &mut c[e * m * n..(e + 1) * m * n];
                let pe = GemmParams { k: len, ..p };
                gemm_f32(
                    &a[o * m..(o + len) * m],
                    &b[o * n..(o + len) * n],
                    ce,
                    pe,
                    inputs,
                )?;
            }
        }
    }
    Ok(())
}

/// Where the scales of stored rows [o, o+len) of a `rows x cols` matrix begin. `seg_group` is the
/// index of the segment's first 128-row group when the column-tile scales are segmented.
fn sub_scales(g: Group, o: usize, cols: usize, seg_group: Option<usize>) -> Result<usize, String> {
    let nb = cols.div_ceil(G);
    Ok(match g {
        Group::Tensor => 0,
        Group::Row => o,
        Group::Tile => o * nb,
        Group::ColumnTile if seg_group.is_some() => seg_group.unwrap() * cols,
        Group::Block | Group::ColumnTile if !o.is_multiple_of(G) => {
            return Err(format!(
                "grouped gemm_fp8: a segment starts at row {o}, inside a 128-row scale group"
            ));
        }
        Group::Block => (o / G) * nb,
        Group::ColumnTile => (o / G) * cols,
    })
}

/// The operand restricted to codes [q0, q1) and scales from s0 on.
fn sub<'a>(x: Fp8Mat<'a>, q0: usize, q1: usize, s0: usize) -> Result<Fp8Mat<'a>, String> {
    check_len("grouped gemm_fp8: codes", x.q.len(), q1)?;
    check_len("grouped gemm_fp8: scales", x.scales.len(), s0)?;
    Ok(Fp8Mat {
        q: &x.q[q0..q1],
        scales: &x.scales[s0..],
        ..x
    })
}

/// Per-expert FP8 GEMMs; `p` describes the whole call (M or K the total).
pub fn grouped_gemm_fp8(
    a: Fp8Mat,
    b: Fp8Mat,
    c: &mut [f32],
    g: Groups,
    p: GemmParams,
    promotion: usize,
) -> Result<(), String> {
    let e_count = check_shapes(g, &p)?;
    let GemmParams { m, n, k, .. } = p;
    match g.segment {
        Segment::M => {
            check_len("grouped gemm_fp8: c", c.len(), m * n)?;
            let (br, bc) = p.stored_b();
            let b_per = b.group.scale_count(br, bc);
            for (e, (o, len)) in ranges(g.offsets).enumerate() {
                if len == 0 {
                    continue;
                }
                let ae = sub(a, o * k, (o + len) * k, sub_scales(a.group, o, k, None)?)?;
                let be = sub(b, e * k * n, (e + 1) * k * n, e * b_per)?;
                let pe = GemmParams { m: len, ..p };
                gemm_fp8(ae, be, &mut c[o * n..(o + len) * n], pe, promotion)?;
            }
        }
        Segment::K => {
            check_len("grouped gemm_fp8: c", c.len(), e_count * m * n)?;
            // Column-tile scales restart their 128-row groups at every segment (quantize_fp8 with
            // the same offsets as segments); the other layouts are indexed globally.
            let groups = row_groups(k, Some(g.offsets))?;
            let mut first_group = 0;
            for (e, (o, len)) in ranges(g.offsets).enumerate() {
                let ae = sub(
                    a,
                    o * m,
                    (o + len) * m,
                    sub_scales(a.group, o, m, Some(first_group))?,
                )?;
                let be = sub(
                    b,
                    o * n,
                    (o + len) * n,
                    sub_scales(b.group, o, n, Some(first_group))?,
                )?;
                let pe = GemmParams { k: len, ..p };
                gemm_fp8(ae, be, &mut c[e * m * n..(e + 1) * m * n], pe, promotion)?;
                first_group += len.div_ceil(G);
            }
            debug_assert_eq!(first_group, groups.len());
        }
    }
    Ok(())
}
