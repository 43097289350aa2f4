// Crash-safe checkpoints: every file is written into a temporary directory and fsynced, the
// directory is renamed into place (atomic on POSIX), and a checksum per file is verified on load.
// `checkpoints/step-N/` holds model.safetensors (docs/model.md names, f32), optimizer.safetensors,
// config.json (Hugging Face DeepSeek-V3), generation_config.json, the dataset's tokenizer as
// tokenizer.json and tokenizer_config.json (so the folder alone is a Hugging Face model: AutoTokenizer
// and AutoModelForCausalLM load it), trainer-state.json and checksums.json. A write that fails
// (a full disk) removes its temporary directory and leaves the previous checkpoints as they were; a
// checkpoint that verifies but is malformed (a missing tensor, a wrong shape, a bad state field) is
// refused as a whole, so `--resume` falls back to the one before it.
import { createHash } from "node:crypto";
import {
  closeSync,
  existsSync,
  fsyncSync,
  mkdirSync,
  openSync,
  readdirSync,
  renameSync,
  rmSync,
  statSync,
} from "node:fs";
import { basename, join } from "node:path";
import { hfTokenizerFiles, ioReason, readRegularFileSync, type Tokenizer } from "@moe8/data";
import { UsageError } from "@moe8/fp8-core";
import { hfConfigText, hfGenerationConfig } from "@moe8/model";
import { fsyncDir, writeAllSync } from "./io.ts";
import { readSafetensors, type StTensor, sha256File, writeSafetensors } from "./safetensors.ts";
import { parseTrainerState, type TrainerState } from "./state.ts";

export const CHECKPOINT_VERSION = 1;
/** trainer-state.json, config.json and checksums.json are a few KB; this bounds a hostile one. */
const MAX_JSON_BYTES = 16 * 2 ** 20;

export type HostTensors = Map<string, { shape: number[]; data: Float32Array }>;

export interface CheckpointFiles {
  model: HostTensors;
  optimizer: HostTensors;
  config: Record<string, unknown>;
  state: TrainerState;
}

/**
 * What writeCheckpoint is given: the state without its version, which the writer adds, and the
 * tokenizer of the run's data (null for a bare .arrows file, whose tokenizer nothing records).
 */
export type CheckpointInput = Omit<CheckpointFiles, "state"> & {
  state: Record<string, unknown>;
  tokenizer: Tokenizer | null;
};

/** Files of the Hugging Face model folder besides config.json: verified when checksums.json lists them. */
export const HF_EXTRA_FILES = ["generation_config.json", "tokenizer.json", "tokenizer_config.json"];

/** generation_config.json and the tokenizer files of a checkpoint. */
function hfExtraFiles(files: CheckpointInput): Record<string, string> {
  const trained = (files.state.train_config as { seqLen?: unknown } | undefined)?.seqLen;
  const context = typeof trained === "number" ? trained : Number(files.config.max_position_embeddings);
  return {
    "generation_config.json": `${JSON.stringify(hfGenerationConfig(context, files.tokenizer?.eotId), null, 2)}\n`,
    ...(files.tokenizer ? hfTokenizerFiles(files.tokenizer, context) : {}),
  };
}

