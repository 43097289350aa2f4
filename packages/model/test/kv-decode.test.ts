// The KV cache computes what the full forward computes: at every position, for every sample, the
// cached decode's logits equal those of a forward over the whole context (bit for bit on ts), with
// and without a q LoRA, with MoE and dense layers, for several samples holding different tokens.
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

async function compare(b: Backend, qLora: number, exact: boolean) {
  const cfg = { ...MICRO, q_lora_rank: qLora, first_k_dense_replace: 1, max_position_embeddings: 32 };
  const model = new DeepSeekModel(b, cfg, presetPolicy("fp32"), 3);
  const rng = new Rng(5);
  const prompt = Array.from(rng.ints(4, cfg.vocab_size));
  const samples = 3;
  const decoder = new KvCacheDecoder(model, samples, 12);
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
  check([first, first, first], await fullLogits(model, seqs));
  for (let t = 0; t < 8; t++) {
    const next = seqs.map(() => rng.int(cfg.vocab_size));
    next.forEach((id, s) => {
      seqs[s].push(id);
    });
    check(await decoder.step(next), await fullLogits(model, seqs));
  }
  expect(decoder.length).toBe(12);
  await expect(decoder.step([1, 2, 3])).rejects.toThrow(/past the cache's 12/);
  decoder.dispose();
  model.dispose();
  expect(b.stats().tensors).toBe(0);
}

describe("KV-cache decoding equals the full forward", () => {
  it("on ts, bit for bit, without a q LoRA", () => compare(createBackend("ts"), 0, true));
  it("on ts, bit for bit, with a q LoRA", () => compare(createBackend("ts"), 8, true));
  it("on cpu, to 1e-4", () => compare(createBackend("cpu"), 8, false));
});
