// The KV cache computes what the full forward computes: at every position, for every sample, the
// cached decode's logits equal those of a forward over the whole context (bit for bit on ts), with
// and without a q LoRA, with MoE and dense layers, for one sample and several holding different
// tokens, over contexts past the cpu attention's 64-key tiles.
import { presetPolicy } from "@moe8/fp8-core";
import { createBackend } from "@moe8/kernels";
import { type Backend, Rng } from "@moe8/tensor";
import { describe, expect, it } from "vitest";
import { KvCacheDecoder } from "../src/kv-decode.ts";
import { DeepSeekModel } from "../src/model.ts";
import { MICRO } from "./helpers.ts";

/** Logits [V] of the last position of each sequence, by a full forward (the reference). */
async function fullLogits(model: DeepSeekModel, seqs: number[][]): Promise<Float32Array[]> {
  const b = model.b;
  const T = seqs[0].length;
  const V = model.cfg.vocab_size;
  const all = await b.scope(async () => {
    const l = model.forward(b.upload(Int32Array.from(seqs.flat()), [seqs.length * T], "i32"), {
      batch: seqs.length,
      seq: T,
    });
    model.clearSaved();
    return (await l.read()) as Float32Array;
  });
  return seqs.map((_, s) => all.slice((s * T + T - 1) * V, (s * T + T) * V));
}

interface Case {
  qLora: number;
  exact: boolean;
  samples: number;
  prompt: number;
  /** New positions per sample, filling the cache. */
  steps: number;
}

async function compare(b: Backend, { qLora, exact, samples, prompt: P, steps }: Case) {
  const maxLen = P + steps;
  const cfg = { ...MICRO, q_lora_rank: qLora, first_k_dense_replace: 1, max_position_embeddings: 128 };
  const model = new DeepSeekModel(b, cfg, presetPolicy("fp32"), 3);
  const rng = new Rng(5);
  const prompt = Array.from(rng.ints(P, cfg.vocab_size));
  const decoder = new KvCacheDecoder(model, samples, maxLen);
  const seqs = Array.from({ length: samples }, () => [...prompt]);
  const check = (got: Float32Array[], want: Float32Array[]) =>
    got.forEach((g, s) => {
      if (exact) expect(Array.from(g)).toEqual(Array.from(want[s]));
      else
        g.forEach((x, v) => {
          expect(x).toBeCloseTo(want[s][v], 4);
        });
    });
  const first = await decoder.prefill(prompt);
  check(
    seqs.map(() => first),
    await fullLogits(model, seqs),
  );
  for (let t = 0; t < steps; t++) {
    const next = seqs.map(() => rng.int(cfg.vocab_size));
    next.forEach((id, s) => {
      seqs[s].push(id);
    });
    check(await decoder.step(next), await fullLogits(model, seqs));
  }
  expect(decoder.length).toBe(maxLen);
  await expect(decoder.step(seqs.map(() => 1))).rejects.toThrow(new RegExp(`past the cache's ${maxLen}`));
  decoder.dispose();
  model.dispose();
  expect(b.stats().tensors).toBe(0);
}

describe("KV-cache decoding equals the full forward", () => {
  const short = { samples: 3, prompt: 4, steps: 8 };
  it("on ts, bit for bit, without a q LoRA", () =>
    compare(createBackend("ts"), { ...short, qLora: 0, exact: true }));
  it("on ts, bit for bit, with a q LoRA", () =>
    compare(createBackend("ts"), { ...short, qLora: 8, exact: true }));
  it("on ts, bit for bit, one sample over 70 positions", () =>
    compare(createBackend("ts"), { samples: 1, prompt: 1, steps: 69, qLora: 0, exact: true }));
  it("on cpu, to 1e-4", () => compare(createBackend("cpu"), { ...short, qLora: 8, exact: false }));
  it("on cpu, to 1e-4, four samples over 75 positions", () =>
    compare(createBackend("cpu"), { samples: 4, prompt: 5, steps: 70, qLora: 8, exact: false }));
  it("on cpu, to 1e-4, one sample from a one-token prompt", () =>
    compare(createBackend("cpu"), { samples: 1, prompt: 1, steps: 20, qLora: 0, exact: false }));
});