function writeFileSynced(path: string, data: Uint8Array | string): void {
  const fd = openSync(path, "w");
  try {
    writeAllSync(fd, typeof data === "string" ? Buffer.from(data) : data);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

function toSt(m: HostTensors): Map<string, StTensor> {
  return new Map([...m].map(([k, v]) => [k, { dtype: "F32" as const, shape: v.shape, data: v.data }]));
}

/** Writes `checkpoints/step-<step>` atomically and returns its path. */
export function writeCheckpoint(runDir: string, step: number, files: CheckpointInput): string {
  const root = join(runDir, "checkpoints");
  const final = join(root, `step-${step}`);
  const tmp = join(root, `.tmp-step-${step}-${process.pid}`);
  const old = join(root, `.old-step-${step}-${process.pid}`);
  let movedAside = false;
  try {
    mkdirSync(root, { recursive: true });
    rmSync(tmp, { recursive: true, force: true });
    mkdirSync(tmp);
    const sums: Record<string, string> = {
      "model.safetensors": writeSafetensors(join(tmp, "model.safetensors"), toSt(files.model), {
        format: "pt",
      }),
      "optimizer.safetensors": writeSafetensors(join(tmp, "optimizer.safetensors"), toSt(files.optimizer)),
    };
    const contents: Record<string, Uint8Array> = {
      "config.json": Buffer.from(hfConfigText(files.config)),
      ...Object.fromEntries(Object.entries(hfExtraFiles(files)).map(([n, t]) => [n, Buffer.from(t)])),
      "trainer-state.json": Buffer.from(
        `${JSON.stringify({ version: CHECKPOINT_VERSION, ...files.state }, null, 2)}\n`,
      ),
    };
    for (const [name, data] of Object.entries(contents)) {
      writeFileSynced(join(tmp, name), data);
      sums[name] = sha256(data);
    }
    // checksums.json is written last: a directory without it was never completed.
    writeFileSynced(join(tmp, "checksums.json"), `${JSON.stringify(sums, null, 2)}\n`);
    fsyncDir(tmp);
    // Replacing a checkpoint of the same step: move the old one aside first, so that a crash at any
    // point leaves either the old or the new directory complete (start-up recovery renames an
    // `.old-step-N` back when `step-N` is missing).
    if (existsSync(final)) {
      renameSync(final, old);
      movedAside = true;
    }
    renameSync(tmp, final);
    fsyncDir(root);
  } catch (err) {
    try {
      rmSync(tmp, { recursive: true, force: true });
      if (movedAside && !existsSync(final)) renameSync(old, final);
    } catch {} // what cannot be removed now, start-up recovery removes
    if (err instanceof UsageError) throw err;
    throw new UsageError(`cannot write checkpoint ${final}: ${ioReason(err)}; nothing of it was kept`);
  }
  if (movedAside) rmSync(old, { recursive: true, force: true });
  return final;
}

function verified(dir: string, name: string, sums: Record<string, unknown>): string {
  const path = join(dir, name);
  if (!existsSync(path)) throw new UsageError(`checkpoint ${dir}: ${name} is missing`);
  if (sums[name] !== sha256File(path))
    throw new UsageError(`checkpoint ${dir}: ${name} does not match its checksum (truncated or corrupt)`);
  return path;
}

function readJson(path: string, what: string): unknown {
  const text = readRegularFileSync(path, what, MAX_JSON_BYTES).toString("utf8");
  try {
    return JSON.parse(text);
  } catch {
    throw new UsageError(`${path}: not valid JSON`);
  }
}

/** f32 tensors with finite values: a NaN or Inf weight would poison every step or answer after it. */
function hostTensors(path: string, tensors: Map<string, StTensor>): HostTensors {
  const out: HostTensors = new Map();
  for (const [name, t] of tensors) {
    if (t.dtype !== "F32")
      throw new UsageError(`${path}: tensor ${name} is ${t.dtype}, checkpoints hold F32`);
    const data = t.data as Float32Array;
    for (let i = 0; i < data.length; i++)
      if (!Number.isFinite(data[i]))
        throw new UsageError(`${path}: tensor ${name} holds a non-finite value (${data[i]}) at index ${i}`);
    out.set(name, { shape: t.shape, data });
  }
  return out;
}

/** Reads and verifies a checkpoint directory; any problem is a one-line UsageError naming the file. */
export function readCheckpoint(dir: string, withOptimizer = true): CheckpointFiles {
  if (!existsSync(dir)) throw new UsageError(`checkpoint ${dir}: no such directory`);
  const sumsPath = join(dir, "checksums.json");
  if (!existsSync(sumsPath))
    throw new UsageError(
      `checkpoint ${dir}: checksums.json is missing (an unfinished or foreign checkpoint)`,
    );
  const sums = readJson(sumsPath, "checksums.json");
  if (typeof sums !== "object" || sums === null)
    throw new UsageError(`checkpoint ${dir}: checksums.json is not a JSON object`);
  const json = (name: string) => readJson(verified(dir, name, sums as Record<string, unknown>), name);
  // Checkpoints written before these files existed lack them; when listed they must verify.
  for (const name of HF_EXTRA_FILES)
    if (Object.hasOwn(sums, name)) verified(dir, name, sums as Record<string, unknown>);
  const state = parseTrainerState(json("trainer-state.json"), `checkpoint ${dir}: trainer-state.json`);
  const named = /^step-(\d+)$/.exec(basename(dir));
  if (named && Number(named[1]) !== state.step)
    throw new UsageError(`checkpoint ${dir}: trainer-state.json says step ${state.step}`);
  const config = json("config.json");
  if (typeof config !== "object" || config === null || Array.isArray(config))
    throw new UsageError(`checkpoint ${dir}: config.json is not a JSON object`);
  const tensors = (name: string) => {
    const path = verified(dir, name, sums as Record<string, unknown>);
    return hostTensors(path, readSafetensors(path).tensors);
  };
  return {
    model: tensors("model.safetensors"),
    optimizer: withOptimizer ? tensors("optimizer.safetensors") : new Map(),
    config: config as Record<string, unknown>,
    state,
  };
}

/**
 * Checks a checkpoint's tensors against what a model or optimizer holds: the same names, no more
 * and no fewer, each of the expected shape. The message names the first difference.
 */
export function checkTensorSet(where: string, got: HostTensors, want: Map<string, number[]>): void {
  for (const [name, shape] of want) {
    const t = got.get(name);
    if (!t) throw new UsageError(`${where}: tensor ${name} is missing`);
    if (t.shape.join(",") !== shape.join(","))
      throw new UsageError(`${where}: tensor ${name} has shape [${t.shape}], the model wants [${shape}]`);
  }
  for (const name of got.keys())
    if (!want.has(name)) throw new UsageError(`${where}: unexpected tensor ${name.slice(0, 200)}`);
}

/** Completed checkpoints of a run, newest first (unfinished temporary directories are ignored). */
export function listCheckpoints(runDir: string): { step: number; dir: string }[] {
  const root = join(runDir, "checkpoints");
  const st = statSync(root, { throwIfNoEntry: false });
  if (!st) return [];
  if (!st.isDirectory()) throw new UsageError(`${root}: must be a folder of checkpoints`);
  return readdirSync(root)
    .map((n) => /^step-(\d+)$/.exec(n))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => ({ step: Number(m[1]), dir: join(root, m[0]) }))
    .sort((a, b) => b.step - a.step);
}

/**
 * The newest checkpoint that verifies and that `accept` takes (it throws to refuse one), skipping
 * damaged or malformed ones with a note for each.
 */
export function latestValidCheckpoint(
  runDir: string,
  warn: (msg: string) => void = () => {},
  accept: (c: { dir: string; files: CheckpointFiles }) => void = () => {},
): { dir: string; files: CheckpointFiles } | null {
  for (const c of listCheckpoints(runDir)) {
    try {
      const found = { dir: c.dir, files: readCheckpoint(c.dir) };
      if (found.files.state.step !== c.step)
        throw new UsageError(
          `trainer-state.json says step ${found.files.state.step}, the folder step ${c.step}`,
        );
      accept(found);
      return found;
    } catch (e) {
      if (!(e instanceof UsageError)) throw e;
      warn(`skipping ${c.dir}: ${e.message}`);
    }
  }
  return null;
}

/**
 * Start-up recovery of a run folder (under its lock, so no other trainer is writing): a checkpoint
 * moved aside to be replaced when the process died is put back, and the leftovers of killed or
 * failed writes (`.tmp-step-*`, `.del-step-*`, `.old-step-*`) are removed. Returns what was removed.
 */
export function recoverCheckpoints(runDir: string): string[] {
  const root = join(runDir, "checkpoints");
  listCheckpoints(runDir); // refuses a `checkpoints` that is not a folder
  if (!existsSync(root)) return [];
  const removed: string[] = [];
  for (const n of readdirSync(root)) {
    const old = /^\.old-step-(\d+)-\d+$/.exec(n);
    if (old && !existsSync(join(root, `step-${old[1]}`)))
      renameSync(join(root, n), join(root, `step-${old[1]}`));
  }
  for (const n of readdirSync(root))
    if (/^\.(tmp|del|old)-step-/.test(n)) {
      rmSync(join(root, n), { recursive: true, force: true });
      removed.push(n);
    }
  return removed;
}

/**
 * Keeps the newest `keepLast` checkpoints and the one with the best validation loss. A checkpoint
 * is renamed out of the listing before its files are deleted: deleting in place, a kill between two
 * files left a `step-N` directory with some files gone, which readers then had to skip.
 */
export function pruneCheckpoints(runDir: string, keepLast: number, bestStep: number | null): void {
  const root = join(runDir, "checkpoints");
  for (const c of listCheckpoints(runDir).slice(keepLast)) {
    if (c.step === bestStep) continue;
    const doomed = join(root, `.del-step-${c.step}-${process.pid}`);
    try {
      renameSync(c.dir, doomed);
      rmSync(doomed, { recursive: true, force: true });
    } catch (err) {
      throw new UsageError(`cannot remove the old checkpoint ${c.dir}: ${ioReason(err)}`);
    }
  }
}
