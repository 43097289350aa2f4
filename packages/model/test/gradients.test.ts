// Finite-difference gradient checks of the whole model and of each part (fp32 policy, ts backend).
import { TsBackend } from "@moe8/tensor";
import { describe, expect, it } from "vitest";
import { fdModel, fp32Model } from "./helpers.ts";

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
