// The checkpoint tensors a config implies, by name (docs/model.md, "Checkpoint tensor names"), without
// building the model: `export` checks a checkpoint against them, where allocating and initialising
// `small` to list its tensors would take half a minute and 2 GB. A test holds this list to the
// model's own (DeepSeekModel.namedTensors).
import type { ModelConfig } from "./config.ts";

export function checkpointTensorShapes(c: ModelConfig): Map<string, number[]> {
  const d = c.hidden_size;
  const H = c.num_attention_heads;
  const qk = c.qk_nope_head_dim + c.qk_rope_head_dim;
  const out = new Map<string, number[]>([
    ["model.embed_tokens.weight", [c.vocab_size, d]],
    ["model.norm.weight", [d]],
    ["lm_head.weight", [c.vocab_size, d]],
  ]);
  const swiglu = (prefix: string, inter: number) => {
    out.set(`${prefix}.gate_proj.weight`, [inter, d]);
    out.set(`${prefix}.up_proj.weight`, [inter, d]);
    out.set(`${prefix}.down_proj.weight`, [d, inter]);
  };
  // The MTP module is one more layer (num_hidden_layers) with its own norms and eh_proj.
  const layers = c.num_hidden_layers + (c.num_nextn_predict_layers ?? 0);
  for (let l = 0; l < layers; l++) {
    const p = `model.layers.${l}`;
    if (l >= c.num_hidden_layers) {
      out.set(`${p}.enorm.weight`, [d]);
      out.set(`${p}.hnorm.weight`, [d]);
      out.set(`${p}.eh_proj.weight`, [d, 2 * d]);
      out.set(`${p}.shared_head.norm.weight`, [d]);
    }
    const a = `${p}.self_attn`;
    out.set(`${p}.input_layernorm.weight`, [d]);
    out.set(`${p}.post_attention_layernorm.weight`, [d]);
    if (c.q_lora_rank > 0) {
      out.set(`${a}.q_a_proj.weight`, [c.q_lora_rank, d]);
      out.set(`${a}.q_a_layernorm.weight`, [c.q_lora_rank]);
      out.set(`${a}.q_b_proj.weight`, [H * qk, c.q_lora_rank]);
    } else out.set(`${a}.q_proj.weight`, [H * qk, d]);
    out.set(`${a}.kv_a_proj_with_mqa.weight`, [c.kv_lora_rank + c.qk_rope_head_dim, d]);
    out.set(`${a}.kv_a_layernorm.weight`, [c.kv_lora_rank]);
    out.set(`${a}.kv_b_proj.weight`, [H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank]);
    out.set(`${a}.o_proj.weight`, [d, H * c.v_head_dim]);
    if (l < c.first_k_dense_replace) {
      swiglu(`${p}.mlp`, c.intermediate_size);
      continue;
    }
    out.set(`${p}.mlp.gate.weight`, [c.n_routed_experts, d]);
    out.set(`${p}.mlp.gate.e_score_correction_bias`, [c.n_routed_experts]);
    for (let e = 0; e < c.n_routed_experts; e++) swiglu(`${p}.mlp.experts.${e}`, c.moe_intermediate_size);
    if (c.n_shared_experts > 0)
      swiglu(`${p}.mlp.shared_experts`, c.n_shared_experts * c.moe_intermediate_size);
  }
  return out;
}
