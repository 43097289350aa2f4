// The run folder: checked before a run writes into it, and held by one trainer at a time. The lock
// is a file created with O_EXCL holding the owner's pid, host and process start time; a lock whose
// process is gone (killed, the machine rebooted) is stale and taken over, anything else refuses the
// second trainer, whose pruning would otherwise delete the first one's checkpoint being written.
import { mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { hostname } from "node:os";
import { join } from "node:path";
import { brief, clip, errnoCode, ioReason, readRegularFileSync } from "@moe8/data";
import { UsageError } from "@moe8/fp8-core";

export const LOCK_FILE = ".lock";
/** What a run folder holds; anything else means --out names someone else's folder. */
const RUN_ENTRIES = new Set([
  "config.json",
  "metrics.jsonl",
  "loss.svg",
  "expert-load.svg",
  "checkpoints",
  "tensorboard",
  LOCK_FILE,
]);
/** Temporaries of the durable writes (io.ts) and of a lock being taken over. */
const RUN_TEMPORARY =
  /^\.(config\.json|metrics\.jsonl|loss\.svg|expert-load\.svg)\.tmp-\d+$|^\.lock\.stale-\d+$/;

/**
 * Refuses an --out that is empty, a file, under a file, or a folder holding anything a run does
 * not write, then creates it. A run folder left with no checkpoint (killed during its first one) is
 * accepted: the caller restarts it.
 */
export function prepareOutDir(out: string): void {
  if (out.trim() === "") throw new UsageError("--out: the run folder name is empty");
  const shown = clip(out, 200);
  try {
    const st = statSync(out); // a symbolic link to a folder is that folder
    if (!st.isDirectory()) throw new UsageError(`--out ${shown}: exists and is not a folder`);
    const foreign = readdirSync(out).filter((n) => !RUN_ENTRIES.has(n) && !RUN_TEMPORARY.test(n));
    if (foreign.length)
      throw new UsageError(
        `--out ${shown}: exists and is not a moe8 run folder (it holds ${brief(foreign[0], 60)}); choose a new folder`,
      );
  } catch (err) {
    if (err instanceof UsageError) throw err;
    if (errnoCode(err) !== "ENOENT") throw new UsageError(`--out ${shown}: ${ioReason(err)}`);
  }
  try {
    mkdirSync(out, { recursive: true });
  } catch (err) {
    throw new UsageError(`--out ${shown}: cannot create the folder: ${ioReason(err)}`);
  }
}

interface Holder {
  pid: number;
  host: string;
  /** The process's start time in clock ticks since boot (Linux), so a reused pid is not taken for it. */
  start: string | null;
}

function startTime(pid: number): string | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19] ?? null;
  } catch {
    return null;
  }
}

function alive(h: Holder): boolean {
  if (h.host !== hostname()) return true; // another machine's process: it cannot be checked from here
  try {
    process.kill(h.pid, 0);
  } catch (err) {
    return errnoCode(err) === "EPERM"; // ESRCH: no such process
  }
  const now = startTime(h.pid);
  return h.start === null || now === null || now === h.start;
}

function readHolder(path: string): Holder | null {
  try {
    // Bounded, regular files only: a lock replaced by a link to /dev/zero must not be read forever.
    const j = JSON.parse(readRegularFileSync(path, "lock file", 4096).toString("utf8"));
    if (Number.isSafeInteger(j?.pid) && typeof j.host === "string") return j as Holder;
  } catch {}
  return null;
}

export interface RunLock {
  release(): void;
}

/** Takes the run folder's lock or refuses; a stale lock (its process gone) is taken over. */
export function lockRun(dir: string, flag: string): RunLock {
  const path = join(dir, LOCK_FILE);
  const me: Holder = { pid: process.pid, host: hostname(), start: startTime(process.pid) };
  for (let attempt = 0; attempt < 5; attempt++) {
    try {
      writeFileSync(path, `${JSON.stringify(me)}\n`, { flag: "wx" });
      let held = true;
      const release = () => {
        if (!held) return;
        held = false;
        process.off("exit", release);
        if (readHolder(path)?.pid === me.pid) rmSync(path, { force: true });
      };
      process.on("exit", release);
      return { release };
    } catch (err) {
      if (errnoCode(err) !== "EEXIST")
        throw new UsageError(`${flag} ${clip(dir, 200)}: cannot write in the run folder: ${ioReason(err)}`);
    }
    const holder = readHolder(path);
    if (!holder && attempt < 3) {
      // Just created by another trainer and not yet written, or damaged: look again shortly.
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 50);
      continue;
    }
    if (holder && alive(holder))
      throw new UsageError(
        `${flag} ${clip(dir, 200)}: another trainer (pid ${holder.pid}${holder.host === me.host ? "" : ` on ${holder.host}`}) is using this run folder; if none is, remove ${path}`,
      );
    // Stale or unreadable (a lock being written is retried): move it aside in one rename, so two
    // trainers taking over the same stale lock cannot both succeed, then try again.
    const aside = join(dir, `${LOCK_FILE}.stale-${process.pid}`);
    try {
      renameSync(path, aside);
      const moved = readHolder(aside);
      if (moved && alive(moved))
        renameSync(aside, path); // a fresh lock replaced the stale one meanwhile
      else rmSync(aside, { force: true });
    } catch {}
  }
  throw new UsageError(`${flag} ${clip(dir, 200)}: could not take the run folder's lock ${path}`);
}

/** Removes the temporaries of durable writes that a killed process left (a lock aside is its taker's). */
export function removeRunTemporaries(dir: string): string[] {
  const gone = readdirSync(dir).filter((n) => RUN_TEMPORARY.test(n) && !n.startsWith(`${LOCK_FILE}.`));
  for (const n of gone) rmSync(join(dir, n), { recursive: true, force: true });
  return gone;
}
