// Multi-token prediction (DeepSeek-V3's MTP module, depth 1): what it predicts, from what, over
// which positions, checked against a loss computed here in plain arithmetic. With eh_proj = [I | 0]
// and the MTP block's branches silenced (o_proj and every down projection 0) the module's head
// input at position i is norm(enorm(embed(t_{i+1}))), so its loss is the cross-entropy of
// head(that) against t_{i+2} over every position but each sequence's last. A swapped
// concatenation, an off-by-one target or a mean over the wrong rows gives another number.
import { presetPolicy } from "@moe8/fp8-core";
import { Rng, TsBackend } from "@moe8/tensor";
import { describe, expect, it } from "vitest";
import { CONFIGS, countParams } from "../src/config.ts";
import { generate } from "../src/generate.ts";
import { DeepSeekModel } from "../src/model.ts";
import { drawToken, SAMPLING_DEFAULTS } from "../src/sampling.ts";
import { generateSpeculative, verifyDraft } from "../src/speculative.ts";
import { batchOf, MICRO } from "./helpers.ts";

const CFG = { ...MICRO, num_nextn_predict_layers: 1 };
const L = CFG.num_hidden_layers;

function rmsnorm(x: Float64Array, eps: number): Float64Array {
  let ss = 0;
  for (const v of x) ss += v * v;
  const r = 1 / Math.sqrt(ss / x.length + eps);
  return x.map((v) => v * r);
}

describe("multi-token prediction", () => {
  it("predicts token i + 2 from the embedding of token i + 1, over every position but each sequence's last", async () => {
    const b = new TsBackend();
    const model = new DeepSeekModel(b, CFG, presetPolicy("fp32"), 5);
    const d = CFG.hidden_size;
    const V = CFG.vocab_size;
    const byName = new Map(model.params.map((p) => [p.name, p]));
    const eh = new Float32Array(d * 2 * d);
    for (let r = 0; r < d; r++) eh[r * 2 * d + r] = 1;
    b.write(byName.get(`model.layers.${L}.eh_proj.weight`)!.value, eh);
    for (const p of model.params)
      if (p.name.startsWith(`model.layers.${L}.`) && /o_proj|down_proj/.test(p.name))
        b.write(p.value, new Float32Array(p.value.size));
    const B = 3;
    const T = 6;
    const batch = batchOf(b, CFG, B, T, 21);
    const losses = model.evalLoss(batch.ids, batch.targets, batch.shape);
    expect(losses.mtp).not.toBeNull();
    const got = await losses.mtp!.item();

    const E = (await model.embed.value.read()) as Float32Array;
    const H = (await model.head.weight.value.read()) as Float32Array;
    const tg = (await batch.targets.read()) as Int32Array;
    const eps = CFG.rms_norm_eps;
    let sum = 0;
    let n = 0;
    for (let s = 0; s < B; s++)
      for (let i = 0; i + 1 < T; i++) {
        const a = tg[s * T + i]; // t_{i+1}
        const y = rmsnorm(rmsnorm(Float64Array.from(E.subarray(a * d, (a + 1) * d)), eps), eps);
        const logits = Array.from({ length: V }, (_, v) => {
          let z = 0;
          for (let k = 0; k < d; k++) z += H[v * d + k] * y[k];
          return z;
        });
        const m = Math.max(...logits);
        const lse = m + Math.log(logits.reduce((acc, z) => acc + Math.exp(z - m), 0));
        sum += lse - logits[tg[s * T + i + 1]]; // against t_{i+2}
        n++;
      }
    expect(Math.abs(got - sum / n) / (sum / n)).toBeLessThan(1e-5);

    // The total adds mtp_loss_weight (0.3 by default) times it to the cross-entropy and the balance losses.
    const plain = new DeepSeekModel(b, MICRO, presetPolicy("fp32"), 5);
    for (const p of plain.params) b.write(p.value, (await byName.get(p.name)!.value.read()) as Float32Array);
    const [ce, total, ceNoMtp, totalNoMtp] = await Promise.all([
      losses.ce.item(),
      losses.total.item(),
      ...(() => {
        const r = plain.evalLoss(batch.ids, batch.targets, batch.shape);
        expect(r.mtp).toBeNull();
        return [r.ce.item(), r.total.item()];
      })(),
    ]);
    expect(ce).toBe(ceNoMtp); // the trunk and head are the same: MTP's weights are drawn after them
    const balanceMtp = total - ce - 0.3 * got;
    expect(balanceMtp).toBeGreaterThan(totalNoMtp - ceNoMtp); // the MTP block's MoE adds its own
  });

  it("draws the model's other weights as a model without it does, and counts its parameters", async () => {
    const b = new TsBackend();
    const [a, m] = [
      new DeepSeekModel(b, MICRO, presetPolicy("fp32"), 9),
      new DeepSeekModel(b, CFG, presetPolicy("fp32"), 9),
    ];
    const mine = new Map(m.params.map((p) => [p.name, p]));
    for (const p of a.params)
      expect(await mine.get(p.name)!.value.read(), p.name).toEqual(await p.value.read());
    const extra = m.params.filter((p) => !a.params.some((q) => q.name === p.name));
    expect(extra.every((p) => p.name.startsWith(`model.layers.${L}.`))).toBe(true);
    const size = (ps: { value: { size: number } }[]) => ps.reduce((s, p) => s + p.value.size, 0);
    expect(countParams(CFG).total - countParams(MICRO).total).toBe(size(extra));
    expect(m.moeLayerNumbers).toEqual([...a.moeLayerNumbers, L]);
    // small with MTP: one more MoE block and eh_proj, about 1/8 of its parameters more.
    const s =
      countParams({ ...CONFIGS.small, num_nextn_predict_layers: 1 }).total / countParams(CONFIGS.small).total;
    expect(s).toBeGreaterThan(1.05);
    expect(s).toBeLessThan(1.2);
  });

  it("refuses sequences of one token", () => {
    const b = new TsBackend();
    const model = new DeepSeekModel(b, CFG, presetPolicy("fp32"), 5);
    const batch = batchOf(b, CFG, 2, 1, 3);
    expect(() => model.lossAndGrad(batch.ids, batch.targets, batch.shape)).toThrow(/at least 2 tokens/);
  });
});

