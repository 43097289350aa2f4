//! GEMM tests against slow references (codec and quantiser tests sit next to their code).

use super::bench::random;
use super::fp8::{bf16_round, decode, Fp8Format};
use super::gemm::{
    gemm_f32, gemm_fp8, sgemm_scalar, Fp8Mat, GemmParams, Inputs, Mnk, OutView, Threads, View,
};
use super::grouped::{grouped_gemm_f32, grouped_gemm_fp8, Groups, Segment};
use super::quant::{quantize, scales_len, Fp8Layout, Group, ScaleMode};

/// op(X)(i, j) of a row-major stored matrix with `ld` columns.
fn at(x: &[f32], ld: usize, trans: bool, i: usize, j: usize) -> f32 {
    if trans {
        x[j * ld + i]
    } else {
        x[i * ld + j]
    }
}

/// An m x n x k GEMM with the given layouts that overwrites C with an f32 result.
fn shape(m: usize, n: usize, k: usize, ta: bool, tb: bool) -> GemmParams {
    GemmParams {
        m,
        n,
        k,
        trans_a: ta,
        trans_b: tb,
        ..GemmParams::default()
    }
}

/// Naive f64 GEMM; also returns sum |a b| per element, the scale of the rounding error.
fn naive(a: &[f32], b: &[f32], s: &GemmParams) -> (Vec<f64>, Vec<f64>) {
    let (m, n, k, ta, tb) = (s.m, s.n, s.k, s.trans_a, s.trans_b);
    let (lda, ldb) = (s.stored_a().1, s.stored_b().1);
    let mut c = vec![0f64; m * n];
    let mut mag = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            for p in 0..k {
                let t = at(a, lda, ta, i, p) as f64 * at(b, ldb, tb, p, j) as f64;
                c[i * n + j] += t;
                mag[i * n + j] += t.abs();
            }
        }
    }
    (c, mag)
}

fn assert_close(got: &[f32], want: &[f64], mag: &[f64], rel: f64, what: &str) {
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(mag).enumerate() {
        let tol = rel * (s + 1e-30) + 1e-30;
        assert!(
            (g as f64 - w).abs() <= tol,
            "{what}: element {i}: got {g}, want {w} (tol {tol})"
        );
    }
}

const SIZES: [(usize, usize, usize); 8] = [
    (1, 1, 1),
    (7, 5, 3),
    (1, 300, 129),
    (129, 7, 130),
    (33, 65, 17),
    (300, 129, 257),
    (64, 256, 128),
    (2, 3, 0),
];

#[test]
fn f32_gemm_matches_naive() {
    for &(m, n, k) in &SIZES {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = random(m * k, 3);
            let b = random(k * n, 4);
            let (want, mag) = naive(&a, &b, &shape(m, n, k, ta, tb));
            let mut c = vec![f32::NAN; m * n];
            gemm_f32(&a, &b, &mut c, shape(m, n, k, ta, tb), Inputs::F32).unwrap();
            assert_close(&c, &want, &mag, 1e-5, &format!("f32 {m}x{n}x{k} {ta} {tb}"));
            // The scalar fallback too (what MOE8_SIMD=scalar selects).
            let mut cs = vec![f32::NAN; m * n];
            let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
            let (va, vb) = (View::of(&a, lda, ta), View::of(&b, ldb, tb));
            let out = OutView {
                ptr: cs.as_mut_ptr(),
                ld: n,
            };
            let mnk = Mnk { m, n, k };
            unsafe { sgemm_scalar(mnk, va, vb, out, false, Threads::Pool) };
            assert_close(&cs, &want, &mag, 1e-5, "scalar");
            // accumulate: C += AB; output_bf16 rounds the sum.
            let c0 = random(m * n, 5);
            let mut c2 = c0.clone();
            gemm_f32(
                &a,
                &b,
                &mut c2,
                GemmParams {
                    accumulate: true,
                    output_bf16: true,
                    ..shape(m, n, k, ta, tb)
                },
                Inputs::F32,
            )
            .unwrap();
            let want2: Vec<f64> = want.iter().zip(&c0).map(|(w, c)| w + *c as f64).collect();
            let mag2: Vec<f64> = mag
                .iter()
                .zip(&c0)
                .map(|(s, c)| s + c.abs() as f64 + (w_abs(c) * 0.004))
                .collect();
            assert_close(&c2, &want2, &mag2, 4e-3, "accumulate+bf16 out");
            assert!(c2.iter().all(|v| bf16_round(*v) == *v));
        }
    }
}

