//! Unit tests of the non-GEMM kernels against direct f64 formulas (the op suite in TypeScript
//! compares every op with the ts reference; these catch kernel bugs without a JS runtime).

use super::attention::{attention_backward, attention_forward, Dims, Grads, Saved};
use super::{elementwise, moe, nn, optim};

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

fn max_rel(a: &[f32], b: &[f64]) -> f64 {
    let m = b.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0f64, |d, (&x, &y)| d.max((x as f64 - y).abs()))
        / m
}

/// Naive causal attention in f64: o, lse, and the gradients for dO.
#[allow(clippy::type_complexity)]
fn naive(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_o: &[f32],
    d: &Dims,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (b, t, h, dqk, dv) = (d.b, d.t, d.h, d.dqk, d.dv);
    let sc = d.scale as f64;
    let mut o = vec![0f64; b * t * h * dv];
    let mut lse = vec![0f64; b * h * t];
    let mut dq = vec![0f64; q.len()];
    let mut dk = vec![0f64; k.len()];
    let mut dvv = vec![0f64; v.len()];
    for bb in 0..b {
        for hh in 0..h {
            for i in 0..t {
                let qi = ((bb * t + i) * h + hh) * dqk;
                let oi = ((bb * t + i) * h + hh) * dv;
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        let kj = ((bb * t + j) * h + hh) * dqk;
                        (0..dqk)
                            .map(|c| q[qi + c] as f64 * k[kj + c] as f64)
                            .sum::<f64>()
                            * sc
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
                lse[(bb * h + hh) * t + i] = m + l.ln();
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / l).collect();
                for (j, &pj) in p.iter().enumerate() {
                    let vj = ((bb * t + j) * h + hh) * dv;
                    for c in 0..dv {
                        o[oi + c] += pj * v[vj + c] as f64;
                    }
                }
                let dd: f64 = (0..dv).map(|c| d_o[oi + c] as f64 * o[oi + c]).sum();
                for (j, &pj) in p.iter().enumerate() {
                    let vj = ((bb * t + j) * h + hh) * dv;
                    let kj = ((bb * t + j) * h + hh) * dqk;
                    let dp: f64 = (0..dv).map(|c| d_o[oi + c] as f64 * v[vj + c] as f64).sum();
                    for c in 0..dv {
                        dvv[vj + c] += pj * d_o[oi + c] as f64;
                    }
                    let ds = pj * (dp - dd) * sc;
                    for c in 0..dqk {
                        dq[qi + c] += ds * k[kj + c] as f64;
                        dk[kj + c] += ds * q[qi + c] as f64;
                    }
                }
            }
        }
    }
    (o, lse, dq, dk, dvv)
}

