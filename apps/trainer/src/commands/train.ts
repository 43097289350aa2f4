// `moe8 train`: pretrains the model on Arrow-streamed tokens with progress on the terminal,
// metrics.jsonl + loss.svg, atomic checkpoints, exact resume, numerical guards and clean shutdown:
// the loop yields to the event loop once a step, so SIGINT/SIGTERM stop it after the current step
// with a checkpoint (exit 0), and a second signal ends the process at once.
import { join } from "node:path";
import { policyToJson, UsageError } from "@moe8/fp8-core";
import { requireNative } from "@moe8/kernels";
import { hfConfig, type LoadStats, loadStats } from "@moe8/model";
import { parseArgs } from "../args.ts";
import { checkReplicas, exchangeStep, type GatheredState, type Ranks, startRanks } from "../dist/ranks.ts";
import { runWorker } from "../dist/worker.ts";
import { type CheckpointFiles, pruneCheckpoints, writeCheckpoint } from "../run/checkpoint.ts";
import type { TrainConfig } from "../run/config.ts";
import type { TrainData } from "../run/data.ts";
import { TRAIN_FLAGS } from "../run/flags.ts";
import { writeFileDurable } from "../run/io.ts";
import { MetricsLog, type StepMetrics, truncateMetrics } from "../run/metrics.ts";
import { formatDuration, progressLine } from "../run/progress.ts";
import type { Session } from "../run/session.ts";
import { type RunStart, startNew, startResume } from "../run/start.ts";
import { TensorBoardWriter } from "../run/tensorboard.ts";

export interface RunState {
  step: number;
  bestValLoss: number | null;
  bestStep: number | null;
  consecutiveBad: number;
}

/** Mean validation loss (see validation). */
export async function validationLoss(
  s: Session,
  data: TrainData,
  cfg: TrainConfig,
  ranks: Ranks | null = null,
): Promise<number> {
  return (await validation(s, data, cfg, ranks)).loss;
}

/**
 * Mean validation loss over the fixed held-out batches, each evaluated in the run's micro-batches
 * (--grad-accum) so that validation needs no more memory than a training step: a batch's loss is
 * its micro-batches' means weighted by their sequences (a small held-out set may give one short
 * batch). Also each MoE layer's expert loads over all of them: the routing without training's
 * router noise, which the training loads include.
 */
export async function validation(
  s: Session,
  data: TrainData,
  cfg: TrainConfig,
  ranks: Ranks | null = null,
): Promise<{ loss: number; load: LoadStats[] }> {
  const b = s.backend;
  // Under expert parallelism no rank holds every expert: the leader evaluates a whole copy of the
  // model, the ranks' experts gathered (every rank joins).
  const model = s.model.expertGroup && ranks ? s.wholeModel(await ranks.gatherModel()) : s.model;
  const T = cfg.seqLen;
  const microBatch = cfg.batchSize / cfg.gradAccum;
  let sum = 0;
  const counts = model.moeLayers.map((m) => new Array<number>(m.cfg.n_routed_experts).fill(0));
  const batches = await data.validation(cfg.evalBatches);
  for (const batch of batches)
    for (let r0 = 0; r0 < batch.batchSize; r0 += microBatch) {
      const n = Math.min(microBatch, batch.batchSize - r0);
      const loss = await b.scope(async () => {
        const ids = b.upload(batch.ids.subarray(r0 * T, (r0 + n) * T), [n * T], "i32");
        const tg = b.upload(batch.targets.subarray(r0 * T, (r0 + n) * T), [n * T], "i32");
        const ce = await model.evalLoss(ids, tg, { batch: n, seq: T }).ce.item();
        for (const [i, m] of model.moeLayers.entries()) {
          const off = (await m.lastOffsets!.read()) as Int32Array;
          for (let e = 0; e < counts[i].length; e++) counts[i][e] += off[e + 1] - off[e];
        }
        return ce;
      });
      sum += loss * (n / batch.batchSize); // exactly the loss when the batch is one micro-batch
    }
  return { loss: sum / batches.length, load: counts.map(loadStats) };
}

