// Starting a run: a new one (--out) or a resumed one (--resume). Everything that can be refused is
// checked before the run folder is written: the config, the data, the memory the model needs, the
// folder itself; then the folder's lock is taken and the leftovers of a killed or failed process
// are cleaned up. A resumed run takes its newest checkpoint that verifies and fits the model and
// optimizer its config builds, falling back to older ones; a run killed before its first
// checkpoint starts again from step 0.
import { existsSync, statSync } from "node:fs";
import { join } from "node:path";
import { clip, readRegularFileSync } from "@moe8/data";
import { UsageError } from "@moe8/fp8-core";
import { createBackend } from "@moe8/kernels";
import type { ModelConfig } from "@moe8/model";
import type { Backend } from "@moe8/tensor";
import type { ParsedArgs } from "../args.ts";
import {
  type CheckpointFiles,
  checkTensorSet,
  latestValidCheckpoint,
  listCheckpoints,
  recoverCheckpoints,
} from "./checkpoint.ts";
import { parseConfig, resolveModel, type TrainConfig } from "./config.ts";
import { openTrainData, type TrainData } from "./data.ts";
import { configFromArgs } from "./flags.ts";
import { modelShapes } from "./load-model.ts";
import { checkMemory, memoryNeed } from "./memory.ts";
import { lockRun, prepareOutDir, type RunLock, removeRunTemporaries } from "./run-dir.ts";
import { buildSession, policyOf, type Session } from "./session.ts";

export interface RunStart {
  cfg: TrainConfig;
  runDir: string;
  lock: RunLock;
  session: Session;
  data: TrainData;
  /** The checkpoint resumed from; null for a run starting at step 0. */
  from: { dir: string; files: CheckpointFiles } | null;
}

/** Start-up recovery, under the lock: what killed or failed processes left is put back or removed. */
function cleanUp(runDir: string, note: (m: string) => void): void {
  for (const n of recoverCheckpoints(runDir))
    note(`removed ${join(runDir, "checkpoints", n)} (left by a killed run)`);
  for (const n of removeRunTemporaries(runDir)) note(`removed ${join(runDir, n)} (left by a killed run)`);
}

/** The backend and the model's memory check, before the model is built. */
function backendFor(cfg: TrainConfig, modelCfg: ModelConfig): Backend {
  const b = createBackend(cfg.backend);
  const moments = policyOf(cfg).optimizer.moments;
  // Activations exist for one micro-batch at a time (--grad-accum).
  const micro = cfg.batchSize / cfg.gradAccum;
  checkMemory(
    memoryNeed(modelCfg, { batch: micro, seq: cfg.seqLen }, { moments }),
    b.name,
    `training this model on ${micro} x ${cfg.seqLen} tokens a micro-batch`,
  );
  return b;
}

export async function startNew(args: ParsedArgs, note: (m: string) => void): Promise<RunStart> {
  const cfg = configFromArgs(args);
  const out = args.flags.out;
  const runDir =
    out === undefined ? join("runs", new Date().toISOString().replace(/[:.]/g, "-")) : String(out);
  const modelCfg = resolveModel(cfg);
  const data = await openTrainData(cfg, modelCfg.vocab_size);
  const backend = backendFor(cfg, modelCfg);
  prepareOutDir(runDir);
  const lock = lockRun(runDir, "--out");
  try {
    cleanUp(runDir, note);
    if (listCheckpoints(runDir).length)
      throw new UsageError(
        `--out ${clip(runDir, 200)}: already holds a run (use --resume ${runDir} to continue it)`,
      );
    if (existsSync(join(runDir, "config.json")))
      note(`${runDir} holds a run stopped before its first checkpoint: starting it again`);
    return { cfg, runDir, lock, session: buildSession(cfg, modelCfg, backend), data, from: null };
  } catch (e) {
    lock.release();
    throw e;
  }
}

/** Tensor names and shapes the session's model and optimizer hold, as checkpoints list them. */
function expectedTensors(s: Session): { model: Map<string, number[]>; optimizer: Map<string, number[]> } {
  const model = modelShapes(s.model);
  const optimizer = new Map<string, number[]>();
  for (const [name, t] of s.opt.stateTensors()) optimizer.set(name, [...t.shape]);
  return { model, optimizer };
}

export async function startResume(args: ParsedArgs, note: (m: string) => void): Promise<RunStart> {
  const f = args.flags;
  const runDir = String(f.resume);
  const extra = Object.keys(f).filter((k) => !["resume", "debug", "trace-precision"].includes(k));
  if (extra.length || args.dotted.length)
    throw new UsageError(
      `--resume takes the run's own configuration; remove --${extra[0] ?? args.dotted[0][0]}`,
    );
  if (!statSync(runDir, { throwIfNoEntry: false })?.isDirectory())
    throw new UsageError(`--resume ${clip(runDir, 200)}: no such run folder`);
  const lock = lockRun(runDir, "--resume");
  let built: { key: string; cfg: TrainConfig; session: Session } | null = null;
  /** The session a checkpoint's config builds (one model for all of a run's checkpoints). */
  const sessionFor = (cfg: TrainConfig) => {
    const key = JSON.stringify(cfg);
    if (built?.key === key) return built;
    built?.session.dispose();
    built = null;
    const modelCfg = resolveModel(cfg);
    built = { key, cfg, session: buildSession(cfg, modelCfg, backendFor(cfg, modelCfg)) };
    return built;
  };
  try {
    cleanUp(runDir, note);
    const skipped: string[] = [];
    const found = latestValidCheckpoint(
      runDir,
      (m) => skipped.push(m),
      (c) => {
        const want = expectedTensors(sessionFor(c.files.state.train_config).session);
        checkTensorSet(join(c.dir, "model.safetensors"), c.files.model, want.model);
        checkTensorSet(join(c.dir, "optimizer.safetensors"), c.files.optimizer, want.optimizer);
      },
    );
    if (found) {
      for (const m of skipped) note(m);
      const { cfg, session } = sessionFor(found.files.state.train_config);
      const data = await openTrainData(cfg, session.model.cfg.vocab_size, found.files.state.data_cursor);
      return { cfg, runDir, lock, session, data, from: found };
    }
    if (skipped.length)
      throw new UsageError(
        `--resume ${clip(runDir, 200)}: no valid checkpoint in ${join(runDir, "checkpoints")} (${skipped[0]})`,
      );
    // Killed before its first checkpoint: the run's config.json starts it again.
    const configPath = join(runDir, "config.json");
    if (!existsSync(configPath))
      throw new UsageError(
        `--resume ${clip(runDir, 200)}: not a run folder (no checkpoint and no config.json)`,
      );
    let raw: unknown;
    try {
      raw = JSON.parse(readRegularFileSync(configPath, "run config", 2 ** 20).toString("utf8"));
    } catch (e) {
      if (e instanceof UsageError) throw e;
      throw new UsageError(`${configPath}: not valid JSON`);
    }
    const cfg = parseConfig(raw, configPath);
    note(`${runDir} has no checkpoint yet: starting it again from step 0`);
    const { session } = sessionFor(cfg);
    const data = await openTrainData(cfg, session.model.cfg.vocab_size);
    return { cfg, runDir, lock, session, data, from: null };
  } catch (e) {
    (built as { session: Session } | null)?.session.dispose();
    lock.release();
    throw e;
  }
}
