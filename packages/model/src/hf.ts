// Hugging Face `config.json` for a checkpoint, so `transformers` loads it as DeepseekV3ForCausalLM
// (docs/model.md, "Checkpoint tensor names"), and the way back.
import type { BiasRule } from "@moe8/tensor";
import type { ModelConfig } from "./config.ts";

export function hfConfig(c: ModelConfig): Record<string, unknown> {
  return {
    architectures: ["DeepseekV3ForCausalLM"],
    model_type: "deepseek_v3",
    vocab_size: c.vocab_size,
    hidden_size: c.hidden_size,
    intermediate_size: c.intermediate_size,
    moe_intermediate_size: c.moe_intermediate_size,
    num_hidden_layers: c.num_hidden_layers,
    first_k_dense_replace: c.first_k_dense_replace,
    num_attention_heads: c.num_attention_heads,
    num_key_value_heads: c.num_attention_heads,
    n_shared_experts: c.n_shared_experts,
    n_routed_experts: c.n_routed_experts,
    num_experts_per_tok: c.num_experts_per_tok,
    routed_scaling_factor: c.routed_scaling_factor,
    n_group: 1,
    topk_group: 1,
    topk_method: "noaux_tc",
    scoring_func: "sigmoid",
    norm_topk_prob: true,
    q_lora_rank: c.q_lora_rank > 0 ? c.q_lora_rank : null,
    kv_lora_rank: c.kv_lora_rank,
    qk_nope_head_dim: c.qk_nope_head_dim,
    qk_rope_head_dim: c.qk_rope_head_dim,
    v_head_dim: c.v_head_dim,
    head_dim: c.qk_rope_head_dim,
    rope_interleave: true,
    rope_theta: c.rope_theta,
    rope_scaling: null,
    rms_norm_eps: c.rms_norm_eps,
    hidden_act: "silu",
    max_position_embeddings: c.max_position_embeddings,
    initializer_range: c.initializer_range,
    tie_word_embeddings: false,
    attention_bias: false,
    attention_dropout: 0.0,
    torch_dtype: "float32",
    use_cache: true,
    // DeepSeek-V3's MTP module, stored as layer num_hidden_layers (transformers leaves it unused).
    num_nextn_predict_layers: c.num_nextn_predict_layers ?? 0,
    // moe8's own fields (ignored by transformers): the balancing hyperparameters.
    moe8_bias_update_speed: c.bias_update_speed,
    moe8_bias_update_rule: c.bias_update_rule,
    moe8_seq_aux_alpha: c.seq_aux_alpha,
    moe8_embedding_init_std: c.embedding_init_std,
    moe8_router_init_std: c.router_init_std ?? c.initializer_range,
    moe8_router_noise: c.router_noise ?? 0,
    moe8_router_noise_until: c.router_noise_until ?? 0.5,
    moe8_mtp_loss_weight: c.mtp_loss_weight ?? 0.3,
  };
}

/** The model config stored in a checkpoint's config.json. */
export function fromHfConfig(j: Record<string, unknown>): ModelConfig {
  const n = (k: string, d?: number) => {
    const v = j[k] ?? d;
    if (typeof v !== "number") throw new Error(`config.json: field ${k} is missing or not a number`);
    return v;
  };
  return {
    vocab_size: n("vocab_size"),
    hidden_size: n("hidden_size"),
    num_hidden_layers: n("num_hidden_layers"),
    first_k_dense_replace: n("first_k_dense_replace"),
    num_attention_heads: n("num_attention_heads"),
    q_lora_rank: (j.q_lora_rank as number | null) ?? 0,
    kv_lora_rank: n("kv_lora_rank"),
    qk_nope_head_dim: n("qk_nope_head_dim"),
    qk_rope_head_dim: n("qk_rope_head_dim"),
    v_head_dim: n("v_head_dim"),
    intermediate_size: n("intermediate_size"),
    moe_intermediate_size: n("moe_intermediate_size"),
    n_routed_experts: n("n_routed_experts"),
    num_experts_per_tok: n("num_experts_per_tok"),
    n_shared_experts: n("n_shared_experts"),
    routed_scaling_factor: n("routed_scaling_factor"),
    rms_norm_eps: n("rms_norm_eps"),
    rope_theta: n("rope_theta"),
    max_position_embeddings: n("max_position_embeddings"),
    bias_update_speed: n("moe8_bias_update_speed", 0.001),
    bias_update_rule: biasRule(j.moe8_bias_update_rule),
    seq_aux_alpha: n("moe8_seq_aux_alpha", 1e-4),
    initializer_range: n("initializer_range", 0.006),
    // Checkpoints written before the field drew the embedding with initializer_range.
    embedding_init_std: n("moe8_embedding_init_std", n("initializer_range", 0.006)),
    // Likewise the routers' weights.
    router_init_std: n("moe8_router_init_std", n("initializer_range", 0.006)),
    // Checkpoints written before router noise trained without it.
    router_noise: n("moe8_router_noise", 0),
    router_noise_until: n("moe8_router_noise_until", 0.5),
    // Checkpoints written before multi-token prediction had none.
    num_nextn_predict_layers: n("num_nextn_predict_layers", 0),
    mtp_loss_weight: n("moe8_mtp_loss_weight", 0.3),
  };
}

/** A checkpoint's bias rule; those written before the rule existed used `sign`. */
function biasRule(v: unknown): BiasRule {
  if (v === undefined || v === "sign" || v === "error" || v === "clipped") return v ?? "sign";
  throw new Error(
    `config.json: field moe8_bias_update_rule is ${JSON.stringify(v)} (allowed: sign, error, clipped)`,
  );
}

/** Fields transformers validates as floats: JSON would write 1.0 as 1, which it rejects. */
const FLOAT_FIELDS = [
  "routed_scaling_factor",
  "rope_theta",
  "rms_norm_eps",
  "initializer_range",
  "attention_dropout",
];

/** config.json text with float fields written as floats (`1.0`, not `1`). */
export function hfConfigText(config: Record<string, unknown>): string {
  let text = JSON.stringify(config, null, 2);
  for (const k of FLOAT_FIELDS) text = text.replace(new RegExp(`("${k}": )(-?\\d+)(,?)$`, "m"), "$1$2.0$3");
  return `${text}\n`;
}