export async function saveCheckpoint(
  runDir: string,
  s: Session,
  cfg: TrainConfig,
  data: TrainData,
  st: RunState,
  gathered?: GatheredState,
): Promise<string> {
  const optimizer = new Map<string, { shape: number[]; data: Float32Array }>();
  if (gathered) {
    // Every parameter's moments, gathered from the ranks that own them (named as one process names
    // them; an expert-parallel rank's stacked experts are a slice of the whole, along the first axis).
    for (const p of s.model.params)
      for (const suffix of ["exp_avg", "exp_avg_sq"]) {
        const name = `${p.name}.${suffix}`;
        const data = gathered.optimizer.get(name)!;
        const shape = [...p.value.shape];
        shape[0] *= data.length / p.value.size;
        optimizer.set(name, { shape, data });
      }
  } else
    for (const [name, t] of s.opt.stateTensors()) {
      const raw = t.dtype === "bf16" ? s.backend.cast(t, "f32") : t;
      optimizer.set(name, { shape: [...t.shape], data: (await raw.read()) as Float32Array });
      if (raw !== t) raw.dispose();
    }
  return writeCheckpoint(runDir, st.step, {
    model: gathered?.model ?? (await s.model.stateDict()),
    optimizer,
    config: hfConfig(s.model.cfg),
    state: {
      step: st.step,
      optimizer_step: s.opt.step,
      data_cursor: data.cursor(),
      best_val_loss: st.bestValLoss,
      best_step: st.bestStep,
      policy: policyToJson(s.policy),
      train_config: cfg,
      tokenizer: data.tokenizer,
      schedule_from: s.schedule.from,
    },
    tokenizer: data.textTokenizer,
  });
}

function restore(s: Session, ck: CheckpointFiles, st: RunState): void {
  s.model.loadStateDict((n) => ck.model.get(n));
  s.opt.loadState(ck.state.optimizer_step, (n) => ck.optimizer.get(n)?.data);
  st.step = ck.state.step;
  st.bestValLoss = ck.state.best_val_loss;
  st.bestStep = ck.state.best_step;
}

/** The run's writes: a failure of any of them is reported with the last good checkpoint. */
interface Writes {
  guarded<T>(write: () => T): T;
  /** Writes a checkpoint of the current state and returns its folder. */
  checkpoint(): Promise<string>;
}

/** A failed write names what is safe: the last checkpoint that was completed, if any. */
function afterWriteFailure(err: unknown, runDir: string, lastGood: string | null): unknown {
  if (!(err instanceof UsageError)) return err;
  return new UsageError(
    `${err.message}; ${lastGood ? `the last good checkpoint is ${lastGood}` : "no checkpoint was completed"} (free space, then --resume ${runDir})`,
  );
}

function writeConfig(runDir: string, cfg: TrainConfig): void {
  writeFileDurable(join(runDir, "config.json"), `${JSON.stringify(cfg, null, 2)}\n`);
}

