// MLA on its own: shapes, causality, and finite-difference checks of d(input) and of every weight.
import { presetPolicy } from "@moe8/fp8-core";
import { Rng, TsBackend } from "@moe8/tensor";
import { describe, expect, it } from "vitest";
import { MLA, type MlaConfig } from "../src/mla.ts";

const b = new TsBackend();
const cfg: MlaConfig = {
  hidden_size: 12,
  num_attention_heads: 2,
  q_lora_rank: 0,
  kv_lora_rank: 6,
  qk_nope_head_dim: 4,
  qk_rope_head_dim: 4,
  v_head_dim: 3,
  rms_norm_eps: 1e-6,
  rope_theta: 10000,
};
const shape = { batch: 2, seq: 5 };
const N = 10;

function layer(qLora: number, seed: number) {
  const rng = new Rng(seed);
  const pol = presetPolicy("fp32");
  return new MLA(b, {
    cfg: { ...cfg, q_lora_rank: qLora },
    prefix: "attn",
    precision: { linear: pol.attention, core: "f32" },
    init: (n) => rng.normals(n, 0.3),
  });
}

/** d/d(eps) sum(r * MLA(x + eps*d)) against <dx, d> from backward, and the same for every weight. */
async function check(m: MLA, seed: number) {
  const rng = new Rng(seed);
  const x0 = rng.normals(N * 12);
  const r = rng.normals(N * 12);
  const L = async (x: Float32Array) =>
    b.scope(async () => {
      const y = (await m.forward(b.upload(x, [N, 12]), shape).read()) as Float32Array;
      m.clearSaved();
      return y.reduce((a, v, i) => a + v * r[i], 0);
    });
  for (const p of m.params) b.fill(p.grad, 0);
  const dx = await b.scope(async () => {
    m.forward(b.upload(x0, [N, 12]), shape);
    return (await m.backward(b.upload(r, [N, 12])).read()) as Float32Array;
  });
  const h = 1e-3;
  const d = rng.normals(N * 12);
  const fd =
    ((await L(x0.map((v, i) => v + h * d[i]))) - (await L(x0.map((v, i) => v - h * d[i])))) / (2 * h);
  const an = dx.reduce((a, v, i) => a + v * d[i], 0);
  expect(Math.abs(fd - an) / Math.abs(an), "d(input)").toBeLessThan(1e-3);
  for (const p of m.params) {
    const w0 = (await p.value.read()) as Float32Array;
    const g = (await p.grad.read()) as Float32Array;
    const dw = rng.normals(w0.length);
    b.write(
      p.value,
      w0.map((v, i) => v + h * dw[i]),
    );
    const lp = await L(x0);
    b.write(
      p.value,
      w0.map((v, i) => v - h * dw[i]),
    );
    const lm = await L(x0);
    b.write(p.value, w0);
    const fdw = (lp - lm) / (2 * h);
    const anw = g.reduce((a, v, i) => a + v * dw[i], 0);
    expect(Math.abs(fdw - anw) / Math.max(1e-4, Math.abs(anw)), p.name).toBeLessThan(2e-3);
  }
}

describe("MLA", () => {
  it("q_lora_rank = 0: gradients of the input and every weight match finite differences", async () => {
    const m = layer(0, 1);
    expect(m.params.map((p) => p.name)).toEqual([
      "attn.q_proj.weight",
      "attn.kv_a_proj_with_mqa.weight",
      "attn.kv_a_layernorm.weight",
      "attn.kv_b_proj.weight",
      "attn.o_proj.weight",
    ]);
    await check(m, 2);
  });

  it("q_lora_rank > 0 (q_a_proj, q_a_layernorm, q_b_proj)", async () => {
    const m = layer(5, 3);
    expect(m.params.map((p) => p.name)).toContain("attn.q_b_proj.weight");
    await check(m, 4);
  });

  it("is causal: a later token does not change earlier outputs", async () => {
    const m = layer(0, 5);
    const x = new Rng(6).normals(N * 12);
    const y1 = (await m.forward(b.upload(x, [N, 12]), shape).read()) as Float32Array;
    const x2 = x.slice();
    x2[4 * 12 + 3] += 1; // token 4 of sequence 0
    const y2 = (await m.forward(b.upload(x2, [N, 12]), shape).read()) as Float32Array;
    m.clearSaved();
    expect(Array.from(y2.subarray(0, 4 * 12))).toEqual(Array.from(y1.subarray(0, 4 * 12)));
    expect(Array.from(y2.subarray(5 * 12))).toEqual(Array.from(y1.subarray(5 * 12))); // sequence 1 untouched
    expect(y2[4 * 12]).not.toBe(y1[4 * 12]);
  });
});
