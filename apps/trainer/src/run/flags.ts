// The flags `train`, `parity` and `bench` share, and how they map onto a TrainConfig.

import { clip } from "@moe8/data/errors";
import { UsageError } from "@moe8/fp8-core";
import { STEP_SHAPES } from "@moe8/model";
import { z } from "zod";
import type { FlagSpec, ParsedArgs } from "../args.ts";
import { loadConfigFile, ModelFieldsSchema, parseConfig, type TrainConfig } from "./config.ts";

/**
 * `--model.<field>`: every field a config file's `model` object takes (docs/model.md, "Configs"),
 * checked by the same schema, so with the same bounds and messages; `--model.base tiny|small`.
 */
const MODEL_FIELDS = ["base", ...Object.keys(ModelFieldsSchema.shape)];
const MODEL_FLAGS: FlagSpec = Object.fromEntries(
  MODEL_FIELDS.map((k) => {
    const field = (ModelFieldsSchema.shape as Record<string, z.ZodType>)[k];
    return [`model.${k}`, k === "base" || field instanceof z.ZodEnum ? "string" : "number"];
  }),
);

export const TRAIN_FLAGS: FlagSpec = {
  config: "string",
  steps: "int",
  precision: "string",
  backend: "string",
  data: "string",
  out: "string",
  resume: "string",
  tensorboard: "string",
  seed: "int",
  "eval-every": "int",
  "eval-batches": "int",
  "save-every": "int",
  "keep-last": "int",
  "log-every": "int",
  "fp8-stats-every": "int",
  lr: "number",
  "batch-size": "int",
  "grad-accum": "int",
  ranks: "int",
  gpus: "string",
  "check-every": "int",
  "expert-parallel": "optional-int",
  "seq-len": "int",
  warmup: "int",
  schedule: "string",
  "weight-decay": "number",
  clip: "number",
  "max-bad-steps": "int",
  "balance.gamma": "number",
  "balance.rule": "string",
  "balance.alpha": "number",
  "balance.router-lr": "number",
  "balance.noise": "number",
  "balance.noise-until": "number",
  "trace-precision": "boolean",
  json: "boolean",
  debug: "boolean",
  ...MODEL_FLAGS,
};

const FLAG_TO_KEY: Record<string, keyof TrainConfig> = {
  steps: "steps",
  precision: "precision",
  backend: "backend",
  data: "data",
  tensorboard: "tensorboard",
  seed: "seed",
  "eval-every": "evalEvery",
  "eval-batches": "evalBatches",
  "save-every": "saveEvery",
  "keep-last": "keepLast",
  "log-every": "logEvery",
  "fp8-stats-every": "fp8StatsEvery",
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
const BALANCE_FLAGS = {
  "balance.gamma": "gamma",
  "balance.rule": "rule",
  "balance.alpha": "alpha",
  "balance.router-lr": "routerLr",
  "balance.noise": "noise",
  "balance.noise-until": "noiseUntil",
} as const;

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
  const merged: Record<string, unknown> = { ...base, ...over, precisionOverrides, balance };
  const fields = MODEL_FIELDS.filter((k) => f[`model.${k}`] !== undefined);
  if (fields.length) {
    // A preset given by name keeps its step shape (small: 8 x 2048) under changed fields.
    const m = base.model ?? "tiny";
    if (typeof m === "string") {
      merged.batchSize ??= STEP_SHAPES[m].batch;
      merged.seqLen ??= STEP_SHAPES[m].seqLen;
    }
    merged.model = {
      ...(typeof m === "string" ? { base: m } : m),
      ...Object.fromEntries(fields.map((k) => [k, f[`model.${k}`]])),
    };
  }
  return validated(merged, args);
}

/**
 * The flags `--resume` takes besides its own: how long the run goes on and what it writes, never
 * what a step computes (docs/reliability.md, "Extending a run").
 */
export const RESUME_FLAGS = ["steps", "eval-every", "save-every", "keep-last", "tensorboard"];
const RESUME_OWN = ["resume", "debug", "trace-precision", "ranks", "gpus", "check-every", "expert-parallel"];

/** Refuses, before anything is opened, a flag that --resume cannot change. */
export function checkResumeFlags(args: ParsedArgs): void {
  const fixed = Object.keys(args.flags).filter((k) => !RESUME_OWN.includes(k) && !RESUME_FLAGS.includes(k));
  if (fixed.length || args.dotted.length)
    throw new UsageError(
      `--resume continues the run with its own configuration: --${fixed[0] ?? args.dotted[0][0]} cannot be changed (${RESUME_FLAGS.map((f) => `--${f}`).join(", ")} can)`,
    );
}

/** A resumed run's config: its own, with the RESUME_FLAGS given, validated as a new run's flags are. */
export function resumedConfig(cfg: TrainConfig, args: ParsedArgs): TrainConfig {
  checkResumeFlags(args);
  const over: Record<string, unknown> = {};
  for (const flag of RESUME_FLAGS)
    if (args.flags[flag] !== undefined) over[FLAG_TO_KEY[flag]] = args.flags[flag];
  return validated({ ...cfg, ...over }, args);
}

function validated(merged: Record<string, unknown>, args: ParsedArgs): TrainConfig {
  const f = args.flags;
  // Flag values are reported by flag name: map zod's field names back for the message.
  try {
    return parseConfig(merged, "flags");
  } catch (e) {
    const m = /^flags: ([\w.]+): (.*)$/.exec((e as Error).message);
    const keys: [string, string][] = [
      ...Object.entries(FLAG_TO_KEY),
      ...Object.entries(BALANCE_FLAGS).map(([flag, k]): [string, string] => [flag, `balance.${k}`]),
      ...MODEL_FIELDS.map((k): [string, string] => [`model.${k}`, `model.${k}`]),
    ];
    const flag = m && keys.find(([, k]) => k === m[1])?.[0];
    if (m && flag && f[flag] !== undefined)
      throw new UsageError(`--${flag} ${clip(String(f[flag]), 80)}: ${m[2]}`);
    throw e;
  }
}
