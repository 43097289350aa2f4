//! Timing helper behind the napi `benchGemm` (the `bun run bench gemm` command): median of
//! repeated runs after warm-up, inputs allocated here so JS overheads are not measured.

use super::fp8::Fp8Format;
use super::gemm::{gemm_f32, gemm_fp8, Fp8Mat};
use super::quant::{quantize, Group, ScaleMode};
use std::time::Instant;

/// Deterministic pseudo-random values in [-1, 1).
pub fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn median_ms(reps: usize, mut f: impl FnMut() -> Result<(), String>) -> Result<f64, String> {
    // Warm-up: at least two runs and ~50 ms (thread pool start, page faults, caches, scratch).
    let t = Instant::now();
    let mut w = 0;
    while w < 2 || t.elapsed().as_secs_f64() < 0.05 {
        f()?;
        w += 1;
    }
    let mut ts = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        ts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ts.sort_by(|a, b| a.total_cmp(b));
    Ok(ts[ts.len() / 2])
}

pub fn bench_gemm(
    precision: &str,
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    reps: usize,
) -> Result<f64, String> {
    let a = random(m * k, 1);
    let b = random(k * n, 2);
    let mut c = vec![0f32; m * n];
    match precision {
        "fp32" | "f32" | "bf16" => {
            let bf = precision == "bf16";
            median_ms(reps, || {
                gemm_f32(&a, &b, &mut c, m, n, k, ta, tb, false, bf, bf)
            })
        }
        "fp8" => {
            let f = Fp8Format::E4M3;
            let mode = ScaleMode::Amax { eps: 1e-12 };
            let (ar, ac) = if ta { (k, m) } else { (m, k) };
            let (br, bc) = if tb { (n, k) } else { (k, n) };
            let ag = if ta { Group::ColumnTile } else { Group::Tile };
            let (mut qa, mut sa) = (vec![0u8; m * k], vec![0f32; ag.scale_count(ar, ac)]);
            let (mut qb, mut sb) = (
                vec![0u8; k * n],
                vec![0f32; Group::Block.scale_count(br, bc)],
            );
            quantize(&a, ar, ac, 1, ag, f, mode, &mut qa, &mut sa, None)?;
            quantize(&b, br, bc, 1, Group::Block, f, mode, &mut qb, &mut sb, None)?;
            let am = Fp8Mat {
                q: &qa,
                scales: &sa,
                group: ag,
                format: f,
            };
            let bm = Fp8Mat {
                q: &qb,
                scales: &sb,
                group: Group::Block,
                format: f,
            };
            median_ms(reps, || {
                gemm_fp8(am, bm, &mut c, m, n, k, ta, tb, false, true, 128)
            })
        }
        _ => Err(format!(
            "unknown precision \"{precision}\" (allowed: fp32, bf16, fp8)"
        )),
    }
}
