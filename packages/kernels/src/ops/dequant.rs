//! FP8 dequantisation (the Backend's `dequantize` op): value = decode(code) * scale, with the
//! scales in the group layouts of crate::cpu::quant (batched matrices, or column-tile groups that
//! restart at segment starts). Bit-exact with @moe8/fp8-core (one f32 multiply per element).

use super::nn::R;
use crate::cpu::fp8::Fp8Format;
use crate::cpu::quant::{row_groups, Fp8Layout, Group, G};
use rayon::prelude::*;

/// Dequantises codes and scales laid out as `l` says (`batch` matrices [rows, cols], or one
/// [rows, cols] matrix split into segments for a column-tile group) into `out`.
pub fn dequantize(data: &[u8], scales: &[f32], l: &Fp8Layout, out: &mut [f32]) -> R<()> {
    let Fp8Layout {
        rows,
        cols,
        batch,
        group,
        format,
        segments,
    } = *l;
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
        return Err(format!(
            "dequantize: {} scales, expected {need}",
            scales.len()
        ));
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

/// FP8 range events of a quantisation (the Backend's `fp8Flow`): [overflow, underflow] counts, from
/// x, its codes and their dequantised values. Overflow: x not finite, or a saturated code (which
/// decodes to exactly FMAX * scale) whose x lay beyond half an ulp above it; underflow: a non-zero
/// x that encoded to zero. Counts are exact integers, summed per row then in row order.
pub fn flow_counts(x: &[f32], codes: &[u8], deq: &[f32], format: Fp8Format) -> R<[f64; 2]> {
    if x.len() != codes.len() || x.len() != deq.len() {
        return Err(format!(
            "fp8Flow: {} values, {} codes, {} dequantised",
            x.len(),
            codes.len(),
            deq.len()
        ));
    }
    let (top, tol) = match format {
        // Half an ulp above max (1.75 * 2^e) still rounds to max: 464 for E4M3, 61440 for E5M2.
        Fp8Format::E4M3 => (0x7eu8, 1.0 + 1.0 / 28.0),
        Fp8Format::E5M2 => (0x7bu8, 1.0 + 1.0 / 14.0),
    };
    let chunk = 1 << 14;
    let parts: Vec<(u64, u64)> = x
        .par_chunks(chunk)
        .zip(codes.par_chunks(chunk))
        .zip(deq.par_chunks(chunk))
        .map(|((x, q), d)| {
            let (mut over, mut under) = (0u64, 0u64);
            for ((&v, &c), &dv) in x.iter().zip(q).zip(d) {
                let c = c & 0x7f;
                if !v.is_finite() || (c == top && (v.abs() as f64) > (dv.abs() as f64) * tol) {
                    over += 1;
                } else if v != 0.0 && c == 0 {
                    under += 1;
                }
            }
            (over, under)
        })
        .collect();
    let (o, u) = parts
        .iter()
        .fold((0u64, 0u64), |a, p| (a.0 + p.0, a.1 + p.1));
    Ok([o as f64, u as f64])
}
