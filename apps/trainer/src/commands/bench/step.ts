// `moe8 bench step`: training steps of `tiny` or `small` on random tokens, as ms per step, tokens/s,
// model TFLOP/s (flops.ts), peak memory and, on cuda, MFU against the H200 GEMM ceilings;
// `--profile` adds the time and memory per op class (profile.ts) and, on cuda, GPU time per kernel.
import { writeFileSync } from "node:fs";
import { UsageError } from "@moe8/fp8-core";
import { availableBackends, type CudaBackend } from "@moe8/kernels";
import { type LoadStats, STEP_SHAPES, trainStep } from "@moe8/model";
import { Rng } from "@moe8/tensor";
import { intFlag } from "../../args.ts";
import { DEFAULTS, resolveModel, type TrainConfig } from "../../run/config.ts";
import { checkMemory, memoryNeed } from "../../run/memory.ts";
import { buildSession } from "../../run/session.ts";
import { H200_BF16_GEMM_TFLOPS, H200_FP8_GEMM_TFLOPS, trainFlopsPerToken } from "./flops.ts";
import { byKernelClass } from "./kernel-classes.ts";
import { profileStep } from "./profile.ts";
import { formatRow, timeIt } from "./timing.ts";

/** The baseline's learning rate (../shared/reference/torch_ref_moe.py: AdamW at 3e-4). */
const BENCH_LR = 3e-4;
/** Distinct batches at most (cycled beyond): 128 KiB of ids and targets a batch of small. */
const MAX_BATCHES = 64;

