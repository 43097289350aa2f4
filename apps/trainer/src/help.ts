// `moe8 <command> --help`: the command's flags, listed from the table its parser was given (a
// HelpRequest carries it), with a line on each flag from the descriptions below (tests/help.test.ts
// checks that every flag has one; `--model.<field>` flags share one). The table, not this file,
// decides what a command accepts.
import type { FlagKind, HelpRequest } from "./args.ts";

const DESCRIPTIONS: Record<string, string> = {
  against: "the policy to compare with (default bf16)",
  "balance.alpha": "weight of the sequence-wise balance loss",
  "balance.gamma": "speed of the expert bias update",
  "balance.rule": "bias update rule: error, clipped or sign",
  "balance.router-lr": "the routers' learning rate as a multiple of --lr",
  "balance.noise": "width of the uniform noise on the router logits while training (0: none)",
  "balance.noise-until":
    "fraction of the run's steps over which the router noise falls to 0 (past 1: noise left at the end)",
  baseline: "also time the baseline (OpenBLAS or cuBLASLt)",
  backend: "ts, cpu, cuda or auto (the fastest present)",
  batches: "number of batches to evaluate",
  "batch-size": "sequences per step",
  checkpoint: "a checkpoint folder (runs/NAME/checkpoints/step-N)",
  "chunk-bytes": "split long texts into documents of about this many bytes",
  clip: "gradient clipping norm",
  config: "tiny, small or a config.json file",
  data: "a dataset folder (prepare-data) or .arrows file",
  debug: "print the stack trace of an error",
  dtype: "weights of the exported model.safetensors: bf16 (default) or f32",
  "eval-batches": "held-out batches per validation",
  "eval-every": "steps between validations (0: never)",
  "grad-accum": "micro-batches per step: --batch-size split in N pieces (less memory, the same step)",
  ranks: "data-parallel processes on this machine (cpu backend): each takes 1/N of every batch",
  gpus: "data-parallel ranks on N GPUs of this machine (or all), one process each, over NCCL (cuda backend)",
  "check-every":
    "with --ranks or --gpus: compare every rank's weights with rank 0's every N steps (100; 0: never)",
  "expert-parallel":
    "with --ranks or --gpus: split every MoE layer's routed experts over all the ranks, or with N over expert groups of N consecutive ranks (N divides the rank count), each group holding every expert once (tokens go to their experts' ranks in their group)",
  input:
    "a .txt, .md, .jsonl (also .gz), .parquet or .arrow file, a text file, a folder, or a datasets save_to_disk folder",
  json: "print the result as JSON",
  "keep-last": "checkpoints kept besides the best one",
  "log-every": "steps between progress lines",
  "fp8-stats-every": "steps between FP8 range counts (fp8_overflow, fp8_underflow; 0: never)",
  lr: "peak learning rate",
  "max-bad-steps": "stop after this many non-finite steps in a row",
  mtp: "bench step: with the multi-token prediction module (num_nextn_predict_layers 1)",
  "model.base": "the preset the --model.* fields change: tiny or small",
  "no-kv-cache": "run the whole context again for every token (slow; to check the KV cache)",
  speculative:
    "the multi-token prediction module drafts every other token, the trunk verifies (same distribution)",
  "num-samples": "independent samples generated from the prompt",
  out: "output folder",
  overwrite: "replace a previous dataset in --out",
  precision: "precision preset: fp8, bf16, fp32, fp8-tensorwise or fp8-unscaled",
  profile: "time and memory per op class",
  prompt: "text the samples continue",
  "repetition-penalty": "> 1 makes tokens already in the text less likely (1: off)",
  resume: "continue the run in this folder from its newest valid checkpoint",
  "save-every": "steps between checkpoints",
  schedule: "learning-rate schedule: cosine or wsd",
  seed: "random seed",
  seeds: "number of seeds to average over",
  "seq-len": "tokens per sequence",
  shape: "GEMM shape MxNxK",
  groups: "bench gemm --backend cuda: the experts' groups, uneven (as after routing; default) or balanced",
  "shard-bytes": "target size of each Arrow shard",
  steps: "number of steps",
  sweep: "compare each choice of the recipe on its own",
  tensorboard: "TensorBoard event files: a folder, or off (default: the run folder's tensorboard/)",
  temperature: "sampling temperature (0: greedy)",
  "text-field": "JSONL/Parquet/Arrow column holding the text (default text)",
  tokenizer: "byte, bpe:N (train a BPE of N tokens) or a tokenizer.json",
  tokens: "tokens to generate per sample",
  "top-k": "sample among the k most likely tokens (0: all)",
  "top-p": "sample among the most likely tokens holding this much probability (1: all)",
  "trace-precision": "print which precision ran where",
  warmup: "warm-up steps",
  "weight-decay": "AdamW weight decay",
  yardsticks: "also run the yardstick comparisons",
};

const VALUE: Record<FlagKind, string> = {
  string: " VALUE",
  number: " X",
  int: " N",
  "optional-int": " [N]",
  boolean: "",
  list: " VALUE",
};

/** A flag's line; each `--model.<field>` is that field of the model config (docs/model.md). */
export function describe(flag: string): string {
  if (DESCRIPTIONS[flag]) return DESCRIPTIONS[flag];
  if (flag.startsWith("model.")) return `the model config's ${flag.slice(6)} (docs/model.md, "Configs")`;
  return "";
}

export function helpText(command: string, help: HelpRequest): string {
  const rows = Object.entries(help.spec).map(([name, kind]) => [
    `--${name}${VALUE[kind]}`,
    `${describe(name)}${kind === "list" ? " (repeatable)" : ""}`,
  ]);
  for (const p of help.dottedPrefixes) rows.push([`--${p}<name>=VALUE`, "override one part of the preset"]);
  const width = Math.max(...rows.map(([f]) => f.length)) + 2;
  return [
    `usage: moe8 ${command} [flags]`,
    "flags:",
    ...rows.map(([f, d]) => `  ${f.padEnd(width)}${d}`.trimEnd()),
  ].join("\n");
}
