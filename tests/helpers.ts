// Running the CLI as users do (a child process), and building small datasets for tests.
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

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
export function cliAsync(args: string[]) {
  return spawn("bun", [CLI, ...args], {
    cwd: ROOT,
    env: { ...process.env, NO_COLOR: "1" },
    stdio: ["ignore", "pipe", "pipe"],
  });
}

export function tmp(prefix: string): string {
  return mkdtempSync(join(tmpdir(), `moe8-${prefix}-`));
}

/** A short tiny run's flags: small enough for a test, the same model and code paths as a real run. */
export const QUICK = ["--batch-size", "4", "--seq-len", "32", "--eval-every", "0", "--log-every", "1000"];
