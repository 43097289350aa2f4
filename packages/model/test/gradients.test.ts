// Finite-difference gradient checks of the whole model and of each part (fp32 policy, ts backend).
import { TsBackend } from "@moe8/tensor";
import { describe, expect, it } from "vitest";
import { fdModel, fp32Model, MICRO } from "./helpers.ts";

describe("model gradients match finite differences", () => {
  const b = new TsBackend();
  const model = fp32Model(b);
  const by = (re: RegExp) => model.params.filter((p) => re.test(p.name));
  const parts: [string, RegExp][] = [
    ["whole model", /./],
    ["embedding", /embed_tokens/],
    ["output head", /lm_head/],
    ["norms", /layernorm|model\.norm/],
    ["attention (MLA)", /self_attn\.(q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)/],
    ["dense FFN", /layers\.0\.mlp/],
    ["router gate (incl. balance loss)", /mlp\.gate\.weight/],
    ["routed experts", /mlp\.experts\./],
    ["shared experts", /mlp\.shared_experts\./],
  ];
  for (const [name, re] of parts)
    it(name, async () => {
      const subset = by(re);
      expect(subset.length).toBeGreaterThan(0);
      const [fd, an] = await fdModel(model, subset, name.length, name === "whole model" ? 3e-4 : 1e-3);
      expect(Math.abs(an)).toBeGreaterThan(1e-6);
      expect(Math.abs(fd - an) / Math.abs(an), `fd ${fd} analytic ${an}`).toBeLessThan(2e-3);
    });

  it("q_lora_rank > 0 (q_a_proj, q_a_layernorm, q_b_proj)", async () => {
    const m = fp32Model(b, { ...model.cfg, q_lora_rank: 6 }, 3);
    const subset = m.params.filter((p) => /q_a_proj|q_a_layernorm|q_b_proj/.test(p.name));
    expect(subset.length).toBe(6);
    const [fd, an] = await fdModel(m, subset, 5);
    expect(Math.abs(fd - an) / Math.abs(an)).toBeLessThan(2e-3);
  });
});

// DeepSeek-V3's multi-token prediction module (layer num_hidden_layers of MICRO: 2, a MoE block),
// its weight apart from the default so that a gradient missing it cannot pass. Its loss reaches the
// shared embedding (token i + 1's) and head, and the trunk through h_i.
describe("model gradients with multi-token prediction match finite differences", () => {
  const b = new TsBackend();
  const model = fp32Model(b, { ...MICRO, num_nextn_predict_layers: 1, mtp_loss_weight: 0.7 }, 4);
  const parts: [string, RegExp][] = [
    ["whole model", /./],
    ["MTP module", /^model\.layers\.2\./],
    ["MTP eh_proj and norms", /layers\.2\.(eh_proj|enorm|hnorm|shared_head)/],
    ["MTP block's experts and router", /layers\.2\.mlp\./],
    ["embedding (shared)", /embed_tokens/],
    ["output head (shared)", /lm_head/],
    ["trunk's last block", /^model\.layers\.1\./],
  ];
  for (const [name, re] of parts)
    it(name, async () => {
      const subset = model.params.filter((p) => re.test(p.name));
      expect(subset.length).toBeGreaterThan(0);
      const [fd, an] = await fdModel(model, subset, name.length + 17, name === "whole model" ? 3e-4 : 1e-3);
      expect(Math.abs(an)).toBeGreaterThan(1e-6);
      expect(Math.abs(fd - an) / Math.abs(an), `fd ${fd} analytic ${an}`).toBeLessThan(2e-3);
    });
});
