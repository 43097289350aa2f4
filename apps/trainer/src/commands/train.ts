// `moe8 train`: pretrains the model on Arrow-streamed tokens with progress on the terminal,
// metrics.jsonl + loss.svg, atomic checkpoints, exact resume, numerical guards and clean shutdown.
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Cursor } from "@moe8/data";
import { policyToJson, UsageError } from "@moe8/fp8-core";
import { hfConfig, trainStep } from "@moe8/model";
import { parseArgs } from "../args.ts";
import {
  type CheckpointFiles,
  latestValidCheckpoint,
  pruneCheckpoints,
  writeCheckpoint,
} from "../run/checkpoint.ts";
import { resolveModel, type TrainConfig } from "../run/config.ts";
import { openTrainData, type TrainData } from "../run/data.ts";
import { configFromArgs, TRAIN_FLAGS } from "../run/flags.ts";
import { MetricsLog, type StepMetrics } from "../run/metrics.ts";
import { formatDuration, progressLine } from "../run/progress.ts";
import { buildSession, type Session } from "../run/session.ts";

export interface RunState {
  step: number;
  bestValLoss: number | null;
  bestStep: number | null;
  consecutiveBad: number;
}

/** Mean validation loss over the fixed held-out batches. */
export async function validationLoss(s: Session, data: TrainData, cfg: TrainConfig): Promise<number> {
  const b = s.backend;
  let sum = 0;
  const batches = await data.validation(cfg.evalBatches);
  for (const batch of batches)
    sum += await b.scope(async () => {
      const ids = b.upload(batch.ids, [batch.ids.length], "i32");
      const tg = b.upload(batch.targets, [batch.targets.length], "i32");
      return s.model.evalLoss(ids, tg, { batch: cfg.batchSize, seq: cfg.seqLen }).ce.item();
    });
  return sum / batches.length;
}

export async function saveCheckpoint(
  runDir: string,
  s: Session,
  cfg: TrainConfig,
  data: TrainData,
  st: RunState,
): Promise<string> {
  const optimizer = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const [name, t] of s.opt.stateTensors()) {
    const raw = t.dtype === "bf16" ? s.backend.cast(t, "f32") : t;
    optimizer.set(name, { shape: [...t.shape], data: (await raw.read()) as Float32Array });
    if (raw !== t) raw.dispose();
  }
  return writeCheckpoint(runDir, st.step, {
    model: await s.model.stateDict(),
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
    },
  });
}

function restore(s: Session, ck: CheckpointFiles, st: RunState): void {
  s.model.loadStateDict((n) => ck.model.get(n));
  s.opt.loadState(ck.state.optimizer_step as number, (n) => ck.optimizer.get(n)?.data);
  st.step = ck.state.step as number;
  st.bestValLoss = (ck.state.best_val_loss as number | null) ?? null;
  st.bestStep = (ck.state.best_step as number | null) ?? null;
}

