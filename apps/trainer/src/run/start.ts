// Starting a run: a new one (--out) or a resumed one (--resume). Everything that can be refused is
// checked before the run folder is written: the config, the data, the memory the model needs, the
// folder itself; then the folder's lock is taken and the leftovers of a killed or failed process
// are cleaned up. A resumed run takes its newest checkpoint that verifies and fits the model and
// optimizer its config builds, falling back to older ones; a run killed before its first
// checkpoint starts again from step 0.
import { existsSync, statSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { clip, DEFAULT_DATASET_DIR, readManifest, readRegularFileSync, refuseRawInput } from "@moe8/data";
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
import { checkResumeFlags, configFromArgs, resumedConfig } from "./flags.ts";
import { modelShapes } from "./load-model.ts";
import { checkMemory, memoryNeed } from "./memory.ts";
import { lockRun, prepareOutDir, type RunLock, removeRunTemporaries } from "./run-dir.ts";
import { resized, runSchedule } from "./schedule.ts";
import { buildSession, policyOf, type Session } from "./session.ts";
import type { TokenizerId } from "./state.ts";
import { checkTensorBoardDir } from "./tensorboard.ts";

export interface RunStart {
  cfg: TrainConfig;
  runDir: string;
  lock: RunLock;
  session: Session;
  data: TrainData;
  /** The checkpoint resumed from; null for a run starting at step 0. */
  from: { dir: string; files: CheckpointFiles } | null;
  /** A resumed run whose flags changed its config (config.json is written again). */
  configChanged: boolean;
  /** The folder TensorBoard event files go to, or null (`--tensorboard off`). */
  tensorboard: string | null;
  /** Where the model's vocab_size came from when the dataset gave it (`taken from the dataset's bpe tokenizer`). */
  vocabTaken: string | null;
}

/** Start-up recovery, under the lock: what killed or failed processes left is put back or removed. */
function cleanUp(runDir: string, note: (m: string) => void): void {
  for (const n of recoverCheckpoints(runDir))
    note(`removed ${join(runDir, "checkpoints", n)} (left by a killed run)`);
  for (const n of removeRunTemporaries(runDir)) note(`removed ${join(runDir, n)} (left by a killed run)`);
}

/**
 * The run's TensorBoard folder, not yet created: its own `tensorboard/` (checked with the run
 * folder) unless --tensorboard names another, which is checked here.
 */
function tensorboardDir(cfg: TrainConfig, runDir: string): string | null {
  if (cfg.tensorboard === "off") return null;
  if (cfg.tensorboard === null) return join(runDir, "tensorboard");
  checkTensorBoardDir(cfg.tensorboard);
  return cfg.tensorboard;
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

/** The tokenizer a dataset was made with (its manifest's), or null for a bare .arrows file. */
async function datasetTokenizer(cfg: TrainConfig): Promise<TokenizerId | null> {
  const path = cfg.data ?? DEFAULT_DATASET_DIR;
  let st: ReturnType<typeof statSync>;
  try {
    st = statSync(path, { throwIfNoEntry: false });
  } catch {
    return null; // opening the data names the problem
  }
  if (!st) return null;
  refuseRawInput(path, st.isDirectory()); // raw text: the error that points to prepare-data
  const manifest = st.isDirectory()
    ? await readManifest(path)
    : await readManifest(dirname(path)).then(
        (m) => (m.shards.some((s) => s.file === basename(path)) ? m : null),
        () => null,
      );
  return manifest ? { type: manifest.tokenizer.type, vocab_size: manifest.vocab_size } : null;
}

/**
 * A model whose vocab_size the user did not set (neither a config file nor --model.vocab_size) gets
 * its dataset's: a `prepare-data --tokenizer bpe:N` dataset trains without a config file. Returns
 * the config and what was taken, for the run's first line.
 */
function vocabFromData(
  cfg: TrainConfig,
  tok: TokenizerId | null,
): { cfg: TrainConfig; taken: string | null } {
  const set = typeof cfg.model !== "string" && cfg.model.vocab_size !== undefined;
  if (!tok || set || resolveModel(cfg).vocab_size === tok.vocab_size) return { cfg, taken: null };
  const model = typeof cfg.model === "string" ? { base: cfg.model } : cfg.model;
  return {
    cfg: { ...cfg, model: { ...model, vocab_size: tok.vocab_size } },
    taken: `taken from the dataset's ${tok.type} tokenizer`,
  };
}

/** The config with its dataset's vocab_size where the user set none (train and parity). */
export async function withDatasetVocab(
  given: TrainConfig,
): Promise<{ cfg: TrainConfig; taken: string | null }> {
  return vocabFromData(given, await datasetTokenizer(given));
}

/**
 * A new run. `check` refuses what the caller's own flags need of the run (--ranks, --gpus,
 * --expert-parallel) once the config, its model and backend are known, before the folder is written.
 */
export async function startNew(
  args: ParsedArgs,
  note: (m: string) => void,
  check?: (cfg: TrainConfig, modelCfg: ModelConfig, backend: Backend) => void,
): Promise<RunStart> {
  const { cfg, taken } = await withDatasetVocab(configFromArgs(args));
  const out = args.flags.out;
  const runDir =
    out === undefined ? join("runs", new Date().toISOString().replace(/[:.]/g, "-")) : String(out);
  const modelCfg = resolveModel(cfg);
  const data = await openTrainData(cfg, modelCfg.vocab_size);
  const backend = backendFor(cfg, modelCfg);
  check?.(cfg, modelCfg, backend);
  const tensorboard = tensorboardDir(cfg, runDir);
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
    const session = buildSession(cfg, modelCfg, backend);
    return {
      cfg,
      runDir,
      lock,
      session,
      data,
      from: null,
      configChanged: false,
      vocabTaken: taken,
      tensorboard,
    };
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
  checkResumeFlags(args);
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
      const state = found.files.state;
      const { cfg: own, session } = sessionFor(state.train_config);
      const cfg = resumedConfig(own, args);
      if (cfg.steps < state.step)
        throw new UsageError(`--steps ${cfg.steps}: the run has already done ${state.step} steps`);
      session.schedule = resized(runSchedule(own, state.schedule_from ?? null), state.step, cfg.steps);
      const from = session.schedule.from;
      if (cfg.steps !== own.steps && from)
        note(
          `the run now has ${cfg.steps} steps (it had ${own.steps}); the ${own.schedule} learning rate goes on from step ${from.step}'s ${from.lr.toExponential(3)} (docs/model.md, "Changing a run's length")`,
        );
      const data = await openTrainData(cfg, session.model.cfg.vocab_size, state.data_cursor);
      const configChanged = JSON.stringify(cfg) !== JSON.stringify(own);
      const tensorboard = tensorboardDir(cfg, runDir);
      return { cfg, runDir, lock, session, data, from: found, configChanged, vocabTaken: null, tensorboard };
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
    const own = parseConfig(raw, configPath);
    const cfg = resumedConfig(own, args);
    note(`${runDir} has no checkpoint yet: starting it again from step 0`);
    const { session } = sessionFor(cfg);
    const data = await openTrainData(cfg, session.model.cfg.vocab_size);
    const configChanged = JSON.stringify(cfg) !== JSON.stringify(own);
    const tensorboard = tensorboardDir(cfg, runDir);
    return { cfg, runDir, lock, session, data, from: null, configChanged, vocabTaken: null, tensorboard };
  } catch (e) {
    (built as { session: Session } | null)?.session.dispose();
    lock.release();
    throw e;
  }
}
