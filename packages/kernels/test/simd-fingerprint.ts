// A digest of the outputs of the SIMD-dispatched kernels on fixed inputs, so that a test can check
// that the AVX-512, AVX2 and baseline builds of every kernel compute the same bits, and one of the
// BF16/FP8 GEMMs, which the AVX-512 and AVX2 kernels compute alike. Run as a script it prints both
// (the tests run it in child processes with MOE8_SIMD=scalar and MOE8_SIMD=avx2).
import { createHash } from "node:crypto";
import type { Tensor } from "@moe8/tensor";
import { adamwSteps, Rng } from "@moe8/tensor/testing";
import { CpuBackend } from "../src/cpu-backend.ts";
import { requireNative } from "../src/index.ts";

export async function fingerprint(): Promise<string> {
  const be = new CpuBackend();
  const rng = new Rng(42);
  const [B, T, H, dqk, dv] = [2, 150, 3, 40, 24];
  const N = B * T;
  const C = 72;
  const outs: Tensor[] = [];
  const x = be.upload(rng.normals(N * C), [N, C]);
  const y = be.upload(rng.normals(N * C), [N, C]);
  const w = be.upload(rng.normals(C), [C]);
  const acc = be.copy(x);
  be.addInto(acc, y, 0.3);
  const { y: ny, rstd } = be.rmsnorm(x, w, 1e-6);
  const bw = be.rmsnormBackward(y, x, w, rstd);
  // x as a packed gate|up [N, 2 x 36].
  const h = be.swiglu(x);
  outs.push(be.add(x, y), acc, be.scale(x, 0.7), be.sum(x), be.cast(x, "bf16"), ny, rstd, bw.dx, bw.dw);
  outs.push(
    h,
    be.swigluBackward(be.scale(h, 0.5), x),
    be.rope(x, { heads: 3, width: 24, offset: 8, dim: 16, seqLen: T, theta: 1e4 }),
  );
  for (const precision of ["f32", "bf16"] as const) {
    const opts = { batch: B, seq: T, heads: H, scale: 1 / Math.sqrt(dqk), precision };
    const q = be.upload(rng.normals(N * H * dqk), [N, H * dqk]);
    const k = be.upload(rng.normals(N * H * dqk), [N, H * dqk]);
    const v = be.upload(rng.normals(N * H * dv), [N, H * dv]);
    const a = be.attention(q, k, v, opts);
    const g = be.attentionBackward(
      be.upload(rng.normals(N * H * dv), [N, H * dv]),
      q,
      k,
      v,
      a.o,
      a.lse,
      opts,
    );
    outs.push(a.o, a.lse, g.dq, g.dk, g.dv);
  }
  const r = be.router(be.upload(rng.normals(N * 8), [N, 8]), be.upload(rng.normals(8, 0.1), [8]), 2, 1);
  const p = be.moePermute(x, r.topIdx, 8);
  const cb = be.moeCombineBackward(x, p.xs, p.slot, r.weights);
  outs.push(r.scores, r.topIdx, r.weights, p.xs, be.moeCombine(p.xs, p.slot, r.weights), cb.dys, cb.dweights);
  const ce = be.crossEntropy(
    be.upload(rng.normals(N * 77, 3), [N, 77]),
    be.upload(rng.ints(N, 77), [N], "i32"),
    1,
  );
  outs.push(ce.loss, ce.dlogits);
  const clip = be.clipScale([x, y, ce.dlogits], 1);
  outs.push(clip.norm, clip.scale);
  const runs = adamwSteps(be, {
    param: () => be.copy(x),
    grad: y,
    gradScale: clip.scale,
    lr: 1e-2,
    steps: 2,
  });
  for (const r of [runs.f32, runs.bf16]) outs.push(r.p, r.m, r.v);
  return digest(outs);
}

async function digest(outs: Tensor[]): Promise<string> {
  const h = createHash("sha256");
  for (const t of outs) {
    const a = await t.read();
    h.update(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
  }
  return h.digest("hex");
}

/**
 * A digest of the BF16 and FP8 GEMMs (every transposition, accumulate, BF16 output, promotion 128
 * and 64, ragged edges, grouped by expert with an empty expert). The packed AVX-512 and AVX2
 * kernels (kernel512.rs, kernel256.rs) sum in the same order, so both give these bits; the scalar
 * baseline sums without FMA and is not compared.
 */
export async function gemmFingerprint(): Promise<string> {
  const be = new CpuBackend();
  const rng = new Rng(43);
  const outs: Tensor[] = [];
  const [M, N, K] = [203, 75, 300];
  for (const transA of [false, true])
    for (const transB of [false, true]) {
      const a = be.upload(rng.normals(M * K), transA ? [K, M] : [M, K]);
      const b = be.upload(rng.normals(K * N), transB ? [N, K] : [K, N]);
      const acc = be.upload(rng.normals(M * N), [M, N]);
      outs.push(be.matmul(a, b, { transA, transB, precision: "bf16" }));
      outs.push(be.matmul(a, b, { transA, transB, precision: "bf16", outBf16: true }));
      be.matmul(a, b, { transA, transB, precision: "bf16", accumulate: acc });
      outs.push(acc);
      // FP8: A's scales constant along K (1x128 tiles, or 128x1 column tiles when stored [K, M]).
      const qa = be.quantize(a, { group: transA ? "column-tile" : "tile" });
      const qb = be.quantize(b, { group: transB ? "tile" : "column-tile" });
      for (const promotion of [128, 64])
        outs.push(be.matmul(qa, qb, { transA, transB, precision: "fp8", promotion }));
    }
  const off = be.upload(Int32Array.of(0, 70, 70, 203), [4], "i32");
  const x = be.upload(rng.normals(M * K), [M, K]);
  const w = be.upload(rng.normals(3 * N * K), [3, N, K]);
  const dy = be.upload(rng.normals(M * N), [M, N]);
  outs.push(be.groupedMatmul(x, w, off, { segment: "m", transB: true, precision: "bf16" }));
  outs.push(be.groupedMatmul(x, dy, off, { segment: "k", transA: true, precision: "bf16" }));
  const qx = be.quantize(x, { group: "tile" });
  const qw = be.quantize(w, { group: "block" });
  outs.push(be.groupedMatmul(qx, qw, off, { segment: "m", transB: true, precision: "fp8" }));
  const cx = be.quantize(x, { group: "column-tile", segments: off });
  const cdy = be.quantize(dy, { group: "column-tile", segments: off });
  outs.push(be.groupedMatmul(cx, cdy, off, { segment: "k", transA: true, precision: "fp8" }));
  return digest(outs);
}

if (process.argv[1]?.endsWith("simd-fingerprint.ts"))
  console.log(
    JSON.stringify({
      simd: requireNative().info().simd,
      threads: requireNative().info().threads,
      digest: await fingerprint(),
      gemm: await gemmFingerprint(),
    }),
  );
