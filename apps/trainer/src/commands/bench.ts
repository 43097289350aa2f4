// `moe8 bench gemm|ops|step`: benchmarks reported as numbers and as ratios against a baseline
// measured in the same run (never asserted by timed tests).
import { spawnSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { UsageError } from "@moe8/fp8-core";
import { type CudaBackend, createBackend, requireNative } from "@moe8/kernels";
import { CONFIGS, countParams, type ModelConfig, STEP_SHAPES, trainStep } from "@moe8/model";
import { type Backend, BYTES_PER_ELEMENT, Rng, Tensor, TsBackend } from "@moe8/tensor";
import { parseArgs } from "../args.ts";
import { DEFAULTS, resolveModel, type TrainConfig } from "../run/config.ts";
import { buildSession } from "../run/session.ts";
import { benchGemmDevice } from "./bench-gemm-device.ts";

const root = join(dirname(fileURLToPath(import.meta.url)), "../../../..");

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

/** Median wall time of `fn` in ms after warm-up runs; stops early after `budgetMs`. */
async function timeIt(fn: () => Promise<void> | void, reps: number, budgetMs = 4000): Promise<number> {
  await fn();
  const times: number[] = [];
  const start = performance.now();
  for (let i = 0; i < reps && (i < 3 || performance.now() - start < budgetMs); i++) {
    const t = performance.now();
    await fn();
    times.push(performance.now() - t);
  }
  return median(times);
}

function parseShape(s: string): [number, number, number] {
  const m = /^(\d+)x(\d+)x(\d+)$/.exec(s);
  if (!m) throw new UsageError(`--shape "${s}": expected MxNxK, e.g. 2048x512x128`);
  return [Number(m[1]), Number(m[2]), Number(m[3])];
}

export const MODEL_GEMM_SHAPES = ["2048x512x128", "2048x128x512", "2048x256x128", "2048x2048x2048"];

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

async function benchGemm(
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

async function gemm(flags: Record<string, unknown>): Promise<number> {
  const backends = flags.backend ? [String(flags.backend)] : ["cpu"];
  const precisions = flags.precision ? [String(flags.precision)] : ["f32", "bf16", "fp8"];
  const shapes = (flags.shape as string[] | undefined) ?? MODEL_GEMM_SHAPES;
  for (const p of precisions)
    if (!["f32", "fp32", "bf16", "fp8"].includes(p))
      throw new UsageError(`--precision "${p}": use fp32, bf16 or fp8`);
  if (backends.length === 1 && backends[0] === "cuda")
    return benchGemmDevice(createBackend("cuda"), flags.shape as string[] | undefined, !!flags.json);
  const rows = [];
  const blas = flags.baseline === false ? null : openblas(shapes);
  for (const name of backends) {
    const b = createBackend(name as "ts" | "cpu");
    for (const shape of shapes) {
      let f32: number | null = null;
      for (const p0 of precisions) {
        const precision = (p0 === "fp32" ? "f32" : p0) as "f32" | "bf16" | "fp8";
        if (b.name === "ts" && shape === "2048x2048x2048") continue; // minutes in plain TypeScript
        const r = await benchGemm(b, precision, shape);
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
        if (!flags.json)
          console.log(
            Object.entries(row)
              .map(([k, v]) => `${k}=${v}`)
              .join("  "),
          );
      }
    }
  }
  if (blas && !flags.json)
    for (const [s, g] of blas) console.log(`openblas (numpy) sgemm ${s}: ${g.toFixed(1)} GFLOP/s`);
  if (!blas && !flags.json) console.log("numpy not installed: no OpenBLAS baseline (pip install numpy)");
  if (flags.json) console.log(JSON.stringify({ rows, openblas: blas ? Object.fromEntries(blas) : null }));
  return 0;
}

/** Training FLOPs per token: 6 x active matmul parameters (the embedding lookup is not a GEMM) plus
 *  causal attention (QK^T and PV over T/2 keys on average, x3 for forward and backward). */
export function trainFlopsPerToken(c: ModelConfig, seq: number): number {
  const { active } = countParams(c);
  const matmul = active - c.vocab_size * c.hidden_size;
  const attn =
    3 *
    seq *
    c.num_attention_heads *
    (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) *
    c.num_hidden_layers;
  return 6 * matmul + attn;
}

/** The issue's measured H200 ceilings (cuBLASLt, TFLOP/s): FP8 with 1x128/128x128 scaling, BF16. */
const CEILINGS = { fp8: 1320, bf16: 800 };

/** One op class of a step profile: time, calls. */
interface OpTime {
  op: string;
  ms: number;
  calls: number;
}

/** Tensor bytes live at the step's peak, grouped by the op class that created them. */
interface LiveAtPeak {
  made_by: string;
  mb: number;
  tensors: number;
}

/**
 * Time per op class over one training step: every backend method is timed (and a device backend
 * synchronised after each op, which slows the step but attributes the time), then restored. Also
 * the memory at the step's peak: which op classes made the tensors that were live then.
 */
async function profileStep(
  b: Backend,
  run: () => Promise<unknown>,
): Promise<{ ops: OpTime[]; peakMb: number; liveAtPeak: LiveAtPeak[] }> {
  const rec = b as unknown as Record<string, unknown>;
  const sync = (b as { synchronize?: () => void }).synchronize?.bind(b);
  const liveTensors = (b as { liveTensors?: () => Tensor[] }).liveTensors?.bind(b);
  const stats = b.stats.bind(b);
  // The Backend interface's ops (the reference backend implements exactly those, plus two private
  // helpers); a backend's own helpers would be counted twice inside the ops that call them.
  const bookkeeping = [
    "constructor",
    "gemmInto",
    "finish",
    "stats",
    "peakBytes",
    "resetPeakBytes",
    "liveTensors",
  ];
  const ops = Object.getOwnPropertyNames(TsBackend.prototype).filter((k) => !bookkeeping.includes(k));
  const names = ops.filter((k) => typeof rec[k] === "function");
  const lifetimes = new Set(["scope", "keep", "release", "reshape", "read", "write"]);

  const acc = new Map<string, { ms: number; calls: number }>();
  const madeBy = new WeakMap<Tensor, string>();
  const tag = (x: unknown, key: string) => {
    const one = (t: unknown) => {
      if (!(t instanceof Tensor)) return;
      if (!madeBy.has(t)) madeBy.set(t, key);
      if (t.quant && !madeBy.has(t.quant.scales)) madeBy.set(t.quant.scales, key);
    };
    one(x);
    if (x && typeof x === "object" && !(x instanceof Tensor)) for (const v of Object.values(x)) one(v);
  };
  // What exists before the step (parameters, gradients, optimiser state, inputs) keeps that name,
  // also when an op returns it again (a GEMM accumulating into a gradient).
  const before = "(before the step: parameters, gradients, optimiser state, inputs)";
  for (const t of liveTensors?.() ?? []) madeBy.set(t, before);
  let peak = stats().bytes;
  let liveAtPeak = new Map<string, { bytes: number; tensors: number }>();
  const snapshot = () => {
    const bytes = stats().bytes;
    if (bytes <= peak || !liveTensors) return;
    peak = bytes;
    liveAtPeak = new Map();
    for (const t of liveTensors()) {
      const k = madeBy.get(t) ?? "(made outside any op)";
      const e = liveAtPeak.get(k) ?? { bytes: 0, tensors: 0 };
      e.bytes += t.size * BYTES_PER_ELEMENT[t.dtype];
      e.tensors++;
      liveAtPeak.set(k, e);
    }
  };
  for (const k of names) {
    const f = (rec[k] as (...a: unknown[]) => unknown).bind(b);
    rec[k] = (...a: unknown[]) => {
      const t = performance.now();
      const r = f(...a);
      sync?.();
      // The options object names the variant: precision for GEMMs, group (and segments) for quantize.
      const o = a.find(
        (x) => x && typeof x === "object" && ("precision" in (x as object) || "group" in (x as object)),
      ) as { precision?: string; group?: string; segments?: unknown } | undefined;
      const variant = o?.precision ?? (o?.group ? `${o.group}${o.segments ? "+segments" : ""}` : "");
      const key = variant ? `${k}:${variant}` : k;
      const e = acc.get(key) ?? { ms: 0, calls: 0 };
      e.ms += performance.now() - t;
      e.calls++;
      acc.set(key, e);
      if (!lifetimes.has(k)) {
        tag(r, key);
        snapshot();
      }
      return r;
    };
  }
  try {
    await run();
  } finally {
    for (const k of names) delete rec[k];
  }
  const mb = (x: number) => +(x / 2 ** 20).toFixed(1);
  return {
    ops: [...acc]
      .map(([op, v]) => ({ op, ms: +v.ms.toFixed(3), calls: v.calls }))
      .sort((x, y) => y.ms - x.ms),
    peakMb: mb(peak),
    liveAtPeak: [...liveAtPeak]
      .map(([made_by, v]) => ({ made_by, mb: mb(v.bytes), tensors: v.tensors }))
      .sort((x, y) => y.mb - x.mb),
  };
}

async function step(flags: Record<string, unknown>): Promise<number> {
  const configName = String(flags.config ?? "tiny");
  if (configName !== "tiny" && configName !== "small")
    throw new UsageError(`--config "${configName}": use tiny or small`);
  const precisions = flags.precision ? [String(flags.precision)] : ["fp8", "bf16", "fp32"];
  const steps = Number(flags.steps ?? 10);
  const shape = STEP_SHAPES[configName];
  const cfg: TrainConfig = {
    ...DEFAULTS,
    model: configName,
    seqLen: Number(flags["seq-len"] ?? shape.seqLen),
    batchSize: Number(flags["batch-size"] ?? shape.batch),
    backend: (flags.backend ?? "auto") as "auto",
  };
  for (const [flag, v] of [
    ["batch-size", cfg.batchSize],
    ["seq-len", cfg.seqLen],
  ] as const)
    if (!(v >= 1)) throw new UsageError(`--${flag} ${v}: must be at least 1`);
  const modelCfg = resolveModel(cfg);
  const rows = [];
  for (const precision of precisions) {
    const s = buildSession({ ...cfg, precision }, modelCfg);
    const b = s.backend;
    const rng = new Rng(7);
    const T = cfg.seqLen;
    const B = cfg.batchSize;
    const ids = b.keep(b.upload(rng.ints(B * T, modelCfg.vocab_size), [B * T], "i32"));
    const tg = b.keep(b.upload(rng.ints(B * T, modelCfg.vocab_size), [B * T], "i32"));
    (b as { resetPeakMemory?: () => void }).resetPeakMemory?.();
    b.resetPeakBytes();
    let peakRss = 0;
    const ms = await timeIt(
      async () => {
        await trainStep(s.model, s.opt, ids, tg, { batch: B, seq: T }, 1e-3);
        peakRss = Math.max(peakRss, process.memoryUsage().rss);
      },
      steps,
      120_000,
    );
    const tokensPerS = (B * T * 1000) / ms;
    const tflops = (trainFlopsPerToken(modelCfg, T) * tokensPerS) / 1e12;
    const peakDevice = (b as { peakMemory?: () => number }).peakMemory?.();
    const row: Record<string, unknown> = {
      config: configName,
      backend: b.name,
      precision,
      tokens_per_step: B * T,
      ms_per_step: +ms.toFixed(1),
      tokens_per_s: Math.round(tokensPerS),
      model_tflops: +tflops.toFixed(3),
      peak_rss_mb: Math.round(peakRss / 2 ** 20),
      // Tensor bytes live at once (every backend; on cuda the allocator's figure adds size classes).
      peak_tensor_mb: Math.round(b.peakBytes() / 2 ** 20),
    };
    if (peakDevice !== undefined) {
      row.peak_device_mb = Math.round(peakDevice / 2 ** 20);
      row.mfu_vs_bf16_ceiling = +(tflops / CEILINGS.bf16).toFixed(4);
      row.mfu_vs_fp8_ceiling = +(tflops / CEILINGS.fp8).toFixed(4);
    }
    if (flags.profile) {
      const prof = await profileStep(b, () => trainStep(s.model, s.opt, ids, tg, { batch: B, seq: T }, 1e-3));
      // Device backends: one more step, unsynchronised, with GPU time per kernel.
      const timeKernels = (b as { timeKernels?: CudaBackend["timeKernels"] }).timeKernels?.bind(b);
      const gpu = timeKernels
        ? await timeKernels(() => trainStep(s.model, s.opt, ids, tg, { batch: B, seq: T }, 1e-3))
        : undefined;
      const file = `bench-profile-${configName}-${b.name}-${precision}.json`;
      writeFileSync(file, `${JSON.stringify({ ...prof, gpu }, null, 2)}\n`);
      if (gpu) {
        row.gpu_busy_ms = +gpu.busyMs.toFixed(1);
        row.gpu_span_ms = +gpu.spanMs.toFixed(1);
        row.host_issue_ms = +gpu.issuedMs.toFixed(1);
      }
      row.profile = file;
      if (!flags.json) {
        for (const p of prof.ops.slice(0, 12))
          console.log(`  ${p.op.padEnd(34)} ${p.ms.toFixed(1).padStart(9)} ms  ${p.calls} calls`);
        if (gpu) {
          console.log(
            `  GPU: busy ${gpu.busyMs.toFixed(1)} ms of a ${gpu.spanMs.toFixed(1)} ms span; host issued the step in ${gpu.issuedMs.toFixed(1)} ms`,
          );
          for (const k of gpu.kernels.slice(0, 25))
            console.log(`  ${k.name.padEnd(44)} ${k.ms.toFixed(2).padStart(9)} ms  ${k.launches} launches`);
        }
        console.log(`  tensors live at the step's peak (${prof.peakMb} MB), by the op that made them:`);
        for (const p of prof.liveAtPeak.slice(0, 12))
          console.log(`  ${p.made_by.padEnd(34)} ${p.mb.toFixed(1).padStart(9)} MB  ${p.tensors} tensors`);
      }
    }
    rows.push(row);
    if (!flags.json)
      console.log(
        Object.entries(row)
          .map(([k, v]) => `${k}=${v}`)
          .join("  "),
      );
    ids.dispose();
    tg.dispose();
    s.dispose();
  }
  if (flags.json) console.log(JSON.stringify(rows.length === 1 ? rows[0] : rows));
  return 0;
}

/**
 * Soak: many training steps with RSS and live tensors sampled, to show memory stays flat (no leak
 * in arenas, native buffers or the loader). Real data through the loader, as `train` runs it.
 */
async function soak(flags: Record<string, unknown>): Promise<number> {
  const steps = Number(flags.steps ?? 2000);
  const cfg: TrainConfig = {
    ...DEFAULTS,
    steps,
    batchSize: Number(flags["batch-size"] ?? DEFAULTS.batchSize),
    backend: (flags.backend ?? "auto") as "auto",
    precision: String(flags.precision ?? "fp8"),
  };
  const modelCfg = resolveModel(cfg);
  const { openTrainData } = await import("../run/data.ts");
  const data = await openTrainData(cfg, modelCfg.vocab_size);
  const s = buildSession(cfg, modelCfg);
  const b = s.backend;
  const every = Math.max(1, Math.round(steps / 40));
  const samples: { step: number; rss_mb: number; tensors: number; s: number }[] = [];
  const t0 = performance.now();
  for (let step = 1; step <= steps; step++) {
    const batch = await data.next();
    await b.scope(async () => {
      const ids = b.upload(batch.ids, [batch.ids.length], "i32");
      const tg = b.upload(batch.targets, [batch.targets.length], "i32");
      return trainStep(s.model, s.opt, ids, tg, { batch: cfg.batchSize, seq: cfg.seqLen }, s.lrAt(step));
    });
    if (step % every === 0 || step === 1) {
      const m = {
        step,
        rss_mb: Math.round(process.memoryUsage().rss / 2 ** 20),
        tensors: b.stats().tensors,
        s: Math.round((performance.now() - t0) / 1000),
      };
      samples.push(m);
      if (!flags.json)
        console.log(`step ${step}/${steps}  rss ${m.rss_mb} MB  live tensors ${m.tensors}  ${m.s}s`);
    }
  }
  const second = samples.slice(Math.floor(samples.length / 2)).map((x) => x.rss_mb);
  const summary = {
    steps,
    backend: b.name,
    precision: cfg.precision,
    rss_first_mb: samples[0].rss_mb,
    rss_last_mb: samples.at(-1)!.rss_mb,
    rss_max_mb: Math.max(...samples.map((x) => x.rss_mb)),
    rss_second_half_range_mb: Math.max(...second) - Math.min(...second),
    live_tensors: [...new Set(samples.map((x) => x.tensors))],
  };
  console.log(JSON.stringify(flags.json ? { ...summary, samples } : summary));
  s.dispose();
  return 0;
}

export async function bench(argv: string[]): Promise<number> {
  const [what, ...rest] = argv;
  const { flags } = parseArgs(rest, {
    backend: "string",
    precision: "string",
    shape: "list",
    config: "string",
    steps: "int",
    "batch-size": "int",
    "seq-len": "int",
    json: "boolean",
    profile: "boolean",
    baseline: "boolean",
    debug: "boolean",
  });
  if (what === "gemm") return gemm(flags);
  if (what === "step") return step(flags);
  if (what === "soak") return soak(flags);
  if (what === "ops") {
    const { benchOps } = await import("@moe8/kernels");
    const rows = await benchOps(flags);
    if (flags.json) console.log(JSON.stringify(rows));
    else
      for (const r of rows)
        console.log(
          Object.entries(r)
            .map(([k, v]) => `${k}=${v}`)
            .join("  "),
        );
    return 0;
  }
  throw new UsageError(`bench: unknown benchmark "${what ?? ""}" (use gemm, ops, step or soak)`);
}

export { CONFIGS };
