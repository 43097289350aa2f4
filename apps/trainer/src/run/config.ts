// The training run's configuration: JSON files validated by a zod schema (unknown keys and
// out-of-range values are one-line errors naming the field), then CLI flags on top.
import { brief, clip, readRegularFileSync } from "@moe8/data";
import { UsageError } from "@moe8/fp8-core";
import { CONFIGS, type ModelConfig, STEP_SHAPES } from "@moe8/model";
import { z } from "zod";

// Bounds: generous for any model this trainer can train (DeepSeek-V3 itself fits them), tight
// enough that a typo or a hostile file (hidden_size 1e6, 1e5 layers) is refused here, before any
// memory is allocated; the memory a valid config needs is then estimated (memory.ts).
const pos = (max: number) => z.number().int().positive().max(max);
const nonneg = (max: number) => z.number().int().nonnegative().max(max);
const DIM = 65536;

export const ModelFieldsSchema = z.object({
  vocab_size: pos(2 ** 21),
  hidden_size: pos(DIM),
  num_hidden_layers: pos(1024),
  first_k_dense_replace: nonneg(1024),
  num_attention_heads: pos(1024),
  q_lora_rank: nonneg(DIM),
  kv_lora_rank: pos(DIM),
  qk_nope_head_dim: pos(4096),
  qk_rope_head_dim: pos(4096).multipleOf(2),
  v_head_dim: pos(4096),
  intermediate_size: pos(2 ** 20),
  moe_intermediate_size: pos(2 ** 20),
  n_routed_experts: pos(4096),
  num_experts_per_tok: pos(4096),
  n_shared_experts: nonneg(256),
  routed_scaling_factor: z.number().positive().max(1e6),
  rms_norm_eps: z.number().positive().max(1),
  rope_theta: z.number().positive().max(1e12),
  max_position_embeddings: pos(2 ** 22),
  bias_update_speed: z.number().nonnegative().max(1),
  bias_update_rule: z.enum(["sign", "error", "clipped"]),
  seq_aux_alpha: z.number().nonnegative().max(1e3),
  initializer_range: z.number().positive().max(10),
  embedding_init_std: z.number().positive().max(10),
  router_init_std: z.number().positive().max(10).optional(),
  router_noise: z.number().nonnegative().max(100).optional(),
  // (Past 1: the run ends with noise left; 10 is far past any use.)
  router_noise_until: z.number().positive().max(10).optional(),
  // DeepSeek-V3's multi-token prediction: one module (depth 1) or none.
  num_nextn_predict_layers: nonneg(1).optional(),
  mtp_loss_weight: z.number().nonnegative().max(100).optional(),
});

/**
 * The run's expert balancing (docs/model.md, "Balancing"), on top of the model's own settings:
 * gamma -> bias_update_speed, rule -> bias_update_rule, alpha -> seq_aux_alpha, noise ->
 * router_noise, noiseUntil -> router_noise_until. The same under every
 * precision a run or a parity comparison uses.
 */
export const BalanceSchema = z
  .object({
    gamma: ModelFieldsSchema.shape.bias_update_speed,
    rule: ModelFieldsSchema.shape.bias_update_rule,
    alpha: ModelFieldsSchema.shape.seq_aux_alpha,
    /** The routers' learning rate as a multiple of the run's (AdamWConfig.lrScale.router); 1 by default. */
    routerLr: z.number().positive().max(100),
    noise: ModelFieldsSchema.shape.router_noise.unwrap(),
    noiseUntil: ModelFieldsSchema.shape.router_noise_until.unwrap(),
  })
  .partial()
  .strict();

const modelOverrides = ModelFieldsSchema.extend({ base: z.enum(["tiny", "small"]).default("tiny") })
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
    bias_update_rule: true,
    seq_aux_alpha: true,
    initializer_range: true,
    embedding_init_std: true,
    router_init_std: true,
    router_noise: true,
    router_noise_until: true,
    num_nextn_predict_layers: true,
    mtp_loss_weight: true,
  })
  .strict();

