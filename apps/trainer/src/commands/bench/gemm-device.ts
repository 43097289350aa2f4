// `moe8 bench gemm --backend cuda`: the GEMMs one training step of `small` runs, each in its three
// roles (Fprop, Dgrad, Wgrad) and in BF16 and FP8, plus the grouped expert GEMMs. Reported as
// TFLOP/s and as the ratio FP8 / BF16 measured in the same run (the BF16 baseline is cuBLASLt for
// the dense shapes). On a Hopper GPU the experts' FP8 Fprop and Dgrad run the sm90 wgmma kernels;
// their rows then also time the mma.sync kernels (MOE8_SM90_GEMM=0) in the same run, and each
// expert row names the kernels its FP8 time is from. `--shape experts` times the expert GEMMs only.
import { UsageError } from "@moe8/fp8-core";
import { CudaBackend, sm90DenseChosen } from "@moe8/kernels";
import type { Backend } from "@moe8/tensor";
import { Rng } from "@moe8/tensor";
import { deviceMs, formatRow } from "./timing.ts";

/** Dense GEMMs of `small` at 16,384 tokens per step, MxNxK of the Fprop (N = output features). */
export const SMALL_GEMM_SHAPES = [
  "16384x1536x1024", // q_proj
  "16384x288x1024", // kv_a_proj_with_mqa
  "16384x2048x256", // kv_b_proj
  "16384x1024x1024", // o_proj
  "16384x5632x1024", // dense gate_up_proj (gate and up as one GEMM)
  "16384x1024x2816", // dense down_proj
  "16384x1024x1024", // shared experts gate_up_proj
  "16384x1024x512", // shared experts down
];

/**
 * Routed experts of `small`: 64 experts, 16,384 tokens x 6 choices, moe_intermediate_size 256; the
 * gate and up projections as one grouped GEMM (N = 512), then down.
 */
const EXPERTS = { E: 64, rows: 16384 * 6, shapes: [[512, 1024] as const, [1024, 256] as const] };

type Precision = "bf16" | "fp8";

/** n normal values: a 1M-value pool repeated (timing does not need fresh randomness; JS does not
 *  need to draw 100M normals). */
function normals(rng: Rng, n: number, std = 1): Float32Array {
  const pool = rng.normals(Math.min(n, 1 << 20), std);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += pool.length) out.set(pool.subarray(0, Math.min(pool.length, n - i)), i);
  return out;
}

function dims(shape: string): [number, number, number] {
  const m = /^(\d+)x(\d+)x(\d+)$/.exec(shape);
  if (!m) throw new UsageError(`--shape "${shape}": expected MxNxK, e.g. 16384x1024x1024`);
  return [Number(m[1]), Number(m[2]), Number(m[3])];
}

async function dense(b: Backend, shape: string, p: Precision): Promise<Record<string, number>> {
  const [M, N, K] = dims(shape);
  const rng = new Rng(3);
  return b.scope(async () => {
    const x = b.upload(normals(rng, M * K), [M, K]);
    const w = b.upload(normals(rng, N * K, 0.05), [N, K]);
    const dy = b.upload(normals(rng, M * N), [M, N]);
    const fp8 = p === "fp8";
    const wq = fp8 ? b.quantize(w, { group: "block" }) : w;
    const xq = fp8 ? b.quantize(x, { group: "tile" }) : x;
    const dyq = fp8 ? b.quantize(dy, { group: "tile" }) : dy;
    const dyc = fp8 ? b.quantize(dy, { group: "column-tile" }) : dy;
    const xc = fp8 ? b.quantize(x, { group: "column-tile" }) : x;
    return {
      fprop: await deviceMs(b, () => b.matmul(xq, wq, { transB: true, precision: p })),
      dgrad: await deviceMs(b, () => b.matmul(dyq, wq, { precision: p })),
      wgrad: await deviceMs(b, () => b.matmul(dyc, xc, { transA: true, precision: p })),
    };
  });
}

/**
 * A dense shape's FP8 roles on each Hopper path (cuBLASLt and the sm90 kernels, one run each), and
 * the path `auto` takes per role (the training default).
 */
async function denseFp8Paths(b: CudaBackend, shape: string) {
  const before = b.sm90Dense;
  try {
    b.sm90Dense = "none";
    const lt = await dense(b, shape, "fp8");
    b.sm90Dense = "all";
    const sm90 = await dense(b, shape, "fp8");
    const [M, N, K] = dims(shape);
    // Each role's own output: Fprop M x N, Dgrad M x K, Wgrad N x K.
    const auto = {
      fprop: sm90DenseChosen("fprop", M, N, K),
      dgrad: sm90DenseChosen("dgrad", M, K, N),
      wgrad: sm90DenseChosen("wgrad", N, K, M),
    };
    const pick = (role: keyof typeof auto) => (auto[role] ? sm90[role] : lt[role]);
    const fp8 = { fprop: pick("fprop"), dgrad: pick("dgrad"), wgrad: pick("wgrad") };
    const kernels = Object.fromEntries(
      Object.entries(auto).map(([r, s]) => [r, s ? "sm90-wgmma" : "cublaslt"]),
    ) as Record<string, string>;
    return { fp8, lt, sm90, kernels };
  } finally {
    b.sm90Dense = before;
  }
}