fn w_abs(c: &f32) -> f64 {
    c.abs() as f64
}

#[test]
fn bf16_inputs_round_operands_first() {
    let mut sizes = SIZES.to_vec();
    sizes.extend([(37, 70, 200), (100, 33, 300), (13, 97, 129)]);
    for &(m, n, k) in &sizes {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = random(m * k, 6);
            let b = random(k * n, 7);
            let (ar, br): (Vec<f32>, Vec<f32>) = (
                a.iter().map(|v| bf16_round(*v)).collect(),
                b.iter().map(|v| bf16_round(*v)).collect(),
            );
            let (want, mag) = naive(&ar, &br, &shape(m, n, k, ta, tb));
            let mut c = vec![f32::NAN; m * n];
            gemm_f32(&a, &b, &mut c, shape(m, n, k, ta, tb), Inputs::Bf16).unwrap();
            assert_close(
                &c,
                &want,
                &mag,
                1e-5,
                &format!("bf16 inputs {m}x{n}x{k} {ta} {tb}"),
            );
            // Accumulating into C, BF16 output.
            let c0 = random(m * n, 11);
            let mut c2 = c0.clone();
            gemm_f32(
                &a,
                &b,
                &mut c2,
                GemmParams {
                    accumulate: true,
                    output_bf16: true,
                    ..shape(m, n, k, ta, tb)
                },
                Inputs::Bf16,
            )
            .unwrap();
            for i in 0..m * n {
                assert_eq!(bf16_round(c2[i]), c2[i]);
                let w = c0[i] as f64 + want[i];
                assert!(
                    (c2[i] as f64 - w).abs()
                        <= 1e-5 * (mag[i] + c0[i].abs() as f64) + w.abs() / 128.0
                );
            }
        }
    }
}

#[test]
fn repeatable_bit_for_bit() {
    let (m, n, k) = (300, 520, 700);
    let a = random(m * k, 8);
    let b = random(k * n, 9);
    let mut c1 = vec![0f32; m * n];
    gemm_f32(&a, &b, &mut c1, shape(m, n, k, false, false), Inputs::F32).unwrap();
    for _ in 0..5 {
        let mut c2 = vec![0f32; m * n];
        gemm_f32(&a, &b, &mut c2, shape(m, n, k, false, false), Inputs::F32).unwrap();
        assert!(c1.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

/// A quantised operand, owned.
struct Q {
    q: Vec<u8>,
    s: Vec<f32>,
    g: Group,
    f: Fp8Format,
}

impl Q {
    fn new(x: &[f32], rows: usize, cols: usize, g: Group, f: Fp8Format, seg: Option<&[i32]>) -> Q {
        let mut q = vec![0u8; rows * cols];
        let mut s = vec![0f32; scales_len(rows, cols, g, seg).unwrap()];
        let l = Fp8Layout {
            rows,
            cols,
            batch: 1,
            group: g,
            format: f,
            segments: seg,
        };
        quantize(x, &l, ScaleMode::Amax { eps: 1e-12 }, &mut q, &mut s).unwrap();
        Q { q, s, g, f }
    }
    fn mat(&self) -> Fp8Mat<'_> {
        Fp8Mat {
            q: &self.q,
            scales: &self.s,
            group: self.g,
            format: self.f,
        }
    }
}

/// The reference formula: per promotion chunk an f32 sequential sum of decoded products, then
/// acc += partial * sa * sb in f32. Returns also a bound scale for the partial-sum order.
fn fp8_ref(a: &Q, b: &Q, s: &GemmParams, p: usize) -> (Vec<f64>, Vec<f64>) {
    let (m, n, k, ta, tb) = (s.m, s.n, s.k, s.trans_a, s.trans_b);
    let ((ar, ac), (_, bc)) = (s.stored_a(), s.stored_b());
    let mut c = vec![0f64; m * n];
    let mut mag = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            let mut s_abs = 0f64;
            for k0 in (0..k).step_by(p) {
                let (mut part, mut pabs) = (0f32, 0f64);
                for kk in k0..(k0 + p).min(k) {
                    let (r, cc) = if ta { (kk, i) } else { (i, kk) };
                    let x = decode(a.q[r * ac + cc], a.f);
                    let (rb, cb) = if tb { (j, kk) } else { (kk, j) };
                    let y = decode(b.q[rb * bc + cb], b.f);
                    part += x * y;
                    pabs += (x * y).abs() as f64;
                }
                let sa = a.s
                    [a.g.scale_index(if ta { k0 } else { i }, if ta { i } else { k0 }, ac)];
                let sb = b.s
                    [b.g.scale_index(if tb { j } else { k0 }, if tb { k0 } else { j }, bc)];
                acc += part * sa * sb;
                s_abs += pabs * sa as f64 * sb as f64;
            }
            c[i * n + j] = acc as f64;
            mag[i * n + j] = s_abs;
        }
    }
    let _ = ar;
    (c, mag)
}