export async function train(argv: string[]): Promise<number> {
  // A worker rank of `--ranks N`, started by the leader (dist/ranks.ts).
  if (process.env.MOE8_RANK) return runWorker();
  const args = parseArgs(argv, TRAIN_FLAGS, ["precision."]);
  const f = args.flags;
  const gpus = gpusFlag(f.gpus, f.ranks);
  const nRanks = gpus === null ? ranksFlag(f.ranks) : gpus === "all" ? 0 : gpus;
  const checkEvery = checkEveryFlag(f["check-every"]);
  // --expert-parallel alone: the experts over every rank; with P, over expert groups of P ranks.
  const epFlag = f["expert-parallel"];
  const expertParallel = epFlag !== undefined && epFlag !== false;
  let ep = 1; // ranks per expert group (1: every rank holds every expert)
  const note = (m: string) => console.error(`note: ${m}`);
  const ranked = gpus !== null || nRanks > 1 || expertParallel;
  let n = nRanks;
  /** What the ranks need of the run (a UsageError otherwise); sets how many there are. */
  const checkRun = (cfg: TrainConfig, backend: string, experts: number) => {
    if (gpus === null && nRanks <= 1)
      throw new UsageError(
        "--expert-parallel splits the routed experts over the ranks: give --ranks N or --gpus N with N > 1",
      );
    n = gpus !== null ? checkGpus(gpus, backend) : nRanks;
    ep = expertParallel ? (epFlag === true ? n : (epFlag as number)) : 1;
    checkRanks(n, cfg, backend, gpus !== null, expertParallel ? { experts, ep } : null);
  };
  // A new run is checked before its folder is written; a resumed one once its checkpoint's config
  // is known (below).
  const start: RunStart =
    f.resume !== undefined
      ? await startResume(args, note)
      : await startNew(args, note, (cfg, modelCfg, backend) => {
          if (ranked) checkRun(cfg, backend.name, modelCfg.n_routed_experts);
        });
  const { cfg, runDir, lock, session: s, data, from } = start;
  let ranks: Ranks | null = null;
  if (ranked) {
    if (f.resume !== undefined)
      try {
        checkRun(cfg, s.backend.name, s.model.cfg.n_routed_experts);
      } catch (e) {
        s.dispose();
        lock.release();
        throw e;
      }
    // Each rank steps on its share of the batch and keeps the moments of the parameters it owns.
    s.becomeRank(0, n);
  }
  let lastGood: string | null = from?.dir ?? null;
  const st: RunState = { step: 0, bestValLoss: null, bestStep: null, consecutiveBad: 0 };
  const metrics = new MetricsLog(runDir, s.model.moeLayerNumbers);
  const writes: Writes = {
    guarded(write) {
      try {
        return write();
      } catch (err) {
        throw afterWriteFailure(err, runDir, lastGood);
      }
    },
    async checkpoint() {
      // With ranks every rank holds part of the optimiser state: they gather it for the leader.
      const gathered = ranks ? await ranks.gatherOptimizer() : undefined;
      const dir = await saveCheckpoint(runDir, s, cfg, data, st, gathered).catch((err) => {
        throw afterWriteFailure(err, runDir, lastGood);
      });
      lastGood = dir;
      ranks?.progress(st.step, `${runDir} continues it from ${dir}`);
      return dir;
    },
  };
  const guarded = writes.guarded;
  let stop: string | null = null;
  const onSignal = (sig: string) => {
    if (stop) {
      console.error(`\n${sig} again: exiting now`);
      process.exit(130);
    }
    stop = sig;
    // From now on a signal has its default action: the process ends at once, even inside a long
    // step (the next start cleans up after it). The lock is released by the exit handler when it can.
    process.off("SIGINT", sigint);
    process.off("SIGTERM", sigterm);
    console.error(
      `\n${sig}: finishing the current step, then writing a checkpoint (${sig} again exits at once)`,
    );
  };
  let tb: TensorBoardWriter | null = null;
  const sigint = () => onSignal("SIGINT");
  const sigterm = () => onSignal("SIGTERM");
  try {
    // A resumed run given another length or other outputs: config.json says what it now is.
    if (start.configChanged) guarded(() => writeConfig(runDir, cfg));
    if (from) {
      restore(s, from.files, st);
      // Lines past the checkpoint were written by the interrupted process; they are repeated now.
      metrics.preload(guarded(() => truncateMetrics(runDir, st.step, note)));
      console.log(`resuming ${runDir} from ${from.dir} (step ${st.step}/${cfg.steps})`);
    } else
      guarded(() => {
        writeConfig(runDir, cfg);
        metrics.reset();
      });
    // A new event file for every process: a resumed run's continues the curves (tensorboard.ts).
    tb = start.tensorboard ? guarded(() => TensorBoardWriter.open(start.tensorboard!, st.step + 1)) : null;
    process.on("SIGINT", sigint);
    process.on("SIGTERM", sigterm);
    if (gpus !== null || n > 1)
      ranks = await startRanks(n, cfg, s, checkEvery, from?.dir ?? null, gpus !== null, ep);
    ranks?.progress(st.step, lastGood ? `${runDir} continues it from ${lastGood}` : null);
    try {
      return await loop(start, st, metrics, tb, writes, () => stop, f["trace-precision"] === true, ranks);
    } catch (e) {
      // A worker that died: say which, and that the last checkpoint resumes the run.
      // (A collective sees the socket close before the worker's exit is reported: wait for it then.)
      const failed = await ranks?.failure(/disconnected/.test(String(e)) ? 5_000 : 0);
      if (failed)
        throw new Error(
          `${failed}: the run stopped at step ${st.step}${lastGood ? `; --resume ${runDir} continues it from ${lastGood}` : ""}`,
        );
      throw e;
    }
  } finally {
    process.off("SIGINT", sigint);
    process.off("SIGTERM", sigterm);
    await ranks?.close();
    tb?.close();
    s.dispose();
    lock.release();
  }
}

