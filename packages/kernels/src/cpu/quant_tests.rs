//! Tests of the quantiser against a direct per-element reference (bit for bit).

use super::*;
use crate::cpu::fp8::{decode, encode};

#[test]
fn pow2() {
    assert_eq!(pow2_ceil(1.0), 1.0);
    assert_eq!(pow2_ceil(1.0000001), 2.0);
    assert_eq!(pow2_ceil(0.75), 1.0);
    assert_eq!(pow2_ceil(3.0e-39), f32::from_bits(0x0040_0000)); // subnormal: 2^-127
    assert_eq!(pow2_ceil(f32::from_bits(1)), f32::from_bits(1));
    assert_eq!(pow2_ceil(0.0), f32::from_bits(1));
}

/// Slow reference: loops over every group by element coordinates.
fn reference(
    x: &[f32],
    rows: usize,
    cols: usize,
    g: Group,
    f: Fp8Format,
    mode: ScaleMode,
) -> (Vec<u8>, Vec<f32>) {
    let ns = g.scale_count(rows, cols);
    let mut amax = vec![0f32; ns];
    for r in 0..rows {
        for c in 0..cols {
            let i = g.scale_index(r, c, cols);
            let a = x[r * cols + c].abs();
            if a > amax[i] {
                amax[i] = a;
            }
        }
    }
    let fmax = f.max();
    let scales: Vec<f32> = amax
        .iter()
        .map(|&a| match mode {
            ScaleMode::Amax { eps } => a.max(eps) / fmax,
            ScaleMode::Pow2 { eps } => pow2_ceil(a.max(eps) / fmax),
            ScaleMode::Unit => 1.0,
        })
        .collect();
    let mut q = vec![0u8; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let i = g.scale_index(r, c, cols);
            let v = x[r * cols + c];
            q[r * cols + c] = match mode {
                ScaleMode::Amax { eps } => encode(v * (fmax / amax[i].max(eps)), f),
                ScaleMode::Pow2 { .. } => encode(v / scales[i], f),
                ScaleMode::Unit => encode(v, f),
            };
        }
    }
    (q, scales)
}