export const TrainConfigSchema = z
  .object({
    model: z.union([z.enum(["tiny", "small"]), modelOverrides]),
    /** Absent from configs written before it existed: nothing overridden. */
    balance: BalanceSchema.default({}),
    steps: pos(1e9),
    batchSize: pos(2 ** 16),
    /**
     * Micro-batches per optimizer step (gradient accumulation); batchSize stays the step's whole
     * batch and must be a multiple of it. Absent from configs written before it existed: 1.
     */
    gradAccum: pos(2 ** 16).default(1),
    seqLen: pos(2 ** 22),
    /** Adam moves each weight by up to lr a step: above 10 every run diverges in its first steps. */
    lr: z.number().positive().max(10),
    minLrRatio: z.number().min(0).max(1),
    warmup: nonneg(1e9),
    schedule: z.enum(["cosine", "wsd"]),
    decayFraction: z.number().gt(0).max(1),
    weightDecay: z.number().nonnegative().max(10),
    clip: z.number().nonnegative().max(1e9),
    beta1: z.number().min(0).lt(1),
    beta2: z.number().min(0).lt(1),
    seed: nonneg(Number.MAX_SAFE_INTEGER),
    /** Seed of the data order when it should differ from the init seed (parity's seed yardstick). */
    dataSeed: nonneg(Number.MAX_SAFE_INTEGER).nullable(),
    evalEvery: nonneg(1e9),
    evalBatches: pos(1e6),
    saveEvery: nonneg(1e9),
    keepLast: pos(1e6),
    logEvery: pos(1e9),
    /**
     * Steps between FP8 range counts (fp8_overflow, fp8_underflow; 0: never). A counted step runs
     * uncaptured with an extra pass per quantisation (on the H200, small's step 6.5x its time), so
     * not every logged one. Absent from configs written before it existed: 100.
     */
    fp8StatsEvery: nonneg(1e9).default(100),
    maxBadSteps: pos(1e6),
    backend: z.enum(["auto", "ts", "cpu", "cuda"]),
    precision: z.string().max(64),
    precisionOverrides: z
      .record(z.string().max(64), z.string().max(64))
      .refine((o) => Object.keys(o).length <= 64, "at most 64 precision overrides"),
    data: z.string().min(1).max(4096).nullable(),
    /**
     * Where TensorBoard event files go: null for the run folder's `tensorboard/`, a folder, or "off".
     * Absent from configs written before it existed: null.
     */
    tensorboard: z.string().min(1).max(4096).nullable().default(null),
    valFraction: z.number().gt(0).lt(1),
  })
  .strict();

export type TrainConfig = z.infer<typeof TrainConfigSchema>;

export const DEFAULTS: TrainConfig = {
  model: "tiny",
  balance: {},
  steps: 600,
  batchSize: STEP_SHAPES.tiny.batch,
  gradAccum: 1,
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
  fp8StatsEvery: 100,
  maxBadSteps: 5,
  backend: "auto",
  precision: "fp8",
  precisionOverrides: {},
  data: null,
  tensorboard: null,
  valFraction: 0.02,
};

/**
 * The first issue, looking into a union (`model`: a preset name or an object of fields) for the
 * alternative that got furthest into the value, so that a bad field of the object is named.
 */
function firstIssue(err: z.ZodError): { issue: z.core.$ZodIssue; path: PropertyKey[] } {
  let issue = err.issues[0];
  let path = [...issue.path];
  while (issue.code === "invalid_union" && issue.errors.length) {
    const deepest = issue.errors.reduce((a, b) =>
      (b[0]?.path.length ?? 0) > (a[0]?.path.length ?? 0) ? b : a,
    );
    if (!deepest[0]?.path.length) break;
    issue = deepest[0];
    path = [...path, ...issue.path];
  }
  return { issue, path };
}

