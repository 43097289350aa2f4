#!/usr/bin/env bun
// moe8 CLI entry: `bun apps/trainer/src/cli.ts <command> [flags]`, also under Node (tsx) and Deno.
import { UsageError } from "@moe8/fp8-core";
import { HelpRequest } from "./args.ts";
import { runCli } from "./errors.ts";
import { helpText } from "./help.ts";

type Command = (argv: string[]) => Promise<number>;

// Commands load lazily so that `doctor` works even where a heavier dependency cannot load.
const commands: Record<string, () => Promise<Command>> = {
  doctor: async () => (await import("./commands/doctor.ts")).doctor,
  train: async () => (await import("./commands/train.ts")).train,
  eval: async () => (await import("./commands/eval.ts")).evaluate,
  sample: async () => (await import("./commands/sample.ts")).sample,
  parity: async () => (await import("./commands/parity.ts")).parity,
  bench: async () => (await import("./commands/bench/index.ts")).bench,
  "prepare-data": async () => (await import("./commands/prepare-data.ts")).prepareDataCommand,
  export: async () => (await import("./commands/export.ts")).exportCommand,
};

const usage = `usage: moe8 <command> [flags]
commands (moe8 <command> --help lists a command's flags):
  train          pretrain a model (--config tiny|small|file.json --steps N --precision fp8 --backend cpu ...)
  eval           loss of a checkpoint on data (--checkpoint DIR --data PATH [--json])
  sample         generate text from a checkpoint (--checkpoint DIR --prompt TEXT)
  parity         FP8 against BF16 loss parity (--precision fp8 --against bf16 --steps N [--sweep])
  bench          gemm | ops | step | soak | quant benchmarks (--backend ts|cpu|cuda --precision ... [--json])
  prepare-data   tokenise text into Arrow shards (--input ... --out datasets/NAME [--overwrite])
  export         a Hugging Face model folder from a checkpoint (--checkpoint DIR --out DIR [--dtype bf16|f32])
  doctor         runtime, CPU/SIMD, native addon, available backends`;

const [cmd, ...rest] = process.argv.slice(2);
await runCli(async () => {
  if (!cmd || cmd === "--help" || cmd === "help") {
    console.log(usage);
    return 0;
  }
  const load = Object.hasOwn(commands, cmd) ? commands[cmd] : undefined;
  if (!load) throw new UsageError(`unknown command "${cmd}" (commands: ${Object.keys(commands).join(", ")})`);
  try {
    return await (await load())(rest);
  } catch (e) {
    if (!(e instanceof HelpRequest)) throw e;
    console.log(helpText(cmd === "bench" ? "bench gemm|ops|step|soak|quant" : cmd, e));
    return 0;
  }
}, rest.includes("--debug"));