#[test]
fn fp8_gemm_matches_chunked_reference() {
    let f = Fp8Format::E4M3;
    for &(m, n, k) in &SIZES {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let x = random(m * k, 10)
                .iter()
                .enumerate()
                .map(|(i, v)| v * (1.0 + (i % 300) as f32))
                .collect::<Vec<_>>();
            let y = random(k * n, 11);
            let (ar, ac) = if ta { (k, m) } else { (m, k) };
            let (br, bc) = if tb { (n, k) } else { (k, n) };
            // The recipe: A tile along K (column-tile when A is stored [K, M]), B block.
            let qa = Q::new(
                &x,
                ar,
                ac,
                if ta { Group::ColumnTile } else { Group::Tile },
                f,
                None,
            );
            for (bg, bf) in [(Group::Block, f), (Group::Tensor, Fp8Format::E5M2)] {
                let qb = Q::new(&y, br, bc, bg, bf, None);
                for p in [128, 64] {
                    let (want, mag) = fp8_ref(&qa, &qb, &shape(m, n, k, ta, tb), p);
                    let mut c = vec![f32::NAN; m * n];
                    gemm_fp8(qa.mat(), qb.mat(), &mut c, shape(m, n, k, ta, tb), p).unwrap();
                    assert_close(
                        &c,
                        &want,
                        &mag,
                        2e-6,
                        &format!("fp8 {m}x{n}x{k} {ta} {tb} {bg:?} p{p}"),
                    );
                }
            }
        }
    }
}

#[test]
fn fp8_gemm_rejects_scales_that_vary_inside_a_chunk() {
    let (m, n, k) = (8, 8, 256);
    let x = random(m * k, 12);
    let f = Fp8Format::E4M3;
    let qa = Q::new(&x, m, k, Group::Tile, f, None);
    let qb = Q::new(&x, k, n, Group::Block, f, None);
    let mut c = vec![0f32; m * n];
    let e = gemm_fp8(
        qa.mat(),
        qb.mat(),
        &mut c,
        shape(m, n, k, false, false),
        256,
    )
    .unwrap_err();
    assert!(e.contains("promotion chunk"), "{e}");
    let qa_ct = Q::new(&x, m, k, Group::ColumnTile, f, None);
    assert!(gemm_fp8(
        qa_ct.mat(),
        qb.mat(),
        &mut c,
        shape(m, n, k, false, false),
        128
    )
    .is_err());
    assert!(gemm_fp8(qa.mat(), qb.mat(), &mut c, shape(m, n, k, false, false), 96).is_err());
    assert!(gemm_fp8(qa.mat(), qb.mat(), &mut c, shape(m, n, k, false, false), 32).is_ok());
    // Accumulate + bf16 output keep working on a valid layout.
    let mut c2 = vec![1f32; m * n];
    gemm_fp8(
        qa.mat(),
        qb.mat(),
        &mut c2,
        GemmParams {
            accumulate: true,
            output_bf16: true,
            ..shape(m, n, k, false, false)
        },
        128,
    )
    .unwrap();
    let mut c3 = vec![0f32; m * n];
    gemm_fp8(
        qa.mat(),
        qb.mat(),
        &mut c3,
        shape(m, n, k, false, false),
        128,
    )
    .unwrap();
    for (u, v) in c2.iter().zip(&c3) {
        assert_eq!(*u, bf16_round(v + 1.0));
    }
}

