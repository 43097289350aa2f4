// The sampler's filtering on hand-made logits: repetition penalty, temperature, top-k, top-p, greedy,
// and draws that follow the filtered distribution.
import { Rng } from "@moe8/tensor";
import { describe, expect, it } from "vitest";
import { drawToken, nextTokenProbs, SAMPLING_DEFAULTS } from "../src/sampling.ts";

const plain = { ...SAMPLING_DEFAULTS, temperature: 1 };
const softmax = (x: number[]) => {
  const e = x.map((v) => Math.exp(v - Math.max(...x)));
  const s = e.reduce((a, v) => a + v, 0);
  return e.map((v) => v / s);
};
const logits = [2, 0, 1, -1, 3]; // ranks: 4, 0, 2, 1, 3

describe("nextTokenProbs", () => {
  it("is the softmax at temperature 1 and scales the logits by 1/T", () => {
    expect(Array.from(nextTokenProbs(logits, plain))).toEqual(
      softmax(logits).map((p) => expect.closeTo(p, 12)),
    );
    const t = nextTokenProbs(logits, { ...plain, temperature: 0.5 });
    expect(Array.from(t)).toEqual(softmax(logits.map((x) => x / 0.5)).map((p) => expect.closeTo(p, 12)));
  });

  it("greedy (temperature 0) puts everything on the largest logit, ties to the lower id", () => {
    expect(Array.from(nextTokenProbs(logits, { ...plain, temperature: 0 }))).toEqual([0, 0, 0, 0, 1]);
    expect(Array.from(nextTokenProbs([1, 5, 5], { ...plain, temperature: 0 }))).toEqual([0, 1, 0]);
  });

  it("top-k keeps the k most likely, renormalised", () => {
    const p = nextTokenProbs(logits, { ...plain, topK: 2 });
    const kept = softmax([3, 2]);
    expect(Array.from(p)).toEqual([kept[1], 0, 0, 0, kept[0]].map((v) => expect.closeTo(v, 12)));
    expect(Array.from(nextTokenProbs(logits, { ...plain, topK: 1 }))).toEqual([0, 0, 0, 0, 1]);
  });

  it("top-p keeps the most likely tokens until their mass reaches p", () => {
    const full = softmax(logits); // sorted: id 4 (0.636), id 0 (0.234), id 2 (0.086), ...
    const keep = (p: number) =>
      Array.from(nextTokenProbs(logits, { ...plain, topP: p }))
        .map((v, i) => (v > 0 ? i : -1))
        .filter((i) => i >= 0);
    expect(keep(0.5)).toEqual([4]);
    expect(keep(full[4] + 0.01)).toEqual([0, 4]);
    expect(keep(full[4] + full[0] + 0.01)).toEqual([0, 2, 4]);
    expect(keep(1)).toEqual([0, 1, 2, 3, 4]);
    const p = nextTokenProbs(logits, { ...plain, topP: 0.8 });
    expect(p[4]).toBeCloseTo(full[4] / (full[4] + full[0]), 12);
  });

  it("top-p applies within top-k", () => {
    const p = nextTokenProbs(logits, { ...plain, topK: 3, topP: 0.99 });
    expect(Array.from(p, (v) => v > 0)).toEqual([true, false, true, false, true]);
  });

  it("the repetition penalty divides positive and multiplies negative logits of seen tokens", () => {
    const p = nextTokenProbs(logits, { ...plain, repetitionPenalty: 2 }, [4, 3, 4]);
    expect(Array.from(p)).toEqual(softmax([2, 0, 1, -2, 1.5]).map((v) => expect.closeTo(v, 12)));
  });
});

describe("drawToken", () => {
  it("draws ids with the filtered probabilities, never a removed one", () => {
    const p = nextTokenProbs(logits, { ...plain, topK: 3 });
    const rng = new Rng(7);
    const counts = [0, 0, 0, 0, 0];
    const n = 20_000;
    for (let i = 0; i < n; i++) counts[drawToken(p, rng)]++;
    expect(counts[1]).toBe(0);
    expect(counts[3]).toBe(0);
    for (const id of [0, 2, 4]) expect(counts[id] / n).toBeCloseTo(p[id], 1);
  });

  it("returns the only possible id without drawing", () => {
    const rng = new Rng(1);
    const before = new Rng(1).next();
    expect(drawToken(Float64Array.of(0, 1, 0), rng)).toBe(1);
    expect(rng.next()).toBe(before);
  });
});
