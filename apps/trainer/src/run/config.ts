// The training run's configuration: JSON files validated by a zod schema (unknown keys and
// out-of-range values are one-line errors naming the field), then CLI flags on top.
import { readFileSync } from "node:fs";
import { UsageError } from "@moe8/fp8-core";
import { CONFIGS, type ModelConfig, STEP_SHAPES } from "@moe8/model";
import { z } from "zod";

const modelOverrides = z
  .object({
    base: z.enum(["tiny", "small"]).default("tiny"),
    vocab_size: z.number().int().positive(),
    hidden_size: z.number().int().positive(),
    num_hidden_layers: z.number().int().positive(),
    first_k_dense_replace: z.number().int().nonnegative(),
    num_attention_heads: z.number().int().positive(),
    q_lora_rank: z.number().int().nonnegative(),
    kv_lora_rank: z.number().int().positive(),
    qk_nope_head_dim: z.number().int().positive(),
    qk_rope_head_dim: z.number().int().positive().multipleOf(2),
    v_head_dim: z.number().int().positive(),
    intermediate_size: z.number().int().positive(),
    moe_intermediate_size: z.number().int().positive(),
    n_routed_experts: z.number().int().positive(),
    num_experts_per_tok: z.number().int().positive(),
    n_shared_experts: z.number().int().nonnegative(),
    routed_scaling_factor: z.number().positive(),
    rms_norm_eps: z.number().positive(),
    rope_theta: z.number().positive(),
    max_position_embeddings: z.number().int().positive(),
    bias_update_speed: z.number().nonnegative(),
    seq_aux_alpha: z.number().nonnegative(),
    initializer_range: z.number().positive(),
  })
  .partial({
    vocab_size: true,
    hidden_size: true,
    num_hidden_layers: true,
    first_k_dense_replace: true,
    num_attention_heads: true,
    q_lora_rank: true,
    kv_lora_rank: true,
    qk_nope_head_dim: true,
    qk_rope_head_dim: true,
    v_head_dim: true,
    intermediate_size: true,
    moe_intermediate_size: true,
    n_routed_experts: true,
    num_experts_per_tok: true,
    n_shared_experts: true,
    routed_scaling_factor: true,
    rms_norm_eps: true,
    rope_theta: true,
    max_position_embeddings: true,
    bias_update_speed: true,
    seq_aux_alpha: true,
    initializer_range: true,
  })
  .strict();

export const TrainConfigSchema = z
  .object({
    model: z.union([z.enum(["tiny", "small"]), modelOverrides]),
    steps: z.number().int().positive(),
    batchSize: z.number().int().positive(),
    seqLen: z.number().int().positive(),
    lr: z.number().positive(),
    minLrRatio: z.number().min(0).max(1),
    warmup: z.number().int().nonnegative(),
    schedule: z.enum(["cosine", "wsd"]),
    decayFraction: z.number().gt(0).max(1),
    weightDecay: z.number().nonnegative(),
    clip: z.number().nonnegative(),
    beta1: z.number().min(0).lt(1),
    beta2: z.number().min(0).lt(1),
    seed: z.number().int().nonnegative(),
    /** Seed of the data order when it should differ from the init seed (parity's seed yardstick). */
    dataSeed: z.number().int().nonnegative().nullable(),
    evalEvery: z.number().int().nonnegative(),
    evalBatches: z.number().int().positive(),
    saveEvery: z.number().int().nonnegative(),
    keepLast: z.number().int().positive(),
    logEvery: z.number().int().positive(),
    maxBadSteps: z.number().int().positive(),
    backend: z.enum(["auto", "ts", "cpu", "cuda"]),
    precision: z.string(),
    precisionOverrides: z.record(z.string(), z.string()),
    data: z.string().nullable(),
    valFraction: z.number().gt(0).lt(1),
  })
  .strict();

export type TrainConfig = z.infer<typeof TrainConfigSchema>;

export const DEFAULTS: TrainConfig = {
  model: "tiny",
  steps: 600,
  batchSize: STEP_SHAPES.tiny.batch,
  seqLen: STEP_SHAPES.tiny.seqLen,
  lr: 3e-3,
  minLrRatio: 0.1,
  warmup: 30,
  schedule: "cosine",
  decayFraction: 0.2,
  weightDecay: 0.1,
  clip: 1.0,
  beta1: 0.9,
  beta2: 0.95,
  seed: 0,
  dataSeed: null,
  evalEvery: 100,
  evalBatches: 8,
  saveEvery: 200,
  keepLast: 3,
  logEvery: 10,
  maxBadSteps: 5,
  backend: "auto",
  precision: "fp8",
  precisionOverrides: {},
  data: null,
  valFraction: 0.02,
};

/** One line for the first zod issue: the field path and what is wrong with it. */
export function zodMessage(source: string, err: z.ZodError): string {
  const i = err.issues[0];
  const path = i.path.join(".");
  if (i.code === "unrecognized_keys")
    return `${source}: unknown key${i.keys.length > 1 ? "s" : ""} ${i.keys.map((k) => `"${path ? `${path}.` : ""}${k}"`).join(", ")}`;
  return `${source}: ${path || "config"}: ${i.message}`;
}

export function parseConfig(raw: unknown, source: string): TrainConfig {
  const r = TrainConfigSchema.partial().safeParse(raw);
  if (!r.success) throw new UsageError(zodMessage(source, r.error));
  // A preset model brings its own step shape (small: 8 x 2048 tokens) unless batch or length is given.
  const m = r.data.model;
  const shape = m === "tiny" || m === "small" ? STEP_SHAPES[m] : undefined;
  return { ...DEFAULTS, ...(shape ? { batchSize: shape.batch, seqLen: shape.seqLen } : {}), ...r.data };
}

export function loadConfigFile(path: string): Partial<TrainConfig> {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch {
    throw new UsageError(`config ${path}: cannot read the file`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new UsageError(`config ${path}: not valid JSON (${(e as Error).message.split("\n")[0]})`);
  }
  const r = TrainConfigSchema.partial().safeParse(raw);
  if (!r.success) throw new UsageError(zodMessage(`config ${path}`, r.error));
  return r.data;
}

/** The model config a run uses, with the cross-field checks zod cannot express. */
export function resolveModel(c: TrainConfig): ModelConfig {
  const m =
    typeof c.model === "string"
      ? CONFIGS[c.model]
      : (() => {
          const { base, ...rest } = c.model;
          return { ...CONFIGS[base], ...rest };
        })();
  if (c.seqLen > m.max_position_embeddings)
    throw new UsageError(
      `--seq-len ${c.seqLen} is beyond the model's max_position_embeddings (${m.max_position_embeddings})`,
    );
  if (m.num_experts_per_tok > m.n_routed_experts)
    throw new UsageError(
      `model: num_experts_per_tok (${m.num_experts_per_tok}) exceeds n_routed_experts (${m.n_routed_experts})`,
    );
  if (m.first_k_dense_replace > m.num_hidden_layers)
    throw new UsageError(
      `model: first_k_dense_replace (${m.first_k_dense_replace}) exceeds num_hidden_layers (${m.num_hidden_layers})`,
    );
  return m;
}