#[test]
fn grouped_f32_and_fp8_segment_m() {
    let (n, k) = (70, 200);
    let offsets = [0i32, 5, 5, 140, 141, 300];
    let (e, m) = (offsets.len() - 1, 300);
    let a = random(m * k, 13);
    let b = random(e * k * n, 14);
    for tb in [false, true] {
        let mut c = vec![f32::NAN; m * n];
        grouped_gemm_f32(
            &a,
            &b,
            &mut c,
            Groups {
                offsets: &offsets,
                segment: Segment::M,
            },
            shape(m, n, k, false, tb),
            Inputs::F32,
        )
        .unwrap();
        let f = Fp8Format::E4M3;
        let qa = Q::new(&a, m, k, Group::Tile, f, None);
        let (br, bc) = if tb { (n, k) } else { (k, n) };
        let qbs: Vec<Q> = (0..e)
            .map(|i| {
                Q::new(
                    &b[i * k * n..(i + 1) * k * n],
                    br,
                    bc,
                    Group::Block,
                    f,
                    None,
                )
            })
            .collect();
        let qb = Q {
            q: qbs.iter().flat_map(|q| q.q.clone()).collect(),
            s: qbs.iter().flat_map(|q| q.s.clone()).collect(),
            g: Group::Block,
            f,
        };
        let mut c8 = vec![f32::NAN; m * n];
        grouped_gemm_fp8(
            qa.mat(),
            qb.mat(),
            &mut c8,
            Groups {
                offsets: &offsets,
                segment: Segment::M,
            },
            shape(m, n, k, false, tb),
            128,
        )
        .unwrap();
        for (ei, w) in offsets.windows(2).enumerate() {
            let (o, len) = (w[0] as usize, (w[1] - w[0]) as usize);
            let bb = &b[ei * k * n..(ei + 1) * k * n];
            let (want, mag) = naive(&a[o * k..(o + len) * k], bb, &shape(len, n, k, false, tb));
            assert_close(&c[o * n..(o + len) * n], &want, &mag, 1e-5, "grouped m f32");
            let qae = Q::new(&a[o * k..(o + len) * k], len, k, Group::Tile, f, None);
            let (want8, mag8) = fp8_ref(&qae, &qbs[ei], &shape(len, n, k, false, tb), 128);
            assert_close(
                &c8[o * n..(o + len) * n],
                &want8,
                &mag8,
                2e-6,
                "grouped m fp8",
            );
        }
    }
}

#[test]
fn grouped_f32_and_fp8_segment_k() {
    let (m, n) = (33, 130);
    let offsets = [0i32, 0, 1, 130, 130, 386];
    let (e, k) = (offsets.len() - 1, 386);
    let a = random(k * m, 15);
    let b = random(k * n, 16);
    let mut c = vec![f32::NAN; e * m * n];
    grouped_gemm_f32(
        &a,
        &b,
        &mut c,
        Groups {
            offsets: &offsets,
            segment: Segment::K,
        },
        shape(m, n, k, true, false),
        Inputs::F32,
    )
    .unwrap();
    let f = Fp8Format::E4M3;
    let qa = Q::new(&a, k, m, Group::ColumnTile, f, Some(&offsets));
    let qb = Q::new(&b, k, n, Group::ColumnTile, f, Some(&offsets));
    let mut c8 = vec![f32::NAN; e * m * n];
    grouped_gemm_fp8(
        qa.mat(),
        qb.mat(),
        &mut c8,
        Groups {
            offsets: &offsets,
            segment: Segment::K,
        },
        shape(m, n, k, true, false),
        128,
    )
    .unwrap();
    for (ei, w) in offsets.windows(2).enumerate() {
        let (o, len) = (w[0] as usize, (w[1] - w[0]) as usize);
        let (ae, be) = (&a[o * m..(o + len) * m], &b[o * n..(o + len) * n]);
        let (want, mag) = naive(ae, be, &shape(m, n, len, true, false));
        assert_close(
            &c[ei * m * n..(ei + 1) * m * n],
            &want,
            &mag,
            1e-5,
            "grouped k f32",
        );
        // Each segment quantised on its own equals the segmented quantisation.
        let (qae, qbe) = (
            Q::new(ae, len, m, Group::ColumnTile, f, None),
            Q::new(be, len, n, Group::ColumnTile, f, None),
        );
        let (want8, mag8) = fp8_ref(&qae, &qbe, &shape(m, n, len, true, false), 128);
        assert_close(
            &c8[ei * m * n..(ei + 1) * m * n],
            &want8,
            &mag8,
            2e-6,
            "grouped k fp8",
        );
        if len == 0 {
            assert!(c8[ei * m * n..(ei + 1) * m * n].iter().all(|v| *v == 0.0));
        }
    }
}

