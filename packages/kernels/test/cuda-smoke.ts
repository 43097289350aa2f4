// A bun-only check of the cuda backend against the ts reference, without vitest (the fallback of
// scripts/gpu-check.sh when no test runner works on the GPU machine). Run: bun packages/kernels/test/cuda-smoke.ts
// Prints one line per case and exits non-zero on any mismatch (or when no GPU is usable).
import { type Backend, Rng, relErr, type Tensor, TsBackend } from "@moe8/tensor";
import { CudaBackend } from "../src/cuda-backend.ts";

type Case = [name: string, tol: number | "exact", run: (b: Backend) => Record<string, Tensor>];
const rng = new Rng(7);
const T = 256;
const din = 128;
const dout = 256;
const x = rng.normals(T * din);
const w = rng.normals(dout * din, 0.05);
const dy = rng.normals(T * dout);
const wExperts = rng.normals(4 * 64 * din, 0.1);
const off = Int32Array.of(0, 40, 40, 200, 256);

const cases: Case[] = [
  [
    "elementwise",
    1e-6,
    (b) => {
      const X = b.upload(x, [T, din]);
      const acc = b.copy(X);
      b.addInto(acc, X, -0.25);
      return { add: b.add(X, X), acc, scale: b.scale(X, 3), sum: b.sum(X), bf: b.cast(X, "bf16") };
    },
  ],
  [
    "quantize (all groups)",
    "exact",
    (b) => {
      const X = b.upload(x, [T, din]);
      const out: Record<string, Tensor> = {};
      for (const g of ["tile", "block", "column-tile", "row", "tensor"] as const) {
        const q = b.quantize(X, { group: g, format: g === "row" ? "e5m2" : "e4m3" });
        out[`${g}.q`] = q;
        out[`${g}.s`] = q.quant!.scales;
        out[`${g}.d`] = b.dequantize(q);
      }
      return out;
    },
  ],
  [
    "matmul f32/bf16 (cuBLASLt)",
    1e-2,
    (b) => {
      const X = b.upload(x, [T, din]);
      const W = b.upload(w, [dout, din]);
      return {
        f32: b.matmul(X, W, { transB: true, precision: "f32" }),
        bf16: b.matmul(X, W, { transB: true, precision: "bf16", outBf16: true }),
        wgrad: b.matmul(b.upload(dy, [T, dout]), X, { transA: true, precision: "f32" }),
      };
    },
  ],
  [
    "matmul fp8 fprop (cuBLASLt 1x128 x 128x128), dgrad, wgrad",
    1e-2,
    (b) => {
      const X = b.upload(x, [T, din]);
      const W = b.quantize(b.upload(w, [dout, din]), { group: "block" });
      const DY = b.upload(dy, [T, dout]);
      return {
        fprop: b.matmul(b.quantize(X, { group: "tile" }), W, { transB: true, precision: "fp8" }),
        dgrad: b.matmul(b.quantize(DY, { group: "tile" }), W, { precision: "fp8" }),
        wgrad: b.matmul(b.quantize(DY, { group: "column-tile" }), b.quantize(X, { group: "column-tile" }), {
          transA: true,
          precision: "fp8",
        }),
      };
    },
  ],
  [
    "grouped matmul m and k (fp8, device offsets)",
    1e-2,
    (b) => {
      const O = b.upload(off, [5], "i32");
      const X = b.upload(x, [T, din]);
      const W = b.quantize(b.upload(wExperts, [4, 64, din]), { group: "block" });
      return {
        m: b.groupedMatmul(b.quantize(X, { group: "tile" }), W, O, {
          segment: "m",
          transB: true,
          precision: "fp8",
        }),
        k: b.groupedMatmul(
          b.quantize(b.upload(dy, [T, dout]), { group: "column-tile", segments: O }),
          b.quantize(X, { group: "column-tile", segments: O }),
          O,
          { segment: "k", transA: true, precision: "fp8" },
        ),
      };
    },
  ],
  [
    "attention fwd/bwd bf16",
    2e-2,
    (b) => {
      const o = { batch: 2, seq: 64, heads: 2, scale: 0.125, precision: "bf16" as const };
      const Q = b.upload(x.subarray(0, 128 * 128), [128, 128]);
      const K = b.upload(x.subarray(128 * 128 - 1000, 256 * 128 - 1000), [128, 128]);
      const V = b.upload(dy.subarray(0, 128 * 128), [128, 128]);
      const r = b.attention(Q, K, V, o);
      const g = b.attentionBackward(
        b.upload(dy.subarray(5, 5 + 128 * 128), [128, 128]),
        Q,
        K,
        V,
        r.o,
        r.lse,
        o,
      );
      return { o: r.o, lse: r.lse, ...g };
    },
  ],
  [
    "router, permute, combine, cross-entropy",
    2e-5,
    (b) => {
      const r = b.router(b.upload(dy.subarray(0, T * 8), [T, 8]), b.zeros([8]), 2, 1);
      const p = b.moePermute(b.upload(x, [T, din]), r.topIdx, 8);
      const ce = b.crossEntropy(
        b.upload(dy.subarray(0, 64 * 100), [64, 100]),
        b.upload(
          Int32Array.from({ length: 64 }, (_, i) => i),
          [64],
          "i32",
        ),
        1,
      );
      return { ...r, ...p, y: b.moeCombine(p.xs, p.slot, r.weights), loss: ce.loss, dl: ce.dlogits };
    },
  ],
];

async function main(): Promise<number> {
  let cuda: CudaBackend;
  try {
    cuda = new CudaBackend();
  } catch (e) {
    console.log(`cuda-smoke: ${(e as Error).message}`);
    return 1;
  }
  const ref = new TsBackend();
  let failed = 0;
  for (const [name, tol, run] of cases) {
    try {
      const read = (b: Backend) =>
        b.scope(async () => {
          const out: [string, ArrayLike<number>][] = [];
          for (const [k, t] of Object.entries(run(b))) out.push([k, await t.read()]);
          return out;
        });
      const want = await read(ref);
      const got = await read(cuda);
      const bad: string[] = [];
      for (let i = 0; i < want.length; i++) {
        const [k, wv] = want[i];
        const gv = got[i][1];
        if (tol === "exact" || !(wv instanceof Float32Array)) {
          if (
            wv.length !== gv.length ||
            Array.from(wv).some((v, j) => !Object.is(v, gv[j]) && !(Number.isNaN(v) && Number.isNaN(gv[j])))
          )
            bad.push(`${k} not bit-exact`);
        } else {
          const e = relErr(gv as Float32Array, wv);
          if (!(e <= tol)) bad.push(`${k} rel err ${e}`);
        }
      }
      console.log(`${bad.length ? "FAIL" : "ok  "} ${name}${bad.length ? `: ${bad.join(", ")}` : ""}`);
      if (bad.length) failed++;
    } catch (e) {
      console.log(`FAIL ${name}: ${(e as Error).stack}`);
      failed++;
    }
  }
  console.log(
    `cuda-smoke: ${cases.length - failed} passed, ${failed} failed; peak device memory ${cuda.peakMemory()} bytes`,
  );
  return failed ? 1 : 0;
}

process.exit(await main());
