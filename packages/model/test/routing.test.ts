// Routing properties, auxiliary-loss-free balancing, and the precision trace.
import { parsePolicy, presetPolicy } from "@moe8/fp8-core";
import { MoELayer } from "@moe8/moe-layers";
import { ADAMW_DEFAULTS, AdamW } from "@moe8/optimizer";
import { Rng, TsBackend } from "@moe8/tensor";
import { describe, expect, it } from "vitest";
import { CONFIGS, countParams, routerNoiseAt, routerNoiseSeed } from "../src/config.ts";
import { fromHfConfig, hfConfig } from "../src/hf.ts";
import { DeepSeekModel } from "../src/model.ts";
import { trainStep } from "../src/train-step.ts";
import { batchOf, MICRO } from "./helpers.ts";

const b = new TsBackend();

describe("router", () => {
  it("the bias changes which experts are chosen but not the weights; weights sum to the scaling factor", async () => {
    const rng = new Rng(3);
    const N = 64;
    const E = 8;
    const logits = b.upload(rng.normals(N * E), [N, E]);
    const zero = b.zeros([E]);
    const biased = b.upload(
      Float32Array.from({ length: E }, (_, e) => (e === 5 ? 10 : 0)),
      [E],
    );
    const r0 = b.router(logits, zero, 2, 2.5);
    const r1 = b.router(logits, biased, 2, 2.5);
    const s = (await r1.scores.read()) as Float32Array;
    const idx = (await r1.topIdx.read()) as Int32Array;
    const w = (await r1.weights.read()) as Float32Array;
    const idx0 = (await r0.topIdx.read()) as Int32Array;
    let changed = 0;
    for (let n = 0; n < N; n++) {
      expect(idx[n * 2]).toBe(5); // the bias forces expert 5 first
      if (idx0[n * 2] !== 5 && idx0[n * 2 + 1] !== 5) changed++;
      const sel = [idx[n * 2], idx[n * 2 + 1]];
      const sum = s[n * E + sel[0]] + s[n * E + sel[1]];
      for (let j = 0; j < 2; j++) expect(w[n * 2 + j]).toBeCloseTo((2.5 * s[n * E + sel[j]]) / sum, 6);
      expect(w[n * 2] + w[n * 2 + 1]).toBeCloseTo(2.5, 5);
    }
    expect(changed).toBeGreaterThan(N / 2);
  });

  it("bias updates drive a skewed load toward balance (max/mean -> 1)", async () => {
    const cfg = {
      ...MICRO,
      hidden_size: 32,
      n_routed_experts: 8,
      num_experts_per_tok: 2,
      bias_update_speed: 0.01,
      bias_update_rule: "sign" as const,
      seq_aux_alpha: 0,
    };
    const rng = new Rng(5);
    const pol = presetPolicy("fp32")["moe-layers"];
    const layer = new MoELayer(b, { cfg, prefix: "moe", precision: pol, init: (n) => rng.normals(n, 0.1) });
    // Skew: experts 0 and 1 get a large affinity for every token.
    const gw = (await layer.gate.value.read()) as Float32Array;
    const x0 = rng.normals(256 * 32);
    for (let c = 0; c < 32; c++) {
      gw[0 * 32 + c] += 0.2;
      gw[1 * 32 + c] += 0.15;
    }
    b.write(layer.gate.value, gw);
    const x = b.keep(
      b.upload(
        x0.map((v) => Math.abs(v)),
        [256, 32],
      ),
    );
    const ratio: number[] = [];
    for (let step = 0; step < 150; step++)
      await b.scope(async () => {
        layer.forward(x, 1, 256);
        layer.clearSaved();
        ratio.push((await layer.loadStats()).maxOverMean);
        layer.updateBias();
      });
    // Sign updates settle into a small oscillation around balance rather than converging exactly.
    const last = ratio.slice(-20);
    expect(ratio[0]).toBeGreaterThan(3.5);
    expect(last.reduce((a, r) => a + r, 0) / last.length).toBeLessThan(1.7);
    expect(Math.min(...last)).toBeLessThan(1.3);
  });
});