export async function benchStep(flags: Record<string, unknown>): Promise<number> {
  const configName = String(flags.config ?? "tiny");
  if (configName !== "tiny" && configName !== "small")
    throw new UsageError(`--config "${configName}": use tiny or small`);
  const precisions = flags.precision ? [String(flags.precision)] : ["fp8", "bf16", "fp32"];
  const steps = intFlag(flags, "steps", 1, 1e6) ?? 10;
  const shape = STEP_SHAPES[configName];
  const cfg: TrainConfig = {
    ...DEFAULTS,
    // --mtp: with DeepSeek-V3's multi-token prediction module (what it costs a step).
    model: flags.mtp ? { base: configName, num_nextn_predict_layers: 1 } : configName,
    seqLen: intFlag(flags, "seq-len", 1, 2 ** 22) ?? shape.seqLen,
    batchSize: intFlag(flags, "batch-size", 1, 2 ** 16) ?? shape.batch,
    backend: (flags.backend ?? "auto") as "auto",
  };
  const modelCfg = resolveModel(cfg);
  checkMemory(
    memoryNeed(modelCfg, { batch: cfg.batchSize, seq: cfg.seqLen }, { moments: "bf16" }),
    cfg.backend === "auto" ? (availableBackends().at(-1) ?? "ts") : cfg.backend,
    `a ${configName} step of ${cfg.batchSize} x ${cfg.seqLen} tokens`,
  );
  const rows = [];
  for (const precision of precisions) {
    const s = buildSession({ ...cfg, precision }, modelCfg);
    const b = s.backend;
    const rng = new Rng(7);
    const T = cfg.seqLen;
    const B = cfg.batchSize;
    // A fresh batch of random tokens every step, uploaded before the timing, as the PyTorch
    // baseline does: one batch repeated collapses the router within ten steps (every token to the
    // same six of small's 64 experts), and the grouped GEMMs then time a load no training sees.
    // Steps drawn: the first, timeIt's warm-up and the timed ones, the churn's, and with --profile
    // three more (profiled, kernel-timed, replayed).
    const draws = 2 + steps + CHURN_STEPS + (flags.profile ? 3 : 0);
    const pool = Array.from({ length: Math.min(draws, MAX_BATCHES) }, () => {
      const up = () => b.keep(b.upload(rng.ints(B * T, modelCfg.vocab_size), [B * T], "i32"));
      return { ids: up(), targets: up() };
    });
    let drawn = 0;
    const next = () => pool[drawn++ % pool.length];
    const step = () => s.runner.step(next(), BENCH_LR);
    const train = async () => {
      const { ids, targets } = next();
      return trainStep(s.model, s.opt, ids, targets, { batch: B, seq: T }, BENCH_LR);
    };
    (b as { resetPeakMemory?: () => void }).resetPeakMemory?.();
    b.resetPeakBytes();
    let peakRss = 0;
    // The first step runs uncaptured (it compiles the kernels), the second records the CUDA graph
    // where there is one: both before the timed steps.
    const first = await step();
    const ms = await timeIt(
      async () => {
        await step();
        peakRss = Math.max(peakRss, process.memoryUsage().rss);
      },
      steps,
      120_000,
    );
    const churn = await steadyStateChurn(b, step);
    const tokensPerS = (B * T * 1000) / ms;
    const tflops = (trainFlopsPerToken(modelCfg, T) * tokensPerS) / 1e12;
    const peakDevice = (b as { peakMemory?: () => number }).peakMemory?.();
    const row: Record<string, unknown> = {
      config: configName,
      ...(flags.mtp ? { mtp: true } : {}),
      backend: b.name,
      precision,
      tokens_per_step: B * T,
      ms_per_step: +ms.toFixed(1),
      tokens_per_s: Math.round(tokensPerS),
      model_tflops: +tflops.toFixed(3),
      peak_rss_mb: Math.round(peakRss / 2 ** 20),
      // Tensor bytes live at once (every backend; on cuda the allocator's figure adds size classes).
      peak_tensor_mb: Math.round(b.peakBytes() / 2 ** 20),
      ...churn,
      // Steps replayed from a CUDA graph (step-runner.ts), and the host's own time in the last one
      // (everything but waiting for the device's results).
      cuda_graph: s.runner.replays > 0,
      host_ms_per_step: +s.runner.lastHostMs.toFixed(2),
      ...loadSummary("expert_load_first", first.load),
    };
    if (peakDevice !== undefined) {
      row.peak_device_mb = Math.round(peakDevice / 2 ** 20);
      row.mfu_vs_bf16_ceiling = +(tflops / H200_BF16_GEMM_TFLOPS).toFixed(4);
      row.mfu_vs_fp8_ceiling = +(tflops / H200_FP8_GEMM_TFLOPS).toFixed(4);
    }
    if (flags.profile) {
      // Profiled uncaptured: per-kernel timing needs each launch to be the host's own.
      let timed: Awaited<ReturnType<typeof trainStep>> | undefined;
      const prof = await profileStep(b, async () => {
        timed = await train();
      });
      // Device backends: one more step, unsynchronised, with GPU time per kernel.
      const timeKernels = (b as { timeKernels?: CudaBackend["timeKernels"] }).timeKernels?.bind(b);
      const gpu = timeKernels
        ? await timeKernels(async () => {
            timed = await train();
          })
        : undefined;
      // The same step as training replays it (the recorded part: forward, backward, norm), timed
      // inside the graph: a kernel slower here or in the uncaptured step shows beside its twin.
      const replayed = gpu ? await s.runner.profileReplayed(next()) : null;
      const file = `bench-profile-${configName}-${b.name}-${precision}.json`;
      // The experts' loads of the profiled step, per MoE layer: the grouped GEMMs' times follow
      // them (the Wgrad's most: an expert's tokens are its reduction).
      const expertLoad = timed?.load.map((l) => l.counts);
      writeFileSync(
        file,
        `${JSON.stringify({ ...prof, gpu, gpuReplayed: replayed, expertLoad }, null, 2)}\n`,
      );
      const classes = gpu ? byKernelClass(gpu.kernels) : [];
      if (gpu) {
        row.gpu_busy_ms = +gpu.busyMs.toFixed(1);
        row.gpu_span_ms = +gpu.spanMs.toFixed(1);
        row.host_issue_ms = +gpu.issuedMs.toFixed(1);
        row.host_launch_ms = +gpu.hostMs.toFixed(1);
        row.gpu_launches = gpu.kernels.reduce((n, k) => n + k.launches, 0);
        for (const c of classes) row[`gpu_ms_${c.class.split(/[ ,]+/)[0]}`] = c.ms;
      }
      if (replayed) {
        row.gpu_replayed_busy_ms = +replayed.busyMs.toFixed(1);
        row.gpu_replayed_span_ms = +replayed.spanMs.toFixed(1);
      }
      Object.assign(row, loadSummary("expert_load", timed?.load));
      row.profile = file;
      if (!flags.json) {
        for (const p of prof.ops.slice(0, 12))
          console.log(`  ${p.op.padEnd(34)} ${p.ms.toFixed(1).padStart(9)} ms  ${p.calls} calls`);
        if (gpu) {
          console.log(
            `  GPU: busy ${gpu.busyMs.toFixed(1)} ms of a ${gpu.spanMs.toFixed(1)} ms span; host issued the step in ${gpu.issuedMs.toFixed(1)} ms, its last kernel launch at ${gpu.hostMs.toFixed(1)} ms`,
          );
          for (const c of classes)
            console.log(`  ${c.class.padEnd(44)} ${c.ms.toFixed(2).padStart(9)} ms  ${c.launches} launches`);
          console.log("  the kernels:");
          for (const k of gpu.kernels.slice(0, 25))
            console.log(`  ${k.name.padEnd(44)} ${k.ms.toFixed(2).padStart(9)} ms  ${k.launches} launches`);
        }
        if (replayed) {
          // Per kernel: its time in the replayed graph's recorded part against the uncaptured step's.
          const eager = new Map((gpu?.kernels ?? []).map((k) => [k.name, k]));
          console.log(
            `  replayed (forward, backward, norm; ${replayed.replays} replays): busy ${replayed.busyMs.toFixed(1)} ms of a ${replayed.spanMs.toFixed(1)} ms span`,
          );
          console.log(`  ${"kernel".padEnd(44)} ${"replayed".padStart(9)}    ${"uncaptured".padStart(10)}`);
          for (const k of replayed.kernels.slice(0, 25)) {
            const u = eager.get(k.name);
            const them = u ? `${u.ms.toFixed(2).padStart(10)} ms` : "".padStart(13);
            console.log(
              `  ${k.name.padEnd(44)} ${k.ms.toFixed(2).padStart(9)} ms ${them}  ${k.launches} launches`,
            );
          }
        }
        console.log(`  tensors live at the step's peak (${prof.peakMb} MB), by the op that made them:`);
        for (const p of prof.liveAtPeak.slice(0, 12))
          console.log(`  ${p.made_by.padEnd(34)} ${p.mb.toFixed(1).padStart(9)} MB  ${p.tensors} tensors`);
      }
    }
    rows.push(row);
    if (!flags.json) console.log(formatRow(row));
    for (const x of pool) {
      x.ids.dispose();
      x.targets.dispose();
    }
    s.dispose();
  }
  if (flags.json) console.log(JSON.stringify(rows.length === 1 ? rows[0] : rows));
  return 0;
}

