// Crash-safe checkpoints: every file is written into a temporary directory and fsynced, the
// directory is renamed into place (atomic on POSIX), and a checksum per file is verified on load.
// `checkpoints/step-N/` holds model.safetensors (docs/model.md names, f32), optimizer.safetensors,
// config.json (Hugging Face DeepSeek-V3), trainer-state.json and checksums.json.
import { createHash } from "node:crypto";
import {
  closeSync,
  existsSync,
  fsyncSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  writeSync,
} from "node:fs";
import { join } from "node:path";
import { UsageError } from "@moe8/fp8-core";
import { hfConfigText } from "@moe8/model";
import { readSafetensors, type StTensor, sha256File, writeSafetensors } from "./safetensors.ts";

export const CHECKPOINT_VERSION = 1;

export interface CheckpointFiles {
  model: Map<string, { shape: number[]; data: Float32Array }>;
  optimizer: Map<string, { shape: number[]; data: Float32Array }>;
  config: Record<string, unknown>;
  state: Record<string, unknown>;
}

function writeFileSynced(path: string, data: Uint8Array | string): void {
  const fd = openSync(path, "w");
  try {
    const buf = typeof data === "string" ? Buffer.from(data) : data;
    let off = 0;
    while (off < buf.length) off += writeSync(fd, buf, off, buf.length - off);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

function fsyncDir(dir: string): void {
  const fd = openSync(dir, "r");
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

function toSt(m: Map<string, { shape: number[]; data: Float32Array }>): Map<string, StTensor> {
  return new Map([...m].map(([k, v]) => [k, { dtype: "F32" as const, shape: v.shape, data: v.data }]));
}

/** Writes `checkpoints/step-<step>` atomically and returns its path. */
export function writeCheckpoint(runDir: string, step: number, files: CheckpointFiles): string {
  const root = join(runDir, "checkpoints");
  mkdirSync(root, { recursive: true });
  const final = join(root, `step-${step}`);
  const tmp = join(root, `.tmp-step-${step}-${process.pid}`);
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
  // point leaves either the old or the new directory complete under a name the loader skips or reads.
  const old = join(root, `.old-step-${step}-${process.pid}`);
  const replacing = existsSync(final);
  if (replacing) renameSync(final, old);
  renameSync(tmp, final);
  fsyncDir(root);
  if (replacing) rmSync(old, { recursive: true, force: true });
  return final;
}

function verified(dir: string, name: string, sums: Record<string, string>): string {
  const path = join(dir, name);
  if (!existsSync(path)) throw new UsageError(`checkpoint ${dir}: ${name} is missing`);
  if (sums[name] !== sha256File(path))
    throw new UsageError(`checkpoint ${dir}: ${name} does not match its checksum (truncated or corrupt)`);
  return path;
}

/** Reads and verifies a checkpoint directory; any problem is a one-line UsageError naming the file. */
export function readCheckpoint(dir: string, withOptimizer = true): CheckpointFiles {
  if (!existsSync(dir)) throw new UsageError(`checkpoint ${dir}: no such directory`);
  const sumsPath = join(dir, "checksums.json");
  if (!existsSync(sumsPath))
    throw new UsageError(
      `checkpoint ${dir}: checksums.json is missing (an unfinished or foreign checkpoint)`,
    );
  let sums: Record<string, string>;
  try {
    sums = JSON.parse(readFileSync(sumsPath, "utf8"));
  } catch {
    throw new UsageError(`checkpoint ${dir}: checksums.json is not valid JSON`);
  }
  const json = (name: string) => JSON.parse(readFileSync(verified(dir, name, sums), "utf8"));
  const state = json("trainer-state.json");
  if (state.version !== CHECKPOINT_VERSION)
    throw new UsageError(
      `checkpoint ${dir}: version ${state.version} is not supported (this moe8 reads version ${CHECKPOINT_VERSION})`,
    );
  const tensors = (name: string) => {
    const { tensors } = readSafetensors(verified(dir, name, sums));
    return new Map([...tensors].map(([k, v]) => [k, { shape: v.shape, data: v.data as Float32Array }]));
  };
  return {
    model: tensors("model.safetensors"),
    optimizer: withOptimizer ? tensors("optimizer.safetensors") : new Map(),
    config: json("config.json"),
    state,
  };
}

/** Completed checkpoints of a run, newest first (unfinished temporary directories are ignored). */
export function listCheckpoints(runDir: string): { step: number; dir: string }[] {
  const root = join(runDir, "checkpoints");
  if (!existsSync(root)) return [];
  return readdirSync(root)
    .map((n) => /^step-(\d+)$/.exec(n))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => ({ step: Number(m[1]), dir: join(root, m[0]) }))
    .sort((a, b) => b.step - a.step);
}

/** The newest checkpoint that verifies, skipping damaged ones (with a note for each). */
export function latestValidCheckpoint(
  runDir: string,
  warn: (msg: string) => void = () => {},
): { dir: string; files: CheckpointFiles } | null {
  for (const c of listCheckpoints(runDir)) {
    try {
      return { dir: c.dir, files: readCheckpoint(c.dir) };
    } catch (e) {
      warn(`skipping ${c.dir}: ${(e as Error).message}`);
    }
  }
  return null;
}

/**
 * Keeps the newest `keepLast` checkpoints and the one with the best validation loss. A checkpoint
 * is renamed out of the listing before its files are deleted: deleting in place, a kill between two
 * files left a `step-N` directory with some files gone, which readers then had to skip.
 */
export function pruneCheckpoints(runDir: string, keepLast: number, bestStep: number | null): void {
  const all = listCheckpoints(runDir);
  const root = join(runDir, "checkpoints");
  all.slice(keepLast).forEach((c) => {
    if (c.step === bestStep) return;
    const doomed = join(root, `.del-step-${c.step}-${process.pid}`);
    renameSync(c.dir, doomed);
    rmSync(doomed, { recursive: true, force: true });
  });
  // Leftovers of killed runs: unfinished writes and half-deleted checkpoints.
  for (const n of existsSync(root) ? readdirSync(root) : [])
    if ((n.startsWith(".tmp-step-") || n.startsWith(".del-step-")) && !n.endsWith(`-${process.pid}`))
      rmSync(join(root, n), { recursive: true, force: true });
}