/** Which expert groups `bench gemm --backend cuda` times (--groups). */
export type ExpertGroups = "uneven" | "balanced";

/**
 * The experts' row offsets: uneven loads as after routing, expert sizes drawn from 0.5 to 1.5 times
 * rows / E (the same every run; the JSON reports them, so that PyTorch's grouped GEMM is timed on
 * the same groups: packages/kernels/bench/torch_expert_roles.py --offsets), or "balanced", rows / E
 * each (the groups torch_op_anchors.py times PyTorch on).
 */
export function expertOffsets(groups: ExpertGroups = "uneven"): Int32Array {
  const { E, rows } = EXPERTS;
  if (groups === "balanced") return Int32Array.from({ length: E + 1 }, (_, e) => Math.floor((e * rows) / E));
  const rng = new Rng(4);
  const sizes = Array.from({ length: E }, () => 0.5 + rng.next());
  const total = sizes.reduce((s, v) => s + v, 0);
  const off = new Int32Array(E + 1);
  for (let e = 0; e < E; e++)
    off[e + 1] = e === E - 1 ? rows : off[e] + Math.floor((sizes[e] / total) * rows);
  return off;
}

async function grouped(
  b: Backend,
  N: number,
  K: number,
  p: Precision,
  groups: ExpertGroups,
): Promise<Record<string, number>> {
  const { E, rows } = EXPERTS;
  const off = expertOffsets(groups);
  const rng = new Rng(5);
  return b.scope(async () => {
    const O = b.upload(off, [E + 1], "i32");
    const x = b.upload(normals(rng, rows * K), [rows, K]);
    const w = b.upload(normals(rng, E * N * K, 0.05), [E, N, K]);
    const dy = b.upload(normals(rng, rows * N), [rows, N]);
    const fp8 = p === "fp8";
    const wq = fp8 ? b.quantize(w, { group: "block" }) : w;
    const xq = fp8 ? b.quantize(x, { group: "tile" }) : x;
    const dyq = fp8 ? b.quantize(dy, { group: "tile" }) : dy;
    const dyc = fp8 ? b.quantize(dy, { group: "column-tile", segments: O }) : dy;
    const xc = fp8 ? b.quantize(x, { group: "column-tile", segments: O }) : x;
    // FP8 as the model runs it: Fprop and Dgrad outputs rounded to and stored in BF16 (the experts'
    // activations); f32 storage timed beside it.
    const out = fp8 ? ({ outBf16: true, storeBf16: true } as const) : {};
    const times: Record<string, number> = {
      fprop: await deviceMs(b, () =>
        b.groupedMatmul(xq, wq, O, { segment: "m", transB: true, precision: p, ...out }),
      ),
      dgrad: await deviceMs(b, () => b.groupedMatmul(dyq, wq, O, { segment: "m", precision: p, ...out })),
      wgrad: await deviceMs(b, () =>
        b.groupedMatmul(dyc, xc, O, { segment: "k", transA: true, precision: p }),
      ),
    };
    // The Wgrad as the training step runs it: added into the f32 weight gradient [E, N, K] (which
    // does not fit in L2), not written to a fresh output.
    const grad = b.zeros([E, N, K], "f32");
    times.wgrad_acc = await deviceMs(
      b,
      () => b.groupedMatmul(dyc, xc, O, { segment: "k", transA: true, precision: p, accumulate: grad }),
      10,
      grad,
    );
    if (fp8) {
      times.fprop_f32 = await deviceMs(b, () =>
        b.groupedMatmul(xq, wq, O, { segment: "m", transB: true, precision: p }),
      );
      times.dgrad_f32 = await deviceMs(b, () => b.groupedMatmul(dyq, wq, O, { segment: "m", precision: p }));
      // FP8 outputs with 1x128 scales (storeQuantized: quantised in the GEMM's epilogue on Hopper),
      // and the f32 output quantised by its own kernel after, which it replaces.
      const q = { group: "tile" } as const;
      const fprop = { segment: "m", transB: true, precision: p } as const;
      const dgrad = { segment: "m", precision: p } as const;
      times.fprop_fp8 = await deviceMs(b, () => b.groupedMatmul(xq, wq, O, { ...fprop, storeQuantized: q }));
      times.dgrad_fp8 = await deviceMs(b, () => b.groupedMatmul(dyq, wq, O, { ...dgrad, storeQuantized: q }));
      times.fprop_f32_quant = await deviceMs(b, () => b.quantize(b.groupedMatmul(xq, wq, O, fprop), q));
      times.dgrad_f32_quant = await deviceMs(b, () => b.quantize(b.groupedMatmul(dyq, wq, O, dgrad), q));
    }
    return times;
  });
}