#[test]
fn attention_matches_naive_f64_and_is_repeatable() {
    for &(b, t, h, dqk, dv) in &[
        (1, 1, 1, 1, 1),
        (2, 19, 3, 24, 16),
        (1, 130, 2, 48, 32),
        (2, 64, 1, 17, 40),
    ] {
        let d = Dims {
            b,
            t,
            tk: t,
            h,
            dqk,
            dv,
            scale: 1.0 / (dqk as f32).sqrt(),
            lowp: false,
        };
        let q = rand(b * t * h * dqk, 1);
        let k = rand(b * t * h * dqk, 2);
        let v = rand(b * t * h * dv, 3);
        let d_o = rand(b * t * h * dv, 4);
        let mut o = vec![0f32; v.len()];
        let mut lse = vec![0f32; b * h * t];
        attention_forward(&q, &k, &v, d, &mut o, &mut lse).unwrap();
        let (mut dq, mut dk, mut dvv) = (
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        let saved = Saved {
            q: (&q).into(),
            k: (&k).into(),
            v: (&v).into(),
            o: (&o).into(),
            lse: &lse,
        };
        let grads = Grads {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dvv,
        };
        attention_backward(&d_o, saved, d, grads).unwrap();
        let (no, nl, ndq, ndk, ndv) = naive(&q, &k, &v, &d_o, &d);
        for (name, got, want) in [
            ("o", &o, &no),
            ("lse", &lse, &nl),
            ("dq", &dq, &ndq),
            ("dk", &dk, &ndk),
            ("dv", &dvv, &ndv),
        ] {
            let e = max_rel(got, want);
            assert!(
                e < 2e-6,
                "{name} for {:?}: relative error {e}",
                (b, t, h, dqk, dv)
            );
        }
        let mut o2 = vec![0f32; v.len()];
        let mut lse2 = vec![0f32; lse.len()];
        attention_forward(&q, &k, &v, d, &mut o2, &mut lse2).unwrap();
        assert_eq!(o, o2);
        assert_eq!(lse, lse2);
    }
}

#[test]
fn attention_bf16_stays_close() {
    let (b, t, h, dqk, dv) = (2, 70, 2, 32, 16);
    let d = Dims {
        b,
        t,
        tk: t,
        h,
        dqk,
        dv,
        scale: 0.2,
        lowp: true,
    };
    let q = rand(b * t * h * dqk, 5);
    let k = rand(b * t * h * dqk, 6);
    let v = rand(b * t * h * dv, 7);
    let d_o = rand(b * t * h * dv, 8);
    let mut o = vec![0f32; v.len()];
    let mut lse = vec![0f32; b * h * t];
    attention_forward(&q, &k, &v, d, &mut o, &mut lse).unwrap();
    let (no, ..) = naive(&q, &k, &v, &d_o, &d);
    assert!(max_rel(&o, &no) < 2e-2);
}

/// Fewer queries than keys (a KV-cache decode step): the last tq queries of a full forward over tk
/// positions, bit for bit, since each query row runs over the same key tiles in the same order.
#[test]
fn attention_with_fewer_queries_equals_the_full_forward_rows() {
    for lowp in [false, true] {
        for &(b, tk, tq, h, dqk, dv) in &[
            (1, 1, 1, 1, 8, 8),
            (2, 19, 1, 3, 24, 16),
            (1, 130, 1, 2, 48, 32),
            (2, 130, 5, 2, 17, 40),
            (1, 200, 70, 2, 32, 16),
        ] {
            let full = Dims {
                b,
                t: tk,
                tk,
                h,
                dqk,
                dv,
                scale: 1.0 / (dqk as f32).sqrt(),
                lowp,
            };
            let q = rand(b * tk * h * dqk, 11);
            let k = rand(b * tk * h * dqk, 12);
            let v = rand(b * tk * h * dv, 13);
            let mut o = vec![0f32; v.len()];
            let mut lse = vec![0f32; b * h * tk];
            attention_forward(&q, &k, &v, full, &mut o, &mut lse).unwrap();
            let part = Dims { t: tq, ..full };
            let (rq, ro) = (h * dqk, h * dv);
            let mut qs = Vec::new();
            for bb in 0..b {
                qs.extend_from_slice(&q[(bb * tk + tk - tq) * rq..(bb + 1) * tk * rq]);
            }
            let mut o2 = vec![0f32; b * tq * ro];
            let mut lse2 = vec![0f32; b * h * tq];
            attention_forward(&qs, &k, &v, part, &mut o2, &mut lse2).unwrap();
            for bb in 0..b {
                assert_eq!(
                    &o2[bb * tq * ro..(bb + 1) * tq * ro],
                    &o[(bb * tk + tk - tq) * ro..(bb + 1) * tk * ro],
                    "o of {:?}",
                    (b, tk, tq, h, lowp)
                );
                for hh in 0..h {
                    assert_eq!(
                        &lse2[(bb * h + hh) * tq..][..tq],
                        &lse[(bb * h + hh) * tk + tk - tq..][..tq],
                        "lse of {:?}",
                        (b, tk, tq, h, lowp)
                    );
                }
            }
        }
    }
    // The backward takes as many keys as queries.
    let d = Dims {
        b: 1,
        t: 1,
        tk: 2,
        h: 1,
        dqk: 4,
        dv: 4,
        scale: 0.5,
        lowp: false,
    };
    let (q, kv, o, lse) = (vec![0f32; 4], vec![0f32; 8], vec![0f32; 4], vec![0f32; 1]);
    let saved = Saved {
        q: (&q).into(),
        k: (&kv).into(),
        v: (&kv).into(),
        o: (&o).into(),
        lse: &lse,
    };
    let (mut dq, mut dk, mut dvv) = (vec![0f32; 4], vec![0f32; 8], vec![0f32; 8]);
    let grads = Grads {
        dq: &mut dq,
        dk: &mut dk,
        dv: &mut dvv,
    };
    assert!(attention_backward(&o, saved, d, grads).is_err());
}

#[test]
fn reductions_are_independent_of_thread_count() {
    let x = rand(300_001, 9);
    let s1 = elementwise::sum(&x);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let s2 = pool.install(|| elementwise::sum(&x));
    assert_eq!(s1.to_bits(), s2.to_bits());
    let (n1, _) = optim::clip_scale(&[&x, &x[..1000]], 1.0);
    let (n2, _) = pool.install(|| optim::clip_scale(&[&x, &x[..1000]], 1.0));
    assert_eq!(n1.to_bits(), n2.to_bits());
    let want: f64 = x.iter().map(|&v| v as f64).sum();
    assert!((s1 - want).abs() < 1e-9);
}

#[test]
fn embedding_backward_adds_in_token_order() {
    let (vocab, d) = (5, 3);
    let ids = [0, 3, 3, 1, 0, 2, 3];
    let dy = rand(ids.len() * d, 10);
    let mut dw = rand(vocab * d, 11);
    let mut want = dw.clone();
    for (n, &i) in ids.iter().enumerate() {
        for c in 0..d {
            want[i as usize * d + c] += dy[n * d + c];
        }
    }
    nn::embedding_backward(&mut dw, vocab, d, &dy, &ids).unwrap();
    assert_eq!(dw, want);
    assert!(nn::embedding_backward(&mut dw, vocab, d, &dy, &[0, 1, 2, 3, 4, 5, 0]).is_err());
}

#[test]
fn router_breaks_ties_toward_the_lower_index_and_permute_groups_by_expert() {
    let (n, e, k) = (3, 4, 2);
    let logits = [
        0.0f32, 1.0, 1.0, 0.5, 2.0, 2.0, 2.0, 2.0, -1.0, 0.0, 3.0, 0.0,
    ];
    let bias = [0f32; 4];
    let (mut s, mut top, mut w) = (vec![0f32; n * e], vec![0i32; n * k], vec![0f32; n * k]);
    let r = moe::Routing {
        n,
        e,
        k,
        scaling: 1.0,
    };
    moe::router(&logits, &bias, &r, &mut s, &mut top, &mut w).unwrap();
    assert_eq!(top, vec![1, 2, 0, 1, 2, 1]);
    for r in 0..n {
        assert!((w[r * k] + w[r * k + 1] - 1.0).abs() < 1e-6);
    }
    let x: Vec<f32> = (0..n * 2).map(|v| v as f32).collect();
    let (mut xs, mut slot, mut off) = (vec![0f32; n * k * 2], vec![0i32; n * k], vec![0i32; e + 1]);
    let p = moe::Dispatch {
        n,
        d: 2,
        k,
        experts: e,
    };
    moe::permute(&x, &top, &p, &mut xs, &mut slot, &mut off).unwrap();
    assert_eq!(off, vec![0, 1, 4, 6, 6]);
    assert_eq!(slot, vec![2, 0, 3, 5, 1, 4]);
    assert_eq!(&xs[..4], &[2.0, 3.0, 0.0, 1.0]);
}

#[test]
fn cross_entropy_matches_f64() {
    let (n, v) = (7, 33);
    let logits = rand(n * v, 12);
    let targets: Vec<i32> = (0..n as i32).map(|i| (i * 5) % v as i32).collect();
    let mut dl = vec![0f32; n * v];
    let loss = moe::cross_entropy(&logits, &targets, n, v, 1.0, &mut dl).unwrap();
    let mut want = 0f64;
    for r in 0..n {
        let row = &logits[r * v..][..v];
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
        want += m + z.ln() - row[targets[r] as usize] as f64;
        let gsum: f64 = dl[r * v..][..v].iter().map(|&x| x as f64).sum();
        assert!(gsum.abs() < 1e-6);
    }
    assert!((loss - want / n as f64).abs() < 1e-6);
}

/// BF16 codes as inputs give the bits of f32 inputs holding the same values, in both precisions.
#[test]
fn attention_reads_bf16_codes_as_their_values() {
    use super::attention::Src;
    use super::util::{bf16_bits, bf16_to_f32};
    let (b, t, h, dqk, dv) = (2, 70, 3, 24, 40);
    let codes =
        |n: usize, seed: u64| -> Vec<u16> { rand(n, seed).iter().map(|&x| bf16_bits(x)).collect() };
    let (q, k, v, d_o) = (
        codes(b * t * h * dqk, 21),
        codes(b * t * h * dqk, 22),
        codes(b * t * h * dv, 23),
        codes(b * t * h * dv, 24),
    );
    let vals = |c: &[u16]| -> Vec<f32> { c.iter().map(|&x| bf16_to_f32(x)).collect() };
    let (qf, kf, vf, dof) = (vals(&q), vals(&k), vals(&v), vals(&d_o));
    for lowp in [false, true] {
        let d = Dims {
            b,
            t,
            tk: t,
            h,
            dqk,
            dv,
            scale: 0.2,
            lowp,
        };
        let run = |q: Src, k: Src, v: Src, d_o: Src| {
            let mut o = vec![0f32; b * t * h * dv];
            let mut lse = vec![0f32; b * h * t];
            attention_forward(q, k, v, d, &mut o, &mut lse).unwrap();
            let (mut dq, mut dk, mut dvv) = (
                vec![0f32; q.len()],
                vec![0f32; k.len()],
                vec![0f32; v.len()],
            );
            let saved = Saved {
                q,
                k,
                v,
                o: (&o).into(),
                lse: &lse,
            };
            let grads = Grads {
                dq: &mut dq,
                dk: &mut dk,
                dv: &mut dvv,
            };
            attention_backward(d_o, saved, d, grads).unwrap();
            [o, lse, dq, dk, dvv]
        };
        let from_codes = run(Src::Bf16(&q), Src::Bf16(&k), Src::Bf16(&v), Src::Bf16(&d_o));
        let from_values = run((&qf).into(), (&kf).into(), (&vf).into(), (&dof).into());
        let bits = |x: &[Vec<f32>; 5]| -> Vec<Vec<u32>> {
            x.iter()
                .map(|a| a.iter().map(|v| v.to_bits()).collect())
                .collect()
        };
        assert!(bits(&from_codes) == bits(&from_values), "lowp {lowp}");
    }
}
