// `moe8 bench gemm`: one GEMM per shape and precision on the host backends (ts, cpu), as GFLOP/s
// and as ratios against numpy's OpenBLAS sgemm and the backend's own f32 GEMM measured in the same
// run. `--backend cuda` runs the GPU variant instead (gemm-device.ts).
import { spawnSync } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { UsageError } from "@moe8/fp8-core";
import { createBackend, requireNative } from "@moe8/kernels";
import { type Backend, Rng, type Tensor } from "@moe8/tensor";
import { benchGemmDevice } from "./gemm-device.ts";
import { formatRow, timeIt } from "./timing.ts";

const root = join(dirname(fileURLToPath(import.meta.url)), "../../../../..");

/** MxNxK shapes of the `tiny` model's GEMMs, plus one large square GEMM. */
export const MODEL_GEMM_SHAPES = ["2048x512x128", "2048x128x512", "2048x256x128", "2048x2048x2048"];

function parseShape(s: string): [number, number, number] {
  const m = /^(\d+)x(\d+)x(\d+)$/.exec(s);
  if (!m) throw new UsageError(`--shape "${s}": expected MxNxK, e.g. 2048x512x128`);
  return [Number(m[1]), Number(m[2]), Number(m[3])];
}

/** numpy/OpenBLAS sgemm on the same machine, or null when numpy is not installed. */
function openblas(shapes: string[]): Map<string, number> | null {
  const r = spawnSync("python3", [join(root, "scripts/openblas_gemm.py"), ...shapes], { encoding: "utf8" });
  if (r.status !== 0) return null;
  const out = new Map<string, number>();
  for (const line of r.stdout.trim().split("\n")) {
    const j = JSON.parse(line);
    out.set(j.shape, j.gflops);
  }
  return out;
}

async function timeGemm(
  b: Backend,
  precision: "f32" | "bf16" | "fp8",
  shape: string,
): Promise<{ ms: number; opMs: number; gflops: number }> {
  const [M, N, K] = parseShape(shape);
  const rng = new Rng(1);
  return b.scope(async () => {
    const x = b.upload(rng.normals(M * K), [M, K]);
    const w = b.upload(rng.normals(N * K), [N, K]);
    const [A, B] =
      precision === "fp8" ? [b.quantize(x, { group: "tile" }), b.quantize(w, { group: "block" })] : [x, w];
    const ms = await timeIt(
      async () => {
        await b.scope(async () => {
          const y: Tensor = b.matmul(A, B, { transB: true, precision });
          // Host backends finish inside the call; a device backend is synchronised through one number.
          if (b.name === "cuda") await b.sum(y).item();
        });
      },
      b.name === "ts" ? 3 : 20,
    );
    // The kernel alone, into a preallocated output as numpy's `out=` does (the cpu backend only):
    // the op above also pays for allocating and first-touching a fresh output array.
    const kernelMs =
      b.name === "cpu"
        ? requireNative().benchGemm(precision === "f32" ? "fp32" : precision, M, N, K, false, true, 20)
        : ms;
    return { ms: kernelMs, opMs: ms, gflops: (2 * M * N * K) / (kernelMs * 1e6) };
  });
}

export async function benchGemm(flags: Record<string, unknown>): Promise<number> {
  const backends = flags.backend ? [String(flags.backend)] : ["cpu"];
  const precisions = flags.precision ? [String(flags.precision)] : ["f32", "bf16", "fp8"];
  const shapes = (flags.shape as string[] | undefined) ?? MODEL_GEMM_SHAPES;
  for (const p of precisions)
    if (!["f32", "fp32", "bf16", "fp8"].includes(p))
      throw new UsageError(`--precision "${p}": use fp32, bf16 or fp8`);
  const groups = flags.groups === undefined ? "uneven" : String(flags.groups);
  if (groups !== "uneven" && groups !== "balanced")
    throw new UsageError(`--groups "${groups}": use uneven or balanced`);
  if (backends.length === 1 && backends[0] === "cuda")
    return benchGemmDevice(createBackend("cuda"), flags.shape as string[] | undefined, !!flags.json, groups);
  if (flags.groups !== undefined)
    throw new UsageError("--groups: only `bench gemm --backend cuda` times the experts' grouped GEMMs");
  const rows = [];
  const blas = flags.baseline === false ? null : openblas(shapes);
  for (const name of backends) {
    const b = createBackend(name as "ts" | "cpu");
    for (const shape of shapes) {
      let f32: number | null = null;
      for (const p0 of precisions) {
        const precision = (p0 === "fp32" ? "f32" : p0) as "f32" | "bf16" | "fp8";
        if (b.name === "ts" && shape === "2048x2048x2048") continue; // minutes in plain TypeScript
        const r = await timeGemm(b, precision, shape);
        if (precision === "f32") f32 = r.gflops;
        const row: Record<string, unknown> = {
          op: "matmul",
          backend: b.name,
          precision,
          shape,
          ms: +r.ms.toFixed(3),
          gflops: +r.gflops.toFixed(2),
          op_ms: +r.opMs.toFixed(3),
        };
        const ob = blas?.get(shape);
        if (ob) row.vs_openblas = +(r.gflops / ob).toFixed(3);
        if (precision !== "f32" && f32) row.vs_own_f32 = +(r.gflops / f32).toFixed(3);
        rows.push(row);
        if (!flags.json) console.log(formatRow(row));
      }
    }
  }
  if (blas && !flags.json)
    for (const [s, g] of blas) console.log(`openblas (numpy) sgemm ${s}: ${g.toFixed(1)} GFLOP/s`);
  if (!blas && !flags.json) console.log("numpy not installed: no OpenBLAS baseline (pip install numpy)");
  if (flags.json) console.log(JSON.stringify({ rows, openblas: blas ? Object.fromEntries(blas) : null }));
  return 0;
}