/** `tiny`, or `tiny with vocab_size 1000, num_hidden_layers 2` for a preset with changed fields. */
function modelLabel(m: TrainConfig["model"]): string {
  if (typeof m === "string") return m;
  const { base, ...fields } = m;
  const changed = Object.entries(fields).map(([k, v]) => `${k} ${v}`);
  return changed.length ? `${base} with ${changed.join(", ")}` : base;
}

async function loop(
  { cfg, runDir, session: s, data, from, vocabTaken, tensorboard }: RunStart,
  st: RunState,
  metrics: MetricsLog,
  tb: TensorBoardWriter | null,
  { guarded, checkpoint: save }: Writes,
  stopped: () => string | null,
  tracePrecision: boolean,
  ranks: Ranks | null,
): Promise<number> {
  const tokensPerStep = cfg.batchSize * cfg.seqLen;
  const accum =
    cfg.gradAccum > 1
      ? ` (${cfg.gradAccum} micro-batches of ${cfg.batchSize / cfg.gradAccum} x ${cfg.seqLen})`
      : "";
  console.log(
    `training ${modelLabel(cfg.model)}${vocabTaken ? ` (${vocabTaken})` : ""} on ${s.backend.name}${ranks ? ` x ${ranks.collectives.size} ${gpuRanks(ranks)} (${shareOfState(s)})` : ""}, precision ${cfg.precision}, ${cfg.steps} steps of ${tokensPerStep} tokens${accum}, data ${data.description}, out ${runDir}${tensorboard ? `, tensorboard ${tensorboard}` : ""}`,
  );
  const t0 = performance.now();
  const firstStep = st.step;
  // The steps since the last progress line and their time (the steps' own: not evaluation,
  // checkpoints or plots), for the line's tokens/s: the mean over them, not one step's, since the
  // steps that count FP8 ranges or time exchanges run slower than the others.
  let interval = { steps: 0, ms: 0 };
  while (st.step < cfg.steps && !stopped()) {
    const ts = performance.now();
    const batch = await data.next();
    const lr = s.lrAt(st.step + 1);
    const routerNoise = s.routerNoiseAt(st.step + 1);
    // With ranks, each steps on its rows of the batch (the leader sends the others theirs).
    const collectives = ranks?.collectives;
    const check = ranks !== null && ranks.checkEvery > 0 && (st.step + 1) % ranks.checkEvery === 0;
    // FP8 range counts cost an uncaptured step with one extra pass per quantisation: only every
    // --fp8-stats-every steps. The leader times its token exchanges on logged steps.
    const fp8Stats = cfg.fp8StatsEvery > 0 && (st.step + 1) % cfg.fp8StatsEvery === 0;
    const logged = (st.step + 1) % cfg.logEvery === 0;
    const header = { step: st.step + 1, lr, noise: routerNoise ?? null, check, fp8Stats };
    const rows = collectives ? await exchangeStep(s, collectives, header, batch, cfg.seqLen) : batch;
    // (Under --expert-parallel the leader also times its token exchanges on logged steps.)
    const r = await s.runner.step(rows, lr, {
      fp8Stats,
      timeExchanges: logged,
      accum: cfg.gradAccum,
      routerNoise,
      collectives,
    });
    if (check) await checkReplicas(s, collectives!, st.step + 1);
    st.step++;
    ranks?.progress(st.step);
    const ms = performance.now() - ts;
    interval = { steps: interval.steps + 1, ms: interval.ms + ms };
    const m: StepMetrics = {
      step: st.step,
      loss: r.loss,
      lr,
      grad_norm: r.gradNorm,
      tokens_per_s: (tokensPerStep * 1000) / ms,
      ms_per_step: ms,
    };
    if (r.mtpLoss !== undefined) m.mtp_loss = r.mtpLoss;
    if (r.fp8) {
      m.fp8_overflow = r.fp8.overflow;
      m.fp8_underflow = r.fp8.underflow;
    }
    if (r.expertExchangeMs !== undefined) m.expert_exchange_ms = r.expertExchangeMs;
    if (r.load.length) {
      m.load_cv = r.load.reduce((a, l) => a + l.cv, 0) / r.load.length;
      m.load_max_over_mean = Math.max(...r.load.map((l) => l.maxOverMean));
      m.load_max_over_mean_by_layer = r.load.map((l) => l.maxOverMean);
      m.load_idle_experts = r.load.reduce((a, l) => a + l.idle, 0);
    }
    if (r.skipped) {
      st.consecutiveBad++;
      m.skipped = true;
      console.error(
        `step ${st.step}: non-finite loss (${r.totalLoss}) or gradient norm (${r.gradNorm}); update skipped`,
      );
    } else st.consecutiveBad = 0;
    if (tracePrecision && st.step === firstStep + 1)
      console.log(`precision trace:\n${s.model.trace.format()}`);
    if (cfg.evalEvery > 0 && st.step % cfg.evalEvery === 0) {
      const v = await validation(s, data, cfg, ranks);
      m.val_loss = v.loss;
      if (v.load.length) {
        m.val_load_max_over_mean = Math.max(...v.load.map((l) => l.maxOverMean));
        m.val_load_idle_experts = v.load.reduce((a, l) => a + l.idle, 0);
      }
      if (st.bestValLoss === null || m.val_loss < st.bestValLoss) {
        st.bestValLoss = m.val_loss;
        st.bestStep = st.step;
      }
    }
    guarded(() => {
      metrics.append(m);
      tb?.append(m);
    });
    if (st.consecutiveBad >= cfg.maxBadSteps)
      throw new UsageError(
        `${st.consecutiveBad} consecutive steps with a non-finite loss or gradient; stopping (the last good checkpoint is intact)`,
      );
    if (st.step % cfg.logEvery === 0 || st.step === cfg.steps || m.val_loss !== undefined) {
      const rate = ((st.step - firstStep) * tokensPerStep * 1000) / (performance.now() - t0);
      console.log(
        progressLine({
          step: st.step,
          total: cfg.steps,
          loss: m.loss,
          mtpLoss: m.mtp_loss,
          lr,
          gradNorm: m.grad_norm,
          tokensPerS: (interval.steps * tokensPerStep * 1000) / interval.ms,
          balance: m.load_max_over_mean,
          idleExperts: m.load_idle_experts,
          exchangeMs: m.expert_exchange_ms,
          etaS: ((cfg.steps - st.step) * tokensPerStep) / rate,
          valLoss: m.val_loss,
          valBalance: m.val_load_max_over_mean,
        }),
      );
      guarded(() => metrics.writePlot(`moe8 ${cfg.precision} on ${s.backend.name}`));
      interval = { steps: 0, ms: 0 };
    }
    if (cfg.saveEvery > 0 && st.step % cfg.saveEvery === 0 && st.step < cfg.steps && !r.skipped) {
      await save();
      guarded(() => pruneCheckpoints(runDir, cfg.keepLast, st.bestStep));
    }
    // Once a step the event loop runs, so a signal's handler can set `stop` (a step never awaits
    // anything truly asynchronous on the ts and cpu backends).
    await new Promise<void>((r) => setImmediate(r));
  }
  const stop = stopped();
  if (!stop && (cfg.evalEvery === 0 || st.step % cfg.evalEvery !== 0)) {
    const val = await validationLoss(s, data, cfg, ranks);
    console.log(`validation loss ${val.toFixed(4)}`);
  }
  // A checkpoint is always written at the end, unless this process did no step at all.
  const dir = st.step > firstStep || !from ? await save() : from.dir;
  guarded(() => {
    pruneCheckpoints(runDir, cfg.keepLast, st.bestStep);
    metrics.writePlot(`moe8 ${cfg.precision} on ${s.backend.name}`);
  });
  console.log(
    `${stop ? "stopped" : "done"} at step ${st.step} in ${formatDuration((performance.now() - t0) / 1000)}; checkpoint ${dir}`,
  );
  return 0;
}