/// `cargo test --release -- --ignored --nocapture bench` prints GFLOP/s at the model's shapes.
#[test]
#[ignore]
fn bench() {
    for (m, n, k) in [
        (2048, 512, 128),
        (2048, 128, 512),
        (2048, 256, 128),
        (2048, 2048, 2048),
    ] {
        for (ta, tb) in [(false, false), (true, false), (false, true)] {
            let mut line = format!("{m}x{n}x{k} ta={ta:<5} tb={tb:<5}");
            for p in ["fp32", "bf16", "fp8"] {
                let ms = super::bench::bench_gemm(p, shape(m, n, k, ta, tb), 20).unwrap();
                line += &format!(
                    "  {p} {ms:7.3} ms {:6.1} GF",
                    2.0 * (m * n * k) as f64 / ms / 1e6
                );
            }
            println!("{line}");
        }
    }
}

/// Min-of-N timings of the pieces of the FP8 GEMM (for tuning; robust to a busy machine).
#[test]
#[ignore]
fn bench_parts() {
    use std::time::Instant;
    let best = |f: &mut dyn FnMut()| {
        let mut b = f64::MAX;
        for _ in 0..30 {
            let t = Instant::now();
            f();
            b = b.min(t.elapsed().as_secs_f64() * 1e3);
        }
        b
    };
    let q: Vec<u8> = (0..1 << 20).map(|i| (i * 37 % 256) as u8).collect();
    let mut out = vec![0f32; q.len()];
    for _ in 0..2 {
        let t = best(&mut || super::fp8::decode_slice(&q, Fp8Format::E4M3, &mut out));
        let tab = Fp8Format::E4M3.table();
        let t2 = best(&mut || {
            for (o, &c) in out.iter_mut().zip(&q) {
                *o = tab[c as usize];
            }
            std::hint::black_box(&out);
        });
        let t3 = best(&mut || {
            out.fill(std::hint::black_box(2.0));
            std::hint::black_box(&out);
        });
        println!("1M: decode {t:.3} ms, table {t2:.3} ms, fill {t3:.3} ms (1 thread)");
    }
    if std::env::var("PARTS_ONLY").is_ok() {
        return;
    }
    for (m, n, k) in [
        (2048, 512, 128),
        (2048, 128, 512),
        (2048, 256, 128),
        (2048, 2048, 2048),
    ] {
        for (ta, tb) in [(false, false), (true, false), (false, true)] {
            let fl = 2.0 * (m * n * k) as f64 / 1e6;
            let t32 = best(&mut || {
                super::bench::bench_gemm("fp32", shape(m, n, k, ta, tb), 1).unwrap();
            });
            let _ = t32;
            let r = |p: &str| fl / super::bench::bench_gemm(p, shape(m, n, k, ta, tb), 15).unwrap();
            println!(
                "{m}x{n}x{k} {ta} {tb}: fp32 {:.1} bf16 {:.1} fp8 {:.1} GF",
                r("fp32"),
                r("bf16"),
                r("fp8")
            );
        }
    }
}
