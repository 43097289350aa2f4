// Diagnoses the cuBLASLt FP8 Fprop path against the tiled kernel on the GPU (not part of the suite).
//   bun packages/kernels/test/lt-fp8-diag.ts
import { Rng, TsBackend } from "@moe8/tensor";
import { CudaBackend } from "../src/cuda-backend.ts";

const rng = new Rng(1);
const ts = new TsBackend();
const cu = new CudaBackend();
function stats(got: Float32Array, want: Float32Array) {
  let nan = 0;
  let maxe = 0;
  let maxw = 0;
  const ratios: number[] = [];
  for (let i = 0; i < want.length; i++) {
    if (!Number.isFinite(got[i])) nan++;
    else maxe = Math.max(maxe, Math.abs(got[i] - want[i]));
    maxw = Math.max(maxw, Math.abs(want[i]));
    if (Math.abs(want[i]) > 1e-3 && i % 97 === 0) ratios.push(got[i] / want[i]);
  }
  ratios.sort((a, b) => a - b);
  return `nonfinite ${nan}/${want.length}, rel err ${(maxe / maxw).toExponential(2)}, ratio median ${ratios[ratios.length >> 1]?.toFixed(4)} min ${ratios[0]?.toFixed(4)} max ${ratios.at(-1)?.toFixed(4)}`;
}
for (const [M, N, K] of [
  [256, 256, 128],
  [256, 384, 256],
  [2048, 512, 128],
])
  for (const variant of ["tile/block", "unit-scales", "tensor", "x-scaled-only", "w-scaled-only"]) {
    const x = rng.normals(M * K);
    const w = rng.normals(N * K, 0.05);
    const run = async (b: TsBackend | CudaBackend) =>
      b.scope(async () => {
        const X = b.upload(x, [M, K]);
        const W = b.upload(w, [N, K]);
        const xo =
          variant === "unit-scales" || variant === "w-scaled-only"
            ? { group: "tile" as const, unit: true }
            : variant === "tensor"
              ? { group: "tensor" as const }
              : { group: "tile" as const };
        const wo =
          variant === "unit-scales" || variant === "x-scaled-only"
            ? { group: "block" as const, unit: true }
            : variant === "tensor"
              ? { group: "tensor" as const }
              : { group: "block" as const };
        return (await b
          .matmul(b.quantize(X, xo), b.quantize(W, wo), { transB: true, precision: "fp8" })
          .read()) as Float32Array;
      });
    const want = await run(ts);
    const got = await run(cu);
    console.log(`${M}x${N}x${K} ${variant.padEnd(14)} ${stats(got, want)}`);
  }
