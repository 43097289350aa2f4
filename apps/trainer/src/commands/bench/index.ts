// `moe8 bench gemm|ops|step|soak|quant`: benchmarks reported as numbers and as ratios against a baseline
// measured in the same run (never asserted by timed tests). One module per benchmark, loaded when
// chosen; they share the flags below (each reads the ones it needs).
import { UsageError } from "@moe8/fp8-core";
import { type FlagSpec, parseArgs } from "../../args.ts";

type Benchmark = (flags: Record<string, unknown>) => Promise<number>;

const BENCHMARKS: Record<string, () => Promise<Benchmark>> = {
  gemm: async () => (await import("./gemm.ts")).benchGemm,
  ops: async () => (await import("./ops.ts")).benchOps,
  step: async () => (await import("./step.ts")).benchStep,
  soak: async () => (await import("./soak.ts")).benchSoak,
  quant: async () => (await import("./quant.ts")).benchQuant,
};

export const BENCH_FLAGS: FlagSpec = {
  backend: "string",
  precision: "string",
  shape: "list",
  groups: "string",
  config: "string",
  steps: "int",
  "batch-size": "int",
  "seq-len": "int",
  json: "boolean",
  profile: "boolean",
  mtp: "boolean",
  baseline: "boolean",
  debug: "boolean",
};

export async function bench(argv: string[]): Promise<number> {
  const [what, ...rest] = argv;
  // `bench --help` has no benchmark name before the flag.
  const { flags } = parseArgs(what === "--help" ? argv : rest, BENCH_FLAGS);
  const load = what !== undefined && Object.hasOwn(BENCHMARKS, what) ? BENCHMARKS[what] : undefined;
  if (!load)
    throw new UsageError(`bench: unknown benchmark "${what ?? ""}" (use gemm, ops, step, soak or quant)`);
  return (await load())(flags);
}
