// DeepSeekMoE layer on its own: load statistics, no token dropped, finite-difference gradients.
import { presetPolicy } from "@moe8/fp8-core";
import { type Backend, PrecisionTrace, Rng, type Tensor, TsBackend } from "@moe8/tensor";
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
  bias_update_rule: "sign",
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

  // Under FP8 the layer quantises its tokens once and permutes the codes and scales; with FP8 range
  // counting on it permutes the f32 tokens and the experts quantise the k copies. Both orders must
  // give the same bits: outputs, the input gradient and every weight gradient.
  it("under FP8, quantising before the permutation gives the bits of quantising after it", async () => {
    class Spy extends TsBackend {
      permuted: string[] = [];
      override moePermute(x: Tensor, topIdx: Tensor, experts: number) {
        this.permuted.push(x.dtype);
        return super.moePermute(x, topIdx, experts);
      }
    }
    const wide: MoeConfig = { ...cfg, hidden_size: 136, moe_intermediate_size: 24 };
    const run = async (counting: boolean) => {
      const sb = new Spy();
      const rng = new Rng(5);
      const trace = new PrecisionTrace();
      trace.flow.enabled = counting;
      const m = new MoELayer(sb as Backend, {
        cfg: wide,
        prefix: "moe",
        precision: presetPolicy("fp8")["moe-layers"],
        init: (n) => rng.normals(n, 0.1),
        trace,
      });
      const x = sb.upload(rng.normals(20 * 136), [20, 136]);
      const y = await m.forward(x, 2, 10).read();
      const dx = await m.backward(sb.upload(rng.normals(20 * 136), [20, 136])).read();
      const grads = await Promise.all(m.params.map((p) => p.grad.read()));
      return { y, dx, grads, permuted: sb.permuted };
    };
    const [once, copies] = [await run(false), await run(true)];
    expect(once.permuted).toEqual(["e4m3"]);
    expect(copies.permuted).toEqual(["f32"]);
    expect(once.y).toEqual(copies.y);
    expect(once.dx).toEqual(copies.dx);
    expect(once.grads).toEqual(copies.grads);
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

  it("the error rule moves each bias by gamma times the gap between k/E and its share of the tokens", async () => {
    const rng = new Rng(4);
    const m = new MoELayer(b, {
      cfg: { ...cfg, bias_update_speed: 0.05, bias_update_rule: "error" },
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
      for (const [e, c] of counts.entries()) expect(bias[e]).toBeCloseTo(0.05 * (2 / 4 - c / 40), 7);
    });
  });

  // A router input that sends every token to the same two experts (a shared component that favours
  // them, as the residual stream has early in training) on top of a token-specific part.
  async function collapsedLoads(rule: "sign" | "error", gamma: number, steps: number): Promise<number[]> {
    const rng = new Rng(5);
    const E = 8;
    const d = 16;
    const N = 256;
    const layer = new MoELayer(b, {
      cfg: { ...cfg, hidden_size: d, n_routed_experts: E, bias_update_speed: gamma, bias_update_rule: rule },
      prefix: "moe",
      precision: presetPolicy("fp32")["moe-layers"],
      init: (n) => rng.normals(n, 0.3),
    });
    const gw = (await layer.gate.value.read()) as Float32Array;
    for (let c = 0; c < d; c++) [gw[c], gw[d + c]] = [0.3, 0.25];
    b.write(layer.gate.value, gw);
    const input = Float32Array.from(rng.normals(N * d), (v) => 1 + 0.3 * v);
    const x = b.keep(b.upload(input, [N, d]));
    const ratios: number[] = [];
    for (let step = 0; step < steps; step++)
      await b.scope(async () => {
        layer.forward(x, 1, N);
        layer.clearSaved();
        ratios.push((await layer.loadStats()).maxOverMean);
        layer.updateBias();
      });
    x.dispose();
    return ratios;
  }

  it("from a collapsed router, the error rule reaches balance and settles closer to it than the sign rule", async () => {
    const mean = (xs: number[]) => xs.reduce((a, v) => a + v, 0) / xs.length;
    const error = await collapsedLoads("error", 0.012, 300); // 0.003 per unit of relative error
    expect(error[0]).toBe(4); // every token to experts 0 and 1: E/k
    expect(mean(error.slice(-100))).toBeLessThan(1.1);
    expect(Math.max(...error.slice(-100))).toBeLessThan(1.2);
    // The sign rule at the same step moves every bias by it each step, balanced or not.
    const sign = await collapsedLoads("sign", 0.003, 300);
    expect(mean(sign.slice(-100))).toBeGreaterThan(mean(error.slice(-100)));
  });
});