describe("model", () => {
  it("tiny has the parameter counts docs/model.md gives", () => {
    const c = countParams(CONFIGS.tiny);
    expect(c.total / 1e6).toBeCloseTo(1.86, 1);
    expect(c.active / 1e6).toBeCloseTo(0.95, 1);
    const s = countParams(CONFIGS.small);
    expect(Math.round(s.total / 1e6)).toBeGreaterThan(455);
    expect(Math.round(s.total / 1e6)).toBeLessThan(480);
  });

  it("parameter names are the checkpoint names of docs/model.md", () => {
    const m = new DeepSeekModel(b, MICRO, presetPolicy("fp32"), 1);
    const names = m.namedTensors().map((t) => t.name);
    for (const n of [
      "model.embed_tokens.weight",
      "model.layers.0.input_layernorm.weight",
      "model.layers.0.self_attn.q_proj.weight",
      "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
      "model.layers.0.self_attn.kv_a_layernorm.weight",
      "model.layers.0.self_attn.kv_b_proj.weight",
      "model.layers.0.self_attn.o_proj.weight",
      "model.layers.0.post_attention_layernorm.weight",
      "model.layers.0.mlp.gate_proj.weight",
      "model.layers.1.mlp.gate.weight",
      "model.layers.1.mlp.gate.e_score_correction_bias",
      "model.layers.1.mlp.experts.3.down_proj.weight",
      "model.layers.1.mlp.shared_experts.up_proj.weight",
      "model.norm.weight",
      "lm_head.weight",
    ])
      expect(names).toContain(n);
    m.dispose();
  });

  it("the precision trace: swapping one package's policy changes exactly that package's GEMMs", async () => {
    const table = async (overrides: [string, string][]) => {
      const m = new DeepSeekModel(b, MICRO, parsePolicy({ preset: "fp8", overrides }), 1);
      const batch = batchOf(b, MICRO, 2, 5, 1);
      await b.scope(async () => m.lossAndGrad(batch.ids, batch.targets, batch.shape));
      const t = m.trace.table();
      m.dispose();
      return t;
    };
    const base = await table([]);
    expect(base.attention).toEqual({ fprop: "fp8", dgrad: "fp8", wgrad: "fp8" });
    expect(base["moe-layers"]).toEqual({ fprop: "f32+fp8", dgrad: "f32+fp8", wgrad: "f32+fp8" }); // router gate stays f32
    expect(base.model).toEqual({ fprop: "bf16", dgrad: "bf16", wgrad: "bf16" });
    const swapped = await table([["precision.attention", "bf16"]]);
    expect(swapped.attention).toEqual({ fprop: "bf16", dgrad: "bf16", wgrad: "bf16" });
    expect(swapped["moe-layers"]).toEqual(base["moe-layers"]);
    expect(swapped.model).toEqual(base.model);
    const wgrad = await table([["precision.moe-layers.wgrad", "bf16"]]);
    expect(wgrad["moe-layers"]).toEqual({ fprop: "f32+fp8", dgrad: "f32+fp8", wgrad: "bf16+f32" });
    expect(wgrad.attention).toEqual(base.attention);
  });

  it("training steps lower the loss and leave no tensor behind", async () => {
    const m = new DeepSeekModel(
      b,
      { ...MICRO, initializer_range: 0.05, embedding_init_std: 0.05 },
      presetPolicy("fp8"),
      2,
    );
    const opt = new AdamW(b, m.params, { ...ADAMW_DEFAULTS, moments: "bf16" });
    const batch = batchOf(b, MICRO, 2, 8, 9);
    const before = b.stats();
    const losses = [];
    for (let i = 0; i < 30; i++)
      losses.push((await trainStep(m, opt, batch.ids, batch.targets, batch.shape, 1e-2)).loss);
    expect(b.stats()).toEqual(before);
    expect(losses[29]).toBeLessThan(losses[0] * 0.8);
  });
});

