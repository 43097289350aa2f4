#!/usr/bin/env bun
// moe8 CLI entry: `bun apps/trainer/src/cli.ts <command> [flags]`, also under Node (tsx) and Deno.
import { doctor } from "./commands/doctor.ts";
import { runCli, UsageError } from "./errors.ts";

const commands: Record<string, (argv: string[]) => Promise<number>> = {
  doctor,
};

const usage = `usage: moe8 <command> [flags]
commands:
  doctor [--json]     runtime, CPU/SIMD, native addon, available backends`;

const [cmd, ...rest] = process.argv.slice(2);
await runCli(async () => {
  if (!cmd || cmd === "--help" || cmd === "help") {
    console.log(usage);
    return 0;
  }
  const run = commands[cmd];
  if (!run) throw new UsageError(`unknown command "${cmd}" (commands: ${Object.keys(commands).join(", ")})`);
  return run(rest);
}, rest.includes("--debug"));