/**
 * The experts' loads of a step in two numbers (none without MoE layers): `<prefix>_max_over_mean`, the
 * layers' mean of the largest load over the mean load, and `<prefix>_worst`, the largest of them.
 */
function loadSummary(prefix: string, load: LoadStats[] | undefined): Record<string, number> {
  if (!load?.length) return {};
  const r = load.map((l) => l.maxOverMean);
  return {
    [`${prefix}_max_over_mean`]: +(r.reduce((a, x) => a + x, 0) / r.length).toFixed(3),
    [`${prefix}_worst`]: +Math.max(...r).toFixed(3),
  };
}

/**
 * What a warm step costs the OS, over CHURN_STEPS more steps: the process's minor page faults per
 * step (each a first touch of fresh memory; one step alone swings with where the runtime's garbage
 * collector runs) and, on cpu, the buffers the pool had to allocate anew (0 when a step reuses
 * everything; tests/cpu-pool.test.ts holds it there).
 */
const CHURN_STEPS = 3;
async function steadyStateChurn(b: object, step: () => Promise<unknown>) {
  const poolStats = (b as { poolStats?: () => { misses: number } }).poolStats?.bind(b);
  // Not every runtime has resourceUsage (it is Node's API; Bun has it).
  const faults = () =>
    typeof process.resourceUsage === "function" ? process.resourceUsage().minorPageFault : NaN;
  const [misses, faults0] = [poolStats?.().misses ?? 0, faults()];
  for (let i = 0; i < CHURN_STEPS; i++) await step();
  const out: Record<string, number> = {};
  if (!Number.isNaN(faults0)) out.minor_faults_per_step = Math.round((faults() - faults0) / CHURN_STEPS);
  if (poolStats) out.pool_misses_per_step = (poolStats().misses - misses) / CHURN_STEPS;
  return out;
}