/** --ranks: data-parallel processes, 1 unless given. */
function ranksFlag(v: unknown): number {
  if (v === undefined) return 1;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1 || n > 64)
    throw new UsageError(`--ranks ${v}: use an integer from 1 to 64`);
  return n;
}

/** --check-every: steps between the ranks' replica checks (0: never). */
function checkEveryFlag(v: unknown): number {
  if (v === undefined) return 100;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0)
    throw new UsageError(`--check-every ${v}: use a whole number of steps (0: never)`);
  return n;
}

/** --gpus N or all (null when absent); --ranks beside it is refused. */
function gpusFlag(v: unknown, ranks: unknown): number | "all" | null {
  if (v === undefined) return null;
  if (ranks !== undefined)
    throw new UsageError("--gpus and --ranks: give one (--gpus runs one rank per GPU)");
  if (v === "all") return "all";
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1 || n > 64)
    throw new UsageError(`--gpus ${v}: use an integer from 1 to 64, or all`);
  return n;
}

/**
 * What --gpus needs: the cuda backend, as many GPUs from this process's own on (MOE8_CUDA_DEVICE)
 * and NCCL. Returns the number of ranks.
 */
function checkGpus(gpus: number | "all", backend: string): number {
  const flag = `--gpus ${gpus}`;
  if (backend !== "cuda") throw new UsageError(`${flag} runs on the cuda backend: add --backend cuda`);
  const native = requireNative();
  const info = native.cudaInfo();
  const first = info.device ?? 0;
  const have = (info.deviceCount ?? 1) - first;
  const n = gpus === "all" ? have : gpus;
  if (n > have)
    throw new UsageError(
      `${flag}: this machine has ${have} GPU${have === 1 ? "" : "s"} from device ${first} on`,
    );
  const nccl = native.ncclInfo();
  if (!nccl.available) throw new UsageError(`${flag} needs NCCL: ${nccl.reason}`);
  return n;
}

