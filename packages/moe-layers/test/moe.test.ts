// DeepSeekMoE layer on its own: load statistics, no token dropped, finite-difference gradients.
import { presetPolicy } from "@moe8/fp8-core";
import { Rng, TsBackend } from "@moe8/tensor";
import { describe, expect, it } from "vitest";
import { loadStats, MoELayer, type MoeConfig } from "../src/moe.ts";

const b = new TsBackend();
const cfg: MoeConfig = {
  hidden_size: 8,
  moe_intermediate_size: 6,
  n_routed_experts: 4,
  num_experts_per_tok: 2,
  n_shared_experts: 1,
  routed_scaling_factor: 1.5,
  bias_update_speed: 0.001,
  seq_aux_alpha: 0.1,
};

describe("load statistics", () => {
  it("coefficient of variation, max/mean and idle experts", () => {
    expect(loadStats([2, 2, 2, 2])).toEqual({ counts: [2, 2, 2, 2], cv: 0, maxOverMean: 1, idle: 0 });
    const s = loadStats([4, 0, 2, 2]);
    expect(s.maxOverMean).toBe(2);
    expect(s.idle).toBe(1);
    expect(s.cv).toBeCloseTo(Math.sqrt(2) / 2, 12);
  });
});

describe("MoELayer", () => {
  it("routes every token to k experts (no dropping) and its input gradient matches finite differences", async () => {
    const rng = new Rng(3);
    const m = new MoELayer(b, {
      cfg,
      prefix: "moe",
      precision: presetPolicy("fp32")["moe-layers"],
      init: (n) => rng.normals(n, 0.4),
    });
    const x0 = rng.normals(12 * 8);
    const r = rng.normals(12 * 8);
    const L = async (x: Float32Array) =>
      b.scope(async () => {
        const y = (await m.forward(b.upload(x, [12, 8]), 2, 6).read()) as Float32Array;
        const bal = m.lastBalanceLoss ? await m.lastBalanceLoss.item() : 0;
        m.clearSaved();
        return y.reduce((a, v, i) => a + v * r[i], 0) + bal;
      });
    const dx = await b.scope(async () => {
      m.forward(b.upload(x0, [12, 8]), 2, 6);
      const counts = (await m.loadStats()).counts;
      expect(counts.reduce((a, c) => a + c, 0)).toBe(12 * 2);
      return (await m.backward(b.upload(r, [12, 8])).read()) as Float32Array;
    });
    const d = rng.normals(12 * 8);
    const h = 1e-4;
    const fd =
      ((await L(x0.map((v, i) => v + h * d[i]))) - (await L(x0.map((v, i) => v - h * d[i])))) / (2 * h);
    const an = dx.reduce((a, v, i) => a + v * d[i], 0);
    expect(Math.abs(fd - an) / Math.abs(an)).toBeLessThan(2e-3);
  });

  it("the bias update moves toward balance: overloaded experts down, idle ones up", async () => {
    const rng = new Rng(4);
    const m = new MoELayer(b, {
      cfg,
      prefix: "moe",
      precision: presetPolicy("fp32")["moe-layers"],
      init: (n) => rng.normals(n, 0.4),
    });
    await b.scope(async () => {
      m.forward(b.upload(rng.normals(40 * 8), [40, 8]), 1, 40);
      m.clearSaved();
      const counts = (await m.loadStats()).counts;
      m.updateBias();
      const bias = (await m.bias.read()) as Float32Array;
      const mean = (40 * 2) / 4;
      for (const [e, c] of counts.entries())
        expect(bias[e]).toBeCloseTo(c > mean ? -0.001 : c < mean ? 0.001 : 0, 9);
    });
  });
});
