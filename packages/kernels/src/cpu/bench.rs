//! Timing helper behind the napi `benchGemm` (the `bun run bench gemm` command): median of
//! repeated runs after warm-up, inputs allocated here so JS overheads are not measured.

use super::fp8::Fp8Format;
use super::gemm::{gemm_f32, gemm_fp8, Fp8Mat, GemmParams, Inputs};
use super::quant::{quantize, Fp8Layout, Group, ScaleMode};
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

/// `p` gives the shape and layouts (accumulate and output_bf16 are set here from the precision).
pub fn bench_gemm(precision: &str, p: GemmParams, reps: usize) -> Result<f64, String> {
    let GemmParams { m, n, k, .. } = p;
    let a = random(m * k, 1);
    let b = random(k * n, 2);
    let mut c = vec![0f32; m * n];
    match precision {
        "fp32" | "f32" | "bf16" => {
            let bf = precision == "bf16";
            let p = GemmParams {
                accumulate: false,
                output_bf16: bf,
                ..p
            };
            let inputs = if bf { Inputs::Bf16 } else { Inputs::F32 };
            median_ms(reps, || gemm_f32(&a, &b, &mut c, p, inputs))
        }
        "fp8" => {
            let f = Fp8Format::E4M3;
            let mode = ScaleMode::Amax { eps: 1e-12 };
            let ((ar, ac), (br, bc)) = (p.stored_a(), p.stored_b());
            let ag = if p.trans_a {
                Group::ColumnTile
            } else {
                Group::Tile
            };
            let (mut qa, mut sa) = (vec![0u8; m * k], vec![0f32; ag.scale_count(ar, ac)]);
            let (mut qb, mut sb) = (
                vec![0u8; k * n],
                vec![0f32; Group::Block.scale_count(br, bc)],
            );
            let one = |rows, cols, group| Fp8Layout {
                rows,
                cols,
                batch: 1,
                group,
                format: f,
                segments: None,
            };
            quantize(&a, &one(ar, ac, ag), mode, &mut qa, &mut sa)?;
            quantize(&b, &one(br, bc, Group::Block), mode, &mut qb, &mut sb)?;
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
            let p = GemmParams {
                accumulate: false,
                output_bf16: true,
                ..p
            };
            median_ms(reps, || gemm_fp8(am, bm, &mut c, p, 128))
        }
        _ => Err(format!(
            "unknown precision \"{precision}\" (allowed: fp32, bf16, fp8)"
        )),
    }
}
