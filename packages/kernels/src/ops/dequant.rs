//! FP8 dequantisation (the Backend's `dequantize` op): value = decode(code) * scale, with the
//! scales in the group layouts of crate::cpu::quant (batched matrices, or column-tile groups that
//! restart at segment starts). Bit-exact with @moe8/fp8-core (one f32 multiply per element).

use super::nn::R;
use crate::cpu::fp8::Fp8Format;
use crate::cpu::quant::{row_groups, Group, G};
use rayon::prelude::*;

/// Dequantises `batch` matrices [rows, cols] of codes (or one [rows, cols] matrix split into
/// segments for a column-tile group) into `out`.
#[allow(clippy::too_many_arguments)]
pub fn dequantize(
    data: &[u8],
    scales: &[f32],
    rows: usize,
    cols: usize,
    batch: usize,
    group: Group,
    format: Fp8Format,
    segments: Option<&[i32]>,
    out: &mut [f32],
) -> R<()> {
    let n = rows * cols * batch;
    if data.len() != n || out.len() != n {
        return Err(format!(
            "dequantize: {} codes and {} outputs for {batch} x [{rows}, {cols}]",
            data.len(),
            out.len()
        ));
    }
    if cols == 0 || n == 0 {
        return Ok(());
    }
    // Scale index of element (R, 0) of every stored row R, and how the column moves it.
    let mut row_base = vec![0usize; rows * batch];
    let need = match segments {
        Some(seg) => {
            if group != Group::ColumnTile || batch != 1 {
                return Err("dequantize: segments need a 2-D column-tile tensor".into());
            }
            let groups = row_groups(rows, Some(seg))?;
            for (gi, &(r0, r1)) in groups.iter().enumerate() {
                for b in &mut row_base[r0..r1] {
                    *b = gi * cols;
                }
            }
            groups.len() * cols
        }
        None => {
            let per = group.scale_count(rows, cols);
            for (rr, b) in row_base.iter_mut().enumerate() {
                let (m, r) = (rr / rows, rr % rows);
                *b = m * per + group.scale_index(r, 0, cols);
            }
            per * batch
        }
    };
    if scales.len() != need {
        return Err(format!("dequantize: {} scales, expected {need}", scales.len()));
    }
    let table = format.table();
    out.par_chunks_mut(cols)
        .zip(data.par_chunks(cols))
        .zip(row_base.par_iter())
        .for_each(|((o, q), &base)| {
            let srow = &scales[base..];
            match group {
                Group::Tile | Group::Block => {
                    for (c0, (oc, qc)) in o.chunks_mut(G).zip(q.chunks(G)).enumerate() {
                        let s = srow[c0];
                        for (o, &q) in oc.iter_mut().zip(qc) {
                            *o = table[q as usize] * s;
                        }
                    }
                }
                Group::ColumnTile => {
                    for ((o, &q), &s) in o.iter_mut().zip(q).zip(&srow[..cols]) {
                        *o = table[q as usize] * s;
                    }
                }
                Group::Row | Group::Tensor => {
                    let s = srow[0];
                    for (o, &q) in o.iter_mut().zip(q) {
                        *o = table[q as usize] * s;
                    }
                }
            }
        });
    Ok(())
}