/** One line for the first zod issue: the field path and what is wrong with it. */
export function zodMessage(source: string, err: z.ZodError): string {
  const { issue: i, path: keys } = firstIssue(err);
  const path = keys.map(String).join(".");
  if (i.code === "unrecognized_keys")
    return `${source}: unknown key${i.keys.length > 1 ? "s" : ""} ${i.keys
      .slice(0, 5)
      .map((k) => brief(`${path ? `${path}.` : ""}${k}`, 60))
      .join(", ")}`;
  return `${source}: ${clip(path, 200) || "config"}: ${clip(i.message)}`;
}

export function parseConfig(raw: unknown, source: string): TrainConfig {
  const r = TrainConfigSchema.partial().safeParse(raw);
  if (!r.success) throw new UsageError(zodMessage(source, r.error));
  // A preset model brings its own step shape (small: 8 x 2048 tokens) unless batch or length is given.
  const m = r.data.model;
  const shape = m === "tiny" || m === "small" ? STEP_SHAPES[m] : undefined;
  const c = { ...DEFAULTS, ...(shape ? { batchSize: shape.batch, seqLen: shape.seqLen } : {}), ...r.data };
  if (c.batchSize % c.gradAccum !== 0)
    throw new UsageError(
      `${source}: gradAccum: ${c.gradAccum} micro-batches do not divide the batch of ${c.batchSize} sequences (batchSize is the whole step's batch)`,
    );
  return c;
}

/** A config is a few hundred bytes; 1 MiB bounds what a hostile one makes us read. */
const MAX_CONFIG_BYTES = 2 ** 20;

export function loadConfigFile(path: string): Partial<TrainConfig> {
  const text = readRegularFileSync(path, "config", MAX_CONFIG_BYTES).toString("utf8");
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new UsageError(
      `config ${path}: not valid JSON (${clip((e as Error).message.split("\n")[0], 120)})`,
    );
  }
  const r = TrainConfigSchema.partial().safeParse(raw);
  if (!r.success) throw new UsageError(zodMessage(`config ${path}`, r.error));
  return r.data;
}

/**
 * A model config from any source (a preset with overrides, a checkpoint's config.json) within the
 * schema's bounds and with the cross-field checks zod cannot express.
 */
export function checkModelConfig(m: ModelConfig, source: string): ModelConfig {
  const r = ModelFieldsSchema.safeParse(m);
  if (!r.success) throw new UsageError(zodMessage(source, r.error));
  if (m.num_experts_per_tok > m.n_routed_experts)
    throw new UsageError(
      `${source}: num_experts_per_tok (${m.num_experts_per_tok}) exceeds n_routed_experts (${m.n_routed_experts})`,
    );
  if (m.first_k_dense_replace > m.num_hidden_layers)
    throw new UsageError(
      `${source}: first_k_dense_replace (${m.first_k_dense_replace}) exceeds num_hidden_layers (${m.num_hidden_layers})`,
    );
  return m;
}

/** The model config a run uses, checked, and the run's sequence length against it. */
export function resolveModel(c: TrainConfig): ModelConfig {
  const m: ModelConfig =
    typeof c.model === "string"
      ? { ...CONFIGS[c.model] }
      : (() => {
          const { base, ...rest } = c.model;
          return { ...CONFIGS[base], ...rest };
        })();
  const { gamma, rule, alpha, noise, noiseUntil } = c.balance ?? {};
  if (noise !== undefined) m.router_noise = noise;
  if (noiseUntil !== undefined) m.router_noise_until = noiseUntil;
  if (gamma !== undefined) m.bias_update_speed = gamma;
  if (rule !== undefined) m.bias_update_rule = rule;
  if (alpha !== undefined) m.seq_aux_alpha = alpha;
  checkModelConfig(m, "model");
  if (c.seqLen > m.max_position_embeddings)
    throw new UsageError(
      `--seq-len ${c.seqLen} is beyond the model's max_position_embeddings (${m.max_position_embeddings})`,
    );
  if ((m.num_nextn_predict_layers ?? 0) > 0 && c.seqLen < 2)
    throw new UsageError(
      `--seq-len ${c.seqLen}: multi-token prediction needs sequences of at least 2 tokens`,
    );
  return m;
}
