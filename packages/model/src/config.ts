// Model configs (docs/model.md): Hugging Face DeepSeek-V3 field names, the presets `tiny` and `small`.
import type { BiasRule } from "@moe8/tensor";

export interface ModelConfig {
  vocab_size: number;
  hidden_size: number;
  num_hidden_layers: number;
  first_k_dense_replace: number;
  num_attention_heads: number;
  q_lora_rank: number;
  kv_lora_rank: number;
  qk_nope_head_dim: number;
  qk_rope_head_dim: number;
  v_head_dim: number;
  intermediate_size: number;
  moe_intermediate_size: number;
  n_routed_experts: number;
  num_experts_per_tok: number;
  n_shared_experts: number;
  routed_scaling_factor: number;
  rms_norm_eps: number;
  rope_theta: number;
  max_position_embeddings: number;
  /** Auxiliary-loss-free balancing speed gamma (0 disables). */
  bias_update_speed: number;
  /** How the correction bias follows the loads: `sign` (DeepSeek-V3) or `error` (scaled by the load error). */
  bias_update_rule: BiasRule;
  /** Sequence-wise balance loss weight alpha (0 disables). */
  seq_aux_alpha: number;
  /** Init standard deviation of linear weights (and of the embedding unless set apart below). */
  initializer_range: number;
  /**
   * Init standard deviation of the token embedding (moe8's own field): how strongly each token's
   * own vector stands out in the residual stream against what attention adds, i.e. whether the
   * routers can tell the tokens apart at step 0 (docs/model.md, "Initialisation").
   */
  embedding_init_std: number;
  /**
   * Init standard deviation of the MoE routers' weights (moe8's own field; initializer_range when
   * absent): the spread of the router logits across tokens at step 0 against the balancing bias's
   * steps (docs/model.md, "Balancing").
   */
  router_init_std?: number;
  /**
   * Router noise (moe8's own field; 0 when absent): during training each router logit gets uniform
   * noise in [-router_noise, router_noise], its width falling linearly to 0 at `router_noise_until`
   * of the run's steps (a fraction; 0.5 when absent; past 1 the run ends with noise left, width
   * router_noise x (1 - 1/router_noise_until) at its last step). It spreads the tokens over the experts while
   * their router inputs are still nearly alike, instead of all of them choosing the same k
   * (docs/model.md, "Balancing"). Evaluation and generation route without it.
   */
  router_noise?: number;
  router_noise_until?: number;
  /**
   * Multi-token prediction modules (Hugging Face's field; 0 when absent): 1 adds DeepSeek-V3's MTP
   * module of depth 1, which predicts token i + 2 from position i through one more transformer block
   * sharing the embedding and the output head (docs/model.md, "Multi-token prediction").
   */
  num_nextn_predict_layers?: number;
  /** The MTP loss's weight lambda in the training loss (moe8's own field; 0.3 when absent, as DeepSeek-V3 starts). */
  mtp_loss_weight?: number;
}

/** The MTP loss weight of a config with MTP (DeepSeek-V3's 0.3 when unset). */
export function mtpLossWeight(c: ModelConfig): number {
  return c.mtp_loss_weight ?? 0.3;
}

const common = {
  first_k_dense_replace: 1,
  q_lora_rank: 0,
  routed_scaling_factor: 1.0,
  rms_norm_eps: 1e-6,
  rope_theta: 10000,
  // Balancing that works within a few hundred steps (docs/model.md, "Balancing", has the measurements):
  // DeepSeek-V3's sign rule at 0.001 leaves tiny routing every token to the same 2 experts for its
  // first ~100 steps.
  bias_update_speed: 0.08,
  bias_update_rule: "error" as BiasRule,
  seq_aux_alpha: 0.01,
  initializer_range: 0.006,
};