#[test]
fn all_groups_match_reference() {
    let mut seed = 7u32;
    for &(rows, cols) in &[(1, 1), (3, 130), (129, 7), (300, 257), (128, 128)] {
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                ((seed >> 8) as f32 / (1 << 24) as f32 - 0.5) * (1.0 + (i % 17) as f32 * 30.0)
            })
            .collect();
        for g in [
            Group::Tile,
            Group::Block,
            Group::ColumnTile,
            Group::Row,
            Group::Tensor,
        ] {
            for f in [Fp8Format::E4M3, Fp8Format::E5M2] {
                for mode in [
                    ScaleMode::Amax { eps: 1e-12 },
                    ScaleMode::Pow2 { eps: 1e-12 },
                    ScaleMode::Unit,
                ] {
                    let ns = g.scale_count(rows, cols);
                    let (mut q, mut s) = (vec![0u8; rows * cols * 2], vec![0f32; ns * 2]);
                    let x2: Vec<f32> = x.iter().chain(x.iter()).map(|v| v * 0.5).collect();
                    let l = Fp8Layout {
                        rows,
                        cols,
                        batch: 2,
                        group: g,
                        format: f,
                        segments: None,
                    };
                    quantize(&x2, &l, mode, &mut q, &mut s).unwrap();
                    let xh: Vec<f32> = x.iter().map(|v| v * 0.5).collect();
                    let (rq, rs) = reference(&xh, rows, cols, g, f, mode);
                    for b in 0..2 {
                        assert_eq!(
                            &q[b * rows * cols..(b + 1) * rows * cols],
                            &rq[..],
                            "{g:?} {f:?} {mode:?} {rows}x{cols}"
                        );
                        assert_eq!(&s[b * ns..(b + 1) * ns], &rs[..]);
                    }
                    // Dequantised values are close to x (relative to the group's amax).
                    if let ScaleMode::Amax { .. } = mode {
                        for r in 0..rows {
                            for c in 0..cols {
                                let i = r * cols + c;
                                let d = decode(q[i], f) * s[g.scale_index(r, c, cols)];
                                assert!(
                                    (d - xh[i]).abs()
                                        <= 0.13 * s[g.scale_index(r, c, cols)] * f.max()
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// NaNs are ignored by every group's amax (and encode to the NaN code); infinities count.
#[test]
fn nan_and_inf_inputs_match_reference() {
    let (rows, cols) = (260, 300);
    let mut x: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1009) as f32 - 504.0) * 0.01)
        .collect();
    for i in (0..rows * cols).step_by(97) {
        x[i] = if i % 3 == 0 { -f32::NAN } else { f32::NAN };
    }
    x[5 * cols + 200] = f32::INFINITY;
    x[7] = f32::from_bits(0x7fff_ffff); // the largest NaN pattern
    x[cols * 200 + 3] = -f32::INFINITY;
    for g in [
        Group::Tile,
        Group::Block,
        Group::ColumnTile,
        Group::Row,
        Group::Tensor,
    ] {
        for mode in [
            ScaleMode::Amax { eps: 1e-12 },
            ScaleMode::Pow2 { eps: 1e-12 },
            ScaleMode::Unit,
        ] {
            let f = Fp8Format::E4M3;
            let ns = g.scale_count(rows, cols);
            let (mut q, mut s) = (vec![0u8; rows * cols], vec![0f32; ns]);
            let l = Fp8Layout {
                rows,
                cols,
                batch: 1,
                group: g,
                format: f,
                segments: None,
            };
            quantize(&x, &l, mode, &mut q, &mut s).unwrap();
            let (rq, rs) = reference(&x, rows, cols, g, f, mode);
            assert_eq!(q, rq, "{g:?} {mode:?}");
            assert_eq!(
                s.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                rs.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{g:?} {mode:?}"
            );
        }
    }
}

#[test]
fn column_tile_segments() {
    let (rows, cols) = (300, 5);
    let x: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * (1 + i / 500) as f32)
        .collect();
    let seg = [0i32, 100, 100, 300];
    let ns = scales_len(rows, cols, Group::ColumnTile, Some(&seg)).unwrap();
    // Groups per segment: 1, 0 (empty) and 2.
    assert_eq!(ns, 3 * cols);
    let (mut q, mut s) = (vec![0u8; rows * cols], vec![0f32; ns]);
    let l = Fp8Layout {
        rows,
        cols,
        batch: 1,
        group: Group::ColumnTile,
        format: Fp8Format::E4M3,
        segments: Some(&seg),
    };
    quantize(&x, &l, ScaleMode::Amax { eps: 1e-12 }, &mut q, &mut s).unwrap();
    // Each segment equals a standalone column-tile quantisation of its rows.
    let mut srow = 0;
    for w in seg.windows(2) {
        let (r0, r1) = (w[0] as usize, w[1] as usize);
        let (rq, rs) = reference(
            &x[r0 * cols..r1 * cols],
            r1 - r0,
            cols,
            Group::ColumnTile,
            Fp8Format::E4M3,
            ScaleMode::Amax { eps: 1e-12 },
        );
        assert_eq!(&q[r0 * cols..r1 * cols], &rq[..]);
        assert_eq!(&s[srow * cols..srow * cols + rs.len()], &rs[..]);
        srow += (r1 - r0).div_ceil(G);
    }
}

/// The fused requantisation equals quantising the dequantised source, for every source layout,
/// both target formats and with segments (one empty, one shorter than a group).
#[test]
fn requantize_equals_quantize_of_dequantize() {
    use crate::cpu::requant::{requantize_column_tiles, Source};
    let (rows, cols) = (300, 200);
    let x: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1009) as f32 - 504.0) * 0.37 + if i == 7 { 3e4 } else { 0.0 })
        .collect();
    let seg = [0i32, 0, 130, 131, 300];
    let mode = ScaleMode::Amax { eps: 1e-12 };
    for g in [
        Group::Tile,
        Group::Block,
        Group::Row,
        Group::Tensor,
        Group::ColumnTile,
    ] {
        let src_layout = Fp8Layout {
            rows,
            cols,
            batch: 1,
            group: g,
            format: Fp8Format::E4M3,
            segments: None,
        };
        let mut codes = vec![0u8; rows * cols];
        let mut scales = vec![0f32; g.scale_count(rows, cols)];
        quantize(&x, &src_layout, mode, &mut codes, &mut scales).unwrap();
        let mut deq = vec![0f32; rows * cols];
        crate::ops::dequant::dequantize(&codes, &scales, &src_layout, &mut deq).unwrap();
        let src = Source {
            codes: &codes,
            scales: &scales,
            rows,
            cols,
            group: g,
            format: Fp8Format::E4M3,
        };
        for f in [Fp8Format::E4M3, Fp8Format::E5M2] {
            for segments in [None, Some(&seg[..])] {
                let to = Fp8Layout {
                    rows,
                    cols,
                    batch: 1,
                    group: Group::ColumnTile,
                    format: f,
                    segments,
                };
                let ns = scales_len(rows, cols, Group::ColumnTile, segments).unwrap();
                let (mut q1, mut s1) = (vec![0u8; rows * cols], vec![0f32; ns]);
                quantize(&deq, &to, mode, &mut q1, &mut s1).unwrap();
                let (mut q2, mut s2) = (vec![1u8; rows * cols], vec![-1f32; ns]);
                requantize_column_tiles(&src, f, mode, segments, &mut q2, &mut s2).unwrap();
                assert_eq!(
                    q1,
                    q2,
                    "codes, source {g:?}, {f:?}, segments {}",
                    segments.is_some()
                );
                let bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&s1), bits(&s2), "scales, source {g:?}, {f:?}");
            }
        }
    }
}
