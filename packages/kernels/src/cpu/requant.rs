//! Requantisation of FP8 codes into 128x1 column tiles (the Backend's `requantize`, which turns a
//! cached FP8 activation into Wgrad's operand): per 128-row group, the group's rows are decoded with
//! their scales into a per-thread scratch tile and quantised from there. The decoded values are
//! those of `dequantize` (decode(code) * scale, one f32 multiply) and the quantisation is
//! `quantize`'s own group kernel, so the result is bit for bit `quantize(dequantize(q))` without
//! the whole-tensor f32 copy in between.

use super::fp8::Fp8Format;
use super::gemm::with_scratch;
use super::quant::{column_tile_group, row_groups, Group, ScaleMode, G};
use rayon::prelude::*;

/// The FP8 source: one `rows x cols` matrix of codes and its scales in `group` layout (no segments).
#[derive(Clone, Copy)]
pub struct Source<'a> {
    pub codes: &'a [u8],
    pub scales: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub group: Group,
    pub format: Fp8Format,
}

/// out = rows [r0, r0 + out.len()/cols) of the source, dequantised.
fn decode_rows(s: &Source, r0: usize, out: &mut [f32]) {
    let (cols, table) = (s.cols, s.format.table());
    for (i, o) in out.chunks_exact_mut(cols).enumerate() {
        let r = r0 + i;
        let q = &s.codes[r * cols..(r + 1) * cols];
        let base = s.group.scale_index(r, 0, cols);
        match s.group {
            Group::Tile | Group::Block => {
                for (c0, (oc, qc)) in o.chunks_mut(G).zip(q.chunks(G)).enumerate() {
                    let sc = s.scales[base + c0];
                    for (o, &q) in oc.iter_mut().zip(qc) {
                        *o = table[q as usize] * sc;
                    }
                }
            }
            Group::ColumnTile => {
                for ((o, &q), &sc) in o.iter_mut().zip(q).zip(&s.scales[base..base + cols]) {
                    *o = table[q as usize] * sc;
                }
            }
            Group::Row | Group::Tensor => {
                let sc = s.scales[base];
                for (o, &q) in o.iter_mut().zip(q) {
                    *o = table[q as usize] * sc;
                }
            }
        }
    }
}

/// Quantises the dequantised `src` into column tiles of `format`, restarted at every segment
/// start (`segments`: E+1 row offsets), into `data` (the source's layout) and `scales`
/// (`[groups, cols]`).
pub fn requantize_column_tiles(
    src: &Source,
    format: Fp8Format,
    mode: ScaleMode,
    segments: Option<&[i32]>,
    data: &mut [u8],
    scales: &mut [f32],
) -> Result<(), String> {
    let Source { rows, cols, .. } = *src;
    let n = rows * cols;
    let groups = row_groups(rows, segments)?;
    if src.codes.len() != n || data.len() != n {
        return Err(format!(
            "requantize: {} codes in and {} out for [{rows}, {cols}]",
            src.codes.len(),
            data.len()
        ));
    }
    if src.scales.len() != src.group.scale_count(rows, cols) || scales.len() != groups.len() * cols
    {
        return Err(format!(
            "requantize: {} scales in and {} out for [{rows}, {cols}] in {} column-tile groups",
            src.scales.len(),
            scales.len(),
            groups.len()
        ));
    }
    if let ScaleMode::Amax { eps } | ScaleMode::Pow2 { eps } = mode {
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(format!(
                "requantize: eps must be a positive finite f32 (got {eps})"
            ));
        }
    }
    // The disjoint codes and scales of each group, then the groups in parallel.
    let mut work = Vec::with_capacity(groups.len());
    let (mut qrest, mut srest) = (data, scales);
    for &(r0, r1) in &groups {
        let (qh, qt) = qrest.split_at_mut((r1 - r0) * cols);
        let (sh, st) = srest.split_at_mut(cols);
        work.push((r0, qh, sh));
        qrest = qt;
        srest = st;
    }
    work.into_par_iter().for_each(|(r0, q, s)| {
        with_scratch(q.len(), |x| {
            decode_rows(src, r0, x);
            column_tile_group(x, q, s, cols, mode, format);
        })
    });
    Ok(())
}