describe("self-speculative decoding with the MTP module", () => {
  it("verifyDraft keeps the trunk's distribution whatever the draft's (speculative sampling)", () => {
    const rng = new Rng(17);
    for (const [pw, qw] of [
      [
        [5, 1, 0, 2, 7, 1, 4],
        [1, 6, 3, 0, 2, 2, 1],
      ],
      [
        [1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 9, 1, 0, 0],
      ],
    ]) {
      const norm = (w: number[]) => Float64Array.from(w, (x) => x / w.reduce((a, y) => a + y, 0));
      const [p, q] = [norm(pw), norm(qw)];
      const N = 100_000;
      const hist = new Array<number>(p.length).fill(0);
      let accepted = 0;
      for (let i = 0; i < N; i++) {
        const v = verifyDraft(p, q, drawToken(q, rng), rng);
        hist[v.token]++;
        if (v.accepted) accepted++;
      }
      // Each frequency within 5 standard deviations of p (about 0.008 at N = 1e5).
      for (const [v, h] of hist.entries())
        expect(Math.abs(h / N - p[v]), `token ${v}`).toBeLessThan(5 * Math.sqrt(0.25 / N));
      // The acceptance rate is sum_v min(p, q).
      const overlap = p.reduce((a, x, v) => a + Math.min(x, q[v]), 0);
      expect(Math.abs(accepted / N - overlap)).toBeLessThan(5 * Math.sqrt(0.25 / N));
    }
  });

  it("greedy: the text of plain greedy decoding, with fewer passes of the trunk once drafts are accepted", async () => {
    const b = new TsBackend();
    const model = new DeepSeekModel(b, CFG, presetPolicy("fp32"), 5);
    const o = () => ({
      prompt: [3, 1, 4, 1, 5],
      tokens: 12,
      samples: 2,
      sampling: { ...SAMPLING_DEFAULTS, temperature: 0 },
      rng: new Rng(1),
    });
    const plain = await generate(model, o());
    const spec = await generateSpeculative(model, o());
    expect(spec.samples).toEqual(plain);
    const s = spec.stats;
    expect(s.tokens).toBe(24);
    // Both ways of a draft (kept, rolled back) ran.
    expect(s.accepted).toBeGreaterThan(0);
    expect(s.accepted).toBeLessThan(s.drafted);
    // Per sample: the first token from the prompt's pass, then one pass per draft (one or two tokens)
    // or per last token.
    expect(s.tokens).toBe(2 + s.trunkPasses + s.accepted);
    const none = new DeepSeekModel(b, MICRO, presetPolicy("fp32"), 5);
    await expect(generateSpeculative(none, o())).rejects.toThrow(/multi-token prediction module/);
  });
});