/** The grouped FP8 kernels of a cuda backend per role ("sm90-wgmma" for all three on Hopper). */
function expertKernels(b: Backend): Record<string, string> {
  const path = b instanceof CudaBackend ? b.groupedGemmKernel : "mma.sync";
  return { fprop: path, dgrad: path, wgrad: path };
}

/** The same backend kind with the sm90 grouped GEMM off (MOE8_SM90_GEMM is read at construction). */
function mmaSyncBackend(): CudaBackend {
  const before = process.env.MOE8_SM90_GEMM;
  process.env.MOE8_SM90_GEMM = "0";
  try {
    return new CudaBackend();
  } finally {
    if (before === undefined) delete process.env.MOE8_SM90_GEMM;
    else process.env.MOE8_SM90_GEMM = before;
  }
}

export async function benchGemmDevice(
  b: Backend,
  shapes: string[] | undefined,
  json: boolean,
  groups: ExpertGroups = "uneven",
): Promise<number> {
  const rows: Record<string, unknown>[] = [];
  const report = (
    name: string,
    flops: number,
    t: Record<Precision, Record<string, number>>,
    extra?: {
      kernels: Record<string, string>;
      mmaSync?: Record<string, number>;
      lt?: Record<string, number>;
      sm90?: Record<string, number>;
    },
  ) => {
    for (const role of ["fprop", "dgrad", "wgrad"]) {
      const tf = (ms: number) => +(flops / (ms * 1e9)).toFixed(1);
      const row: Record<string, unknown> = {
        gemm: name,
        role,
        bf16_ms: +t.bf16[role].toFixed(3),
        fp8_ms: +t.fp8[role].toFixed(3),
        bf16_tflops: tf(t.bf16[role]),
        fp8_tflops: tf(t.fp8[role]),
        fp8_vs_bf16: +(t.bf16[role] / t.fp8[role]).toFixed(2),
      };
      if (extra) row.fp8_kernel = extra.kernels[role];
      if (t.fp8[`${role}_f32`] !== undefined) row.fp8_f32_out_tflops = tf(t.fp8[`${role}_f32`]);
      if (t.fp8[`${role}_fp8`] !== undefined) row.fp8_fp8_out_tflops = tf(t.fp8[`${role}_fp8`]);
      if (t.fp8[`${role}_f32_quant`] !== undefined)
        row.fp8_f32_then_quantize_tflops = tf(t.fp8[`${role}_f32_quant`]);
      if (t.bf16[`${role}_acc`] !== undefined) row.bf16_accumulate_tflops = tf(t.bf16[`${role}_acc`]);
      if (t.fp8[`${role}_acc`] !== undefined) row.fp8_accumulate_tflops = tf(t.fp8[`${role}_acc`]);
      if (extra?.lt && extra.sm90) {
        row.fp8_cublaslt_tflops = tf(extra.lt[role]);
        row.fp8_sm90_tflops = tf(extra.sm90[role]);
        row.sm90_vs_cublaslt = +(extra.lt[role] / extra.sm90[role]).toFixed(2);
      }
      if (extra?.mmaSync && extra.kernels[role] !== "mma.sync") {
        row.mma_sync_ms = +extra.mmaSync[role].toFixed(3);
        row.mma_sync_tflops = tf(extra.mmaSync[role]);
        row.fp8_vs_mma_sync = +(extra.mmaSync[role] / t.fp8[role]).toFixed(2);
      }
      rows.push(row);
      if (!json) console.log(formatRow(row));
    }
  };
  const expertsOnly = shapes?.length === 1 && shapes[0] === "experts";
  const hopper = b instanceof CudaBackend && b.groupedGemmKernel === "sm90-wgmma";
  for (const shape of expertsOnly ? [] : (shapes ?? SMALL_GEMM_SHAPES)) {
    const [M, N, K] = dims(shape);
    const bf16 = await dense(b, shape, "bf16");
    if (hopper) {
      const paths = await denseFp8Paths(b, shape);
      report(shape, 2 * M * N * K, { bf16, fp8: paths.fp8 }, paths);
    } else report(shape, 2 * M * N * K, { bf16, fp8: await dense(b, shape, "fp8") });
  }
  const kernels = expertKernels(b);
  const mma = kernels.fprop === "mma.sync" ? null : mmaSyncBackend();
  if (!shapes || expertsOnly)
    for (const [N, K] of EXPERTS.shapes)
      report(
        `experts ${EXPERTS.E}x(${N}x${K}) over ${EXPERTS.rows} rows${groups === "balanced" ? ", balanced" : ""}`,
        2 * EXPERTS.rows * N * K,
        { bf16: await grouped(b, N, K, "bf16", groups), fp8: await grouped(b, N, K, "fp8", groups) },
        { kernels, mmaSync: mma ? await grouped(mma, N, K, "fp8", groups) : undefined },
      );
  const experts =
    !shapes || expertsOnly ? { expert_groups: groups, expert_offsets: [...expertOffsets(groups)] } : {};
  if (json) console.log(JSON.stringify({ backend: b.name, rows, ...experts }));
  return 0;
}