/** "ranks", or "GPU(s) (NCCL x.y.z)" with --gpus. */
function gpuRanks(r: Ranks): string {
  if (r.collectives === r.group.collectives) return "ranks";
  return `GPU${r.collectives.size === 1 ? "" : "s"} (NCCL ${requireNative().ncclInfo().version})`;
}

/** What N ranks need of the run: whole shares of the batch, and collectives for its backend. */
function checkRanks(
  n: number,
  cfg: TrainConfig,
  backend: string,
  gpus: boolean,
  split: { experts: number; ep: number } | null,
): void {
  const flag = gpus ? `--gpus ${n}` : `--ranks ${n}`;
  if (split) {
    const { experts, ep } = split;
    if (!Number.isInteger(ep) || ep < 1 || ep > n || n % ep !== 0)
      throw new UsageError(
        `--expert-parallel ${ep}: expert groups of ${ep} ranks do not divide ${n} ranks (use a divisor of ${n})`,
      );
    if (experts % ep !== 0)
      throw new UsageError(
        `--expert-parallel: the ${experts} routed experts of a layer do not split over ${ep} ranks`,
      );
    // (Expert groups below the GPU count are NCCL communicators split from the world's.)
    const nccl = gpus && ep < n ? requireNative().ncclInfo() : null;
    if (nccl && !nccl.split)
      throw new UsageError(
        `--expert-parallel ${ep} with ${flag} needs NCCL 2.18 or later (ncclCommSplit); this one is ${nccl.version}`,
      );
  }
  if (cfg.batchSize % (n * cfg.gradAccum) !== 0)
    throw new UsageError(
      `${flag}: the batch of ${cfg.batchSize} sequences does not split into ${n} ranks${cfg.gradAccum > 1 ? ` of ${cfg.gradAccum} micro-batches` : ""}`,
    );
  if (backend === "cuda" && !gpus)
    throw new UsageError(`${flag}: several ranks on cuda run one per GPU over NCCL: use --gpus ${n}`);
}

/** Under ZeRO-1: how much of the optimiser state this rank holds. */
function shareOfState(s: Session): string {
  const split = s.model.expertSplit;
  if (split) {
    const experts = [...split.params].reduce((n, p) => n + p.value.size, 0);
    const all = s.model.params.reduce((n, p) => n + p.value.size, 0) + experts * (split.size - 1);
    const copies = s.model.expertReplicas?.size ?? 1;
    const where = copies > 1 ? `${copies} expert groups of ${split.size} ranks` : "the ranks";
    return `experts split over ${where}: rank 0 holds ${s.model.params.reduce((n, p) => n + p.value.size, 0)} of ${all} weights`;
  }
  const all = 2 * s.model.params.reduce((n, p) => n + p.value.size, 0);
  return `optimiser state sharded: rank 0 holds ${s.opt.stateElements} of ${all} values`;
}