describe("router_init_std", () => {
  const b = new TsBackend();
  const gateStd = async (cfg: typeof MICRO) => {
    const m = new DeepSeekModel(b, cfg, presetPolicy("fp8"), 3);
    const w = (await m.params.find((p) => p.name.endsWith(".mlp.gate.weight"))!.value.read()) as Float32Array;
    const other = (await m.params
      .find((p) => p.name.endsWith(".o_proj.weight"))!
      .value.read()) as Float32Array;
    const rms = (x: Float32Array) => Math.sqrt(x.reduce((a, v) => a + v * v, 0) / x.length);
    m.dispose();
    return { gate: rms(w), other: rms(other) };
  };

  it("draws the routers' weights with their own std, initializer_range when absent, the rest unchanged", async () => {
    const base = await gateStd({ ...MICRO, initializer_range: 0.02 });
    const wide = await gateStd({ ...MICRO, initializer_range: 0.02, router_init_std: 0.2 });
    expect(base.gate / 0.02).toBeGreaterThan(0.7);
    expect(base.gate / 0.02).toBeLessThan(1.3);
    // The same normal draws scaled: exactly 10x, and every other weight as before.
    expect(wide.gate / base.gate).toBeCloseTo(10, 4);
    expect(wide.other).toBe(base.other);
  });

  it("is written to config.json as moe8_router_init_std and read back; older configs mean initializer_range", () => {
    const c = { ...MICRO, router_init_std: 0.03 };
    expect(hfConfig(c).moe8_router_init_std).toBe(0.03);
    expect(fromHfConfig(hfConfig(c)).router_init_std).toBe(0.03);
    const { moe8_router_init_std: _, ...old } = hfConfig({ ...MICRO, initializer_range: 0.04 });
    expect(fromHfConfig(old).router_init_std).toBe(0.04);
  });
});

describe("router noise", () => {
  it("falls linearly from router_noise to 0 at router_noise_until of the run; none when absent", () => {
    const c = { ...MICRO, router_noise: 2, router_noise_until: 0.5 };
    expect(routerNoiseAt(c, 1, 600)).toBe(2);
    expect(routerNoiseAt(c, 151, 600)).toBeCloseTo(1, 12);
    expect(routerNoiseAt(c, 301, 600)).toBe(0);
    expect(routerNoiseAt(c, 600, 600)).toBe(0);
    expect(routerNoiseAt({ ...MICRO, router_noise: undefined }, 1, 600)).toBe(0);
    // Past 1 the run ends before the noise does: width 2 x (1 - 599/750) at the last step.
    const past = { ...c, router_noise_until: 1.25 };
    expect(routerNoiseAt(past, 600, 600)).toBeCloseTo(2 * (1 - 599 / 750), 12);
    expect(routerNoiseAt(past, 376, 600)).toBeCloseTo(1, 12);
    expect(routerNoiseSeed(1, 2)).not.toBe(routerNoiseSeed(1, 3));
    expect(routerNoiseSeed(1, 2)).not.toBe(routerNoiseSeed(2, 2));
  });

  it("is on by default for tiny (half the run) and small (past the run's end), and config.json keeps it; older configs trained without it", () => {
    expect(CONFIGS.tiny.router_noise).toBeGreaterThan(0);
    expect(CONFIGS.small.router_noise).toBeGreaterThan(0);
    expect(CONFIGS.small.router_noise_until).toBeGreaterThan(1);
    const c = { ...MICRO, router_noise: 1.5, router_noise_until: 0.25 };
    expect(fromHfConfig(hfConfig(c))).toMatchObject({ router_noise: 1.5, router_noise_until: 0.25 });
    const { moe8_router_noise: _, moe8_router_noise_until: __, ...old } = hfConfig(c);
    expect(fromHfConfig(old)).toMatchObject({ router_noise: 0, router_noise_until: 0.5 });
  });

  it("spreads a collapsed router's tokens over the experts in training, and evaluation routes without it", async () => {
    const b = new TsBackend();
    // Every router weight 0: every token's scores are equal, so every token takes the same k experts.
    const m = new DeepSeekModel(b, MICRO, presetPolicy("fp32"), 5);
    for (const p of m.params)
      if (p.name.endsWith(".mlp.gate.weight")) b.write(p.value, new Float32Array(p.value.size));
    const opt = new AdamW(b, m.params, ADAMW_DEFAULTS);
    const batch = batchOf(b, MICRO, 4, 8, 3);
    const step = (routerNoise?: { scale: number; seed: number }) =>
      trainStep(m, opt, batch.ids, batch.targets, batch.shape, 0, { routerNoise });
    const k = MICRO.num_experts_per_tok;
    const used = (counts: number[]) => counts.filter((c) => c > 0).length;
    expect(used((await step()).load[0].counts)).toBe(k);
    expect(used((await step({ scale: 2, seed: 1 })).load[0].counts)).toBeGreaterThan(k);
    // After a noisy step the layers hold no noise: the same step without it routes as before.
    expect(used((await step()).load[0].counts)).toBe(k);
    expect(m.moeLayers.every((l) => l.noise === null)).toBe(true);
  });
});