export const CONFIGS: Record<"tiny" | "small", ModelConfig> = {
  tiny: {
    ...common,
    vocab_size: 256,
    hidden_size: 128,
    num_hidden_layers: 4,
    num_attention_heads: 4,
    kv_lora_rank: 64,
    qk_nope_head_dim: 32,
    qk_rope_head_dim: 16,
    v_head_dim: 32,
    intermediate_size: 512,
    moe_intermediate_size: 128,
    n_routed_experts: 8,
    num_experts_per_tok: 2,
    n_shared_experts: 1,
    max_position_embeddings: 128,
    embedding_init_std: 0.006,
    // Measured on cpu, 600 steps, 3 seeds (docs/model.md, "Balancing"): no step above 1.5 load
    // max/mean from step 50 (32-52 steps without), the same validation loss.
    router_noise: 2.0,
    router_noise_until: 0.5,
  },
  small: {
    ...common,
    vocab_size: 32768,
    hidden_size: 1024,
    num_hidden_layers: 8,
    num_attention_heads: 16,
    kv_lora_rank: 256,
    qk_nope_head_dim: 64,
    qk_rope_head_dim: 32,
    v_head_dim: 64,
    intermediate_size: 2816,
    moe_intermediate_size: 256,
    n_routed_experts: 64,
    num_experts_per_tok: 6,
    n_shared_experts: 2,
    max_position_embeddings: 2048,
    // Measured on the H200, 300 steps (docs/model.md, "Balancing"): with the embedding at 0.006 and
    // gamma 0.08 every token goes to the same 6 experts from step 1 (load max/mean 10.6 of at most
    // 10.7); an embedding at 0.1 starts at 4.2, and gamma 0.01 keeps the mean from step 50 at 5.0
    // (9.4 at 0.08) with the lower validation loss (2.00 against 2.04; 2.10 before both).
    embedding_init_std: 0.1,
    bias_update_speed: 0.01,
    // H200, 300 steps, seeds 0-2 (docs/model.md, "Balancing"): router noise 4 whose width would
    // reach 0 at 1.25 runs (0.8 at the last step) with the sequence-wise loss at 1.0 keeps every
    // step from 50 at or under 2.0 (at most 1.67; 1.20 on average) with no expert idle, on every
    // seed; the earlier preset (noise 2 to 0 at the end, alpha 0.3) averaged 1.93-2.70 with up to 14
    // experts idle at once, at a validation loss 1.9% lower (1.905 against 1.941, three seeds).
    router_noise: 4.0,
    router_noise_until: 1.25,
    seq_aux_alpha: 1.0,
  },
};

/** Default tokens per step (seq_len x batch) of each preset. */
export const STEP_SHAPES: Record<"tiny" | "small", { seqLen: number; batch: number }> = {
  tiny: { seqLen: 128, batch: 16 },
  small: { seqLen: 2048, batch: 8 },
};

/** Parameters in total and active per token (routed experts counted k of E). */
export function countParams(c: ModelConfig): { total: number; active: number } {
  const d = c.hidden_size;
  const H = c.num_attention_heads;
  const qk = c.qk_nope_head_dim + c.qk_rope_head_dim;
  const q = c.q_lora_rank > 0 ? c.q_lora_rank * d + c.q_lora_rank + H * qk * c.q_lora_rank : H * qk * d;
  const attn =
    q +
    (c.kv_lora_rank + c.qk_rope_head_dim) * d +
    c.kv_lora_rank +
    H * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank +
    d * H * c.v_head_dim +
    2 * d;
  const dense = 3 * d * c.intermediate_size;
  const expert = 3 * d * c.moe_intermediate_size;
  const shared = c.n_shared_experts * expert;
  const moeTotal = c.n_routed_experts * d + c.n_routed_experts * expert + shared;
  const moeActive = c.n_routed_experts * d + c.num_experts_per_tok * expert + shared;
  const nDense = c.first_k_dense_replace;
  const nMoe = c.num_hidden_layers - nDense;
  const io = 2 * c.vocab_size * d + d;
  // The MTP module: its norms (enorm, hnorm, shared_head.norm), eh_proj [d, 2d] and one more block
  // (a MoE block, as the layers past first_k_dense_replace); the embedding and head are shared.
  const mtp = c.num_nextn_predict_layers ?? 0;
  const mtpOwn = 3 * d + 2 * d * d + attn;
  const mtpDense = c.num_hidden_layers < nDense;
  return {
    total:
      io +
      c.num_hidden_layers * attn +
      nDense * dense +
      nMoe * moeTotal +
      mtp * (mtpOwn + (mtpDense ? dense : moeTotal)),
    active:
      io +
      c.num_hidden_layers * attn +
      nDense * dense +
      nMoe * moeActive +
      mtp * (mtpOwn + (mtpDense ? dense : moeActive)),
  };
}

/**
 * The router noise's width at step `step` (1-based) of a run of `steps`: router_noise, falling
 * linearly to 0 at router_noise_until of the run (past the run's end when above 1; docs/model.md,
 * "Balancing"); 0 without noise.
 */
export function routerNoiseAt(c: ModelConfig, step: number, steps: number): number {
  const s0 = c.router_noise ?? 0;
  if (!(s0 > 0)) return 0;
  const until = Math.max(1, Math.round((c.router_noise_until ?? 0.5) * steps));
  return s0 * Math.max(0, 1 - (step - 1) / until);
}

/** The router noise's seed for step `step` of a run seeded `seed` (a 32-bit mix of the two). */
export function routerNoiseSeed(seed: number, step: number): number {
  return (Math.imul(seed | 0, 0x9e3779b1) + Math.imul(step, 0x85ebca77)) | 0;
}
