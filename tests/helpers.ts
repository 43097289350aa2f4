// Running the CLI as users do (a child process), and building small datasets for tests.
import { spawn, spawnSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { tempDir } from "@moe8/tensor/testing";

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
export const CLI = join(ROOT, "apps/trainer/src/cli.ts");

export interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `moe8 <args>` under Bun (the runtime users run the CLI with). */
export function cli(args: string[], env: Record<string, string> = {}): CliResult {
  const r = spawnSync("bun", [CLI, ...args], {
    cwd: ROOT,
    encoding: "utf8",
    env: { ...process.env, NO_COLOR: "1", ...env },
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Starts `moe8 <args>` without waiting (for kill and signal tests). */
export function cliAsync(args: string[], env: Record<string, string> = {}, detached = false) {
  return spawn("bun", [CLI, ...args], {
    cwd: ROOT,
    env: { ...process.env, NO_COLOR: "1", ...env },
    stdio: ["ignore", "pipe", "pipe"],
    // Its own process group (and the children it starts): a test can signal them all, as a terminal's Ctrl-C does.
    detached,
  });
}

/** A temporary folder, removed when the test process exits (tempDir; MOE8_KEEP_TMP=1 keeps it). */
export function tmp(prefix: string): string {
  return tempDir(prefix);
}

/** A short tiny run's flags: small enough for a test, the same model and code paths as a real run. */
export const QUICK = ["--batch-size", "4", "--seq-len", "32", "--eval-every", "0", "--log-every", "1000"];

/** The highest step metrics.jsonl records so far (0 before the first); a line being written is skipped. */
export function lastStep(runDir: string): number {
  const file = join(runDir, "metrics.jsonl");
  if (!existsSync(file)) return 0;
  let last = 0;
  for (const line of readFileSync(file, "utf8").split("\n")) {
    try {
      last = Math.max(last, JSON.parse(line).step);
    } catch {}
  }
  return last;
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Polls until `ready()` (every `ms`), failing after `timeoutMs`. */
export async function until(ready: () => boolean, timeoutMs = 60_000, ms = 5): Promise<void> {
  const t0 = Date.now();
  while (!ready()) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`gave up waiting after ${timeoutMs} ms`);
    await sleep(ms);
  }
}

/** A CLI process started with cliAsync, with its output collected and its end as a promise. */
export function started(args: string[], env: Record<string, string> = {}, detached = false) {
  const child = cliAsync(args, env, detached);
  const out = { stdout: "", stderr: "", done: false };
  child.stdout.on("data", (d) => {
    out.stdout += d;
  });
  child.stderr.on("data", (d) => {
    out.stderr += d;
  });
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) =>
    child.on("exit", (code, signal) => {
      out.done = true;
      res({ code, signal });
    }),
  );
  return { child, out, exit };
}

/** A run's metrics.jsonl, one object per step. */
export function metricsOf(runDir: string): Record<string, number & number[]>[] {
  return readFileSync(join(runDir, "metrics.jsonl"), "utf8")
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l));
}

type Weights = Map<string, { data: unknown }>;

/**
 * Two runs' weights (checkpoint name -> tensor) value by value, the correction biases set apart
 * for the caller's bit-for-bit checks: the largest difference, and the fraction of values further
 * apart than `tol`.
 */
export function weightDiffs(wa: Weights, wb: Weights, tol: number) {
  let [maxDiff, beyond, total] = [0, 0, 0];
  const biases: { name: string; x: Float32Array; y: Float32Array }[] = [];
  for (const [name, t] of wa) {
    const x = t.data as Float32Array;
    const y = wb.get(name)!.data as Float32Array;
    if (name.endsWith("e_score_correction_bias")) {
      biases.push({ name, x, y });
      continue;
    }
    for (let i = 0; i < x.length; i++) {
      const d = Math.abs(x[i] - y[i]);
      maxDiff = Math.max(maxDiff, d);
      if (d > tol) beyond++;
    }
    total += x.length;
  }
  return { maxDiff, beyondFraction: beyond / total, biases };
}