export async function train(argv: string[]): Promise<number> {
  const args = parseArgs(argv, TRAIN_FLAGS, ["precision."]);
  const f = args.flags;
  let cfg: TrainConfig;
  let runDir: string;
  let resumeFrom: { dir: string; files: CheckpointFiles } | null = null;
  if (f.resume !== undefined) {
    runDir = String(f.resume);
    const extra = Object.keys(f).filter((k) => !["resume", "debug", "trace-precision"].includes(k));
    if (extra.length || args.dotted.length)
      throw new UsageError(
        `--resume takes the run's own configuration; remove --${extra[0] ?? args.dotted[0][0]}`,
      );
    const skipped: string[] = [];
    const found = latestValidCheckpoint(runDir, (m) => skipped.push(m));
    if (!found)
      throw new UsageError(
        `--resume ${runDir}: no valid checkpoint in ${join(runDir, "checkpoints")}${skipped.length ? ` (${skipped[0]})` : ""}`,
      );
    for (const m of skipped) console.error(`note: ${m}`);
    cfg = found.files.state.train_config as TrainConfig;
    resumeFrom = found;
  } else {
    cfg = configFromArgs(args);
    runDir = String(f.out ?? join("runs", new Date().toISOString().replace(/[:.]/g, "-")));
  }
  // Validate everything before writing anything.
  const modelCfg = resolveModel(cfg);
  const data = await openTrainData(
    cfg,
    modelCfg.vocab_size,
    resumeFrom?.files.state.data_cursor as Cursor | undefined,
  );
  const s = buildSession(cfg, modelCfg);
  if (!resumeFrom && existsSync(join(runDir, "checkpoints")))
    throw new UsageError(`--out ${runDir}: already holds a run (use --resume ${runDir} to continue it)`);
  mkdirSync(runDir, { recursive: true });
  const st: RunState = { step: 0, bestValLoss: null, bestStep: null, consecutiveBad: 0 };
  const metrics = new MetricsLog(runDir);
  if (resumeFrom) {
    restore(s, resumeFrom.files, st);
    const old = existsSync(join(runDir, "metrics.jsonl"))
      ? readFileSync(join(runDir, "metrics.jsonl"), "utf8")
          .trim()
          .split("\n")
          .filter(Boolean)
          .map((l) => JSON.parse(l) as StepMetrics)
      : [];
    // Lines past the checkpoint were written by the interrupted process; they are repeated now.
    const kept = old.filter((m) => m.step <= st.step);
    writeFileSync(join(runDir, "metrics.jsonl"), kept.map((m) => `${JSON.stringify(m)}\n`).join(""));
    metrics.preload(kept);
    console.log(`resuming ${runDir} from ${resumeFrom.dir} (step ${st.step}/${cfg.steps})`);
  } else writeFileSync(join(runDir, "config.json"), `${JSON.stringify(cfg, null, 2)}\n`);

  const tokensPerStep = cfg.batchSize * cfg.seqLen;
  console.log(
    `training ${typeof cfg.model === "string" ? cfg.model : "custom"} on ${s.backend.name}, precision ${cfg.precision}, ${cfg.steps} steps of ${tokensPerStep} tokens, data ${data.description}, out ${runDir}`,
  );
  let stop: string | null = null;
  const onSignal = (sig: string) => {
    if (stop) {
      console.error(`\n${sig} again: exiting now`);
      process.exit(130);
    }
    stop = sig;
    console.error(`\n${sig}: finishing the current step, then writing a checkpoint`);
  };
  const sigint = () => onSignal("SIGINT");
  const sigterm = () => onSignal("SIGTERM");
  process.on("SIGINT", sigint);
  process.on("SIGTERM", sigterm);

  const b = s.backend;
  const t0 = performance.now();
  const firstStep = st.step;
  try {
    while (st.step < cfg.steps && !stop) {
      const ts = performance.now();
      const batch = await data.next();
      const lr = s.lrAt(st.step + 1);
      const r = await b.scope(async () => {
        const ids = b.upload(batch.ids, [batch.ids.length], "i32");
        const tg = b.upload(batch.targets, [batch.targets.length], "i32");
        // FP8 range counts cost one extra pass per quantisation: only on logged steps.
        const fp8Stats = (st.step + 1) % cfg.logEvery === 0;
        return trainStep(s.model, s.opt, ids, tg, { batch: cfg.batchSize, seq: cfg.seqLen }, lr, {
          fp8Stats,
        });
      });
      st.step++;
      const ms = performance.now() - ts;
      const m: StepMetrics = {
        step: st.step,
        loss: r.loss,
        lr,
        grad_norm: r.gradNorm,
        tokens_per_s: (tokensPerStep * 1000) / ms,
        ms_per_step: ms,
      };
      if (r.fp8) {
        m.fp8_overflow = r.fp8.overflow;
        m.fp8_underflow = r.fp8.underflow;
      }
      if (r.load.length) {
        m.load_cv = r.load.reduce((a, l) => a + l.cv, 0) / r.load.length;
        m.load_max_over_mean = Math.max(...r.load.map((l) => l.maxOverMean));
      }
      if (r.skipped) {
        st.consecutiveBad++;
        m.skipped = true;
        console.error(
          `step ${st.step}: non-finite loss (${r.totalLoss}) or gradient norm (${r.gradNorm}); update skipped`,
        );
      } else st.consecutiveBad = 0;
      if (f["trace-precision"] && st.step === firstStep + 1)
        console.log(`precision trace:\n${s.model.trace.format()}`);
      if (cfg.evalEvery > 0 && st.step % cfg.evalEvery === 0) {
        m.val_loss = await validationLoss(s, data, cfg);
        if (st.bestValLoss === null || m.val_loss < st.bestValLoss) {
          st.bestValLoss = m.val_loss;
          st.bestStep = st.step;
        }
      }
      metrics.append(m);
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
            lr,
            gradNorm: m.grad_norm,
            tokensPerS: m.tokens_per_s,
            balance: m.load_max_over_mean,
            etaS: ((cfg.steps - st.step) * tokensPerStep) / rate,
            valLoss: m.val_loss,
          }),
        );
        metrics.writePlot(`moe8 ${cfg.precision} on ${s.backend.name}`);
      }
      if (cfg.saveEvery > 0 && st.step % cfg.saveEvery === 0 && st.step < cfg.steps && !r.skipped) {
        await saveCheckpoint(runDir, s, cfg, data, st);
        pruneCheckpoints(runDir, cfg.keepLast, st.bestStep);
      }
    }
    if (!stop && (cfg.evalEvery === 0 || st.step % cfg.evalEvery !== 0)) {
      const val = await validationLoss(s, data, cfg);
      console.log(`validation loss ${val.toFixed(4)}`);
    }
    // A checkpoint is always written at the end, unless this process did no step at all.
    const dir =
      st.step > firstStep || !resumeFrom ? await saveCheckpoint(runDir, s, cfg, data, st) : resumeFrom.dir;
    pruneCheckpoints(runDir, cfg.keepLast, st.bestStep);
    metrics.writePlot(`moe8 ${cfg.precision} on ${s.backend.name}`);
    console.log(
      `${stop ? "stopped" : "done"} at step ${st.step} in ${formatDuration((performance.now() - t0) / 1000)}; checkpoint ${dir}`,
    );
    return 0;
  } finally {
    process.off("SIGINT", sigint);
    process.off("SIGTERM", sigterm);
    s.dispose();
  }
}
