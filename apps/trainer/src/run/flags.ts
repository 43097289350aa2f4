// The flags `train`, `parity` and `bench` share, and how they map onto a TrainConfig.

import { clip } from "@moe8/data/errors";
import { UsageError } from "@moe8/fp8-core";
import type { FlagSpec, ParsedArgs } from "../args.ts";
import { loadConfigFile, parseConfig, type TrainConfig } from "./config.ts";

export const TRAIN_FLAGS: FlagSpec = {
  config: "string",
  steps: "int",
  precision: "string",
  backend: "string",
  data: "string",
  out: "string",
  resume: "string",
  seed: "int",
  "eval-every": "int",
  "eval-batches": "int",
  "save-every": "int",
  "keep-last": "int",
  "log-every": "int",
  lr: "number",
  "batch-size": "int",
  "grad-accum": "int",
  "seq-len": "int",
  warmup: "int",
  schedule: "string",
  "weight-decay": "number",
  clip: "number",
  "max-bad-steps": "int",
  "balance.gamma": "number",
  "balance.rule": "string",
  "balance.alpha": "number",
  "trace-precision": "boolean",
  json: "boolean",
  debug: "boolean",
};

const FLAG_TO_KEY: Record<string, keyof TrainConfig> = {
  steps: "steps",
  precision: "precision",
  backend: "backend",
  data: "data",
  seed: "seed",
  "eval-every": "evalEvery",
  "eval-batches": "evalBatches",
  "save-every": "saveEvery",
  "keep-last": "keepLast",
  "log-every": "logEvery",
  lr: "lr",
  "batch-size": "batchSize",
  "grad-accum": "gradAccum",
  "seq-len": "seqLen",
  warmup: "warmup",
  schedule: "schedule",
  "weight-decay": "weightDecay",
  clip: "clip",
  "max-bad-steps": "maxBadSteps",
};

/** The balancing flags: fields of TrainConfig.balance (docs/model.md, "Balancing"). */
const BALANCE_FLAGS = { "balance.gamma": "gamma", "balance.rule": "rule", "balance.alpha": "alpha" } as const;

/** DEFAULTS <- preset or config file (--config) <- flags; validated as a whole. */
export function configFromArgs(args: ParsedArgs): TrainConfig {
  const f = args.flags;
  let base: Partial<TrainConfig> = {};
  const c = f.config as string | undefined;
  if (c !== undefined) {
    if (c === "tiny" || c === "small") base = { model: c };
    else if (c.endsWith(".json")) base = loadConfigFile(c);
    else throw new UsageError(`--config "${c}": use tiny, small or a .json config file`);
  }
  const over: Record<string, unknown> = {};
  for (const [flag, key] of Object.entries(FLAG_TO_KEY)) if (f[flag] !== undefined) over[key] = f[flag];
  const precisionOverrides = { ...(base.precisionOverrides ?? {}) };
  for (const [k, v] of args.dotted) precisionOverrides[k.replace(/^precision\./, "")] = v;
  const balance: Record<string, unknown> = { ...(base.balance ?? {}) };
  for (const [flag, key] of Object.entries(BALANCE_FLAGS)) if (f[flag] !== undefined) balance[key] = f[flag];
  const merged = { ...base, ...over, precisionOverrides, balance };
  // Flag values are reported by flag name: map zod's field names back for the message.
  try {
    return parseConfig(merged, "flags");
  } catch (e) {
    const m = /^flags: ([\w.]+): (.*)$/.exec((e as Error).message);
    const keys: [string, string][] = [
      ...Object.entries(FLAG_TO_KEY),
      ...Object.entries(BALANCE_FLAGS).map(([flag, k]): [string, string] => [flag, `balance.${k}`]),
    ];
    const flag = m && keys.find(([, k]) => k === m[1])?.[0];
    if (m && flag && f[flag] !== undefined)
      throw new UsageError(`--${flag} ${clip(String(f[flag]), 80)}: ${m[2]}`);
    throw e;
  }
}
