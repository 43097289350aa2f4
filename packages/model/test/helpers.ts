import { presetPolicy } from "@moe8/fp8-core";
import { type Backend, type Param, Rng } from "@moe8/tensor";
import { CONFIGS, type ModelConfig } from "../src/config.ts";
import { DeepSeekModel } from "../src/model.ts";

/** A model small enough for finite differences on the ts backend, with every feature switched on. */
export const MICRO: ModelConfig = {
  ...CONFIGS.tiny,
  vocab_size: 11,
  hidden_size: 16,
  num_hidden_layers: 2,
  num_attention_heads: 2,
  kv_lora_rank: 8,
  qk_nope_head_dim: 4,
  qk_rope_head_dim: 4,
  v_head_dim: 4,
  intermediate_size: 24,
  moe_intermediate_size: 8,
  n_routed_experts: 4,
  num_experts_per_tok: 2,
  n_shared_experts: 1,
  routed_scaling_factor: 1.5,
  seq_aux_alpha: 0.05,
  initializer_range: 0.3,
  embedding_init_std: 0.3,
};

export function batchOf(b: Backend, cfg: ModelConfig, B: number, T: number, seed: number) {
  const rng = new Rng(seed);
  const toks = rng.ints(B * (T + 1), cfg.vocab_size);
  const ids = new Int32Array(B * T);
  const tg = new Int32Array(B * T);
  for (let i = 0; i < B; i++)
    for (let t = 0; t < T; t++) {
      ids[i * T + t] = toks[i * (T + 1) + t];
      tg[i * T + t] = toks[i * (T + 1) + t + 1];
    }
  return {
    ids: b.upload(ids, [B * T], "i32"),
    targets: b.upload(tg, [B * T], "i32"),
    shape: { batch: B, seq: T },
  };
}

/**
 * Directional finite-difference check of d(total loss)/d(params in `subset`) along a random
 * direction, against the model's backward. Returns [fd, analytic].
 */
export async function fdModel(
  model: DeepSeekModel,
  subset: Param[],
  seed: number,
  h = 1e-3,
): Promise<[number, number]> {
  const b = model.b;
  const batch = batchOf(b, model.cfg, 2, 5, 7);
  const rng = new Rng(seed);
  const dirs = subset.map((p) => rng.normals(p.value.size));
  model.zeroGrad();
  await b.scope(async () => {
    model.lossAndGrad(batch.ids, batch.targets, batch.shape);
  });
  let an = 0;
  for (let i = 0; i < subset.length; i++) {
    const g = (await subset[i].grad.read()) as Float32Array;
    for (let j = 0; j < g.length; j++) an += g[j] * dirs[i][j];
  }
  const originals = await Promise.all(subset.map(async (p) => (await p.value.read()) as Float32Array));
  const lossAt = async (eps: number) => {
    for (const [i, p] of subset.entries())
      b.write(
        p.value,
        originals[i].map((v, j) => v + eps * dirs[i][j]),
      );
    return b.scope(async () => model.evalLoss(batch.ids, batch.targets, batch.shape).total.item());
  };
  const fd = ((await lossAt(h)) - (await lossAt(-h))) / (2 * h);
  for (const [i, p] of subset.entries()) b.write(p.value, originals[i]);
  return [fd, an];
}

export function fp32Model(b: Backend, cfg = MICRO, seed = 1) {
  return new DeepSeekModel(b, cfg, presetPolicy("fp32"), seed);
}
