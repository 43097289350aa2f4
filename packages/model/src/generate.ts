// Autoregressive generation of several samples at once from one prompt. Every sample has the same
// length at every step (they share the prompt and grow by one token each), so a step is one batch
// of `samples` sequences. Logits are read back once per step for the sampler (docs/runtime.md rule 1).
// `generate` keeps a KV cache (kv-decode.ts); `generateByRecompute` runs the whole context again for
// every token, the slow reference it is tested against.
import type { Rng } from "@moe8/tensor";
import { KvCacheDecoder } from "./kv-decode.ts";
import type { DeepSeekModel } from "./model.ts";
import { drawToken, nextTokenProbs, type SamplingOptions } from "./sampling.ts";

export interface GenerateOptions {
  prompt: ArrayLike<number>;
  /** New tokens per sample. */
  tokens: number;
  samples: number;
  sampling: SamplingOptions;
  rng: Rng;
}

/** The last position's logits of each sequence: `seqs` equal-length id lists, run as one batch. */
async function lastLogits(model: DeepSeekModel, seqs: number[][]): Promise<Float32Array[]> {
  const b = model.b;
  const T = seqs[0].length;
  const V = model.cfg.vocab_size;
  const all = await b.scope(async () => {
    const ids = b.upload(Int32Array.from(seqs.flat()), [seqs.length * T], "i32");
    const logits = model.forward(ids, { batch: seqs.length, seq: T });
    model.clearSaved();
    return (await logits.read()) as Float32Array;
  });
  return seqs.map((_, s) => all.subarray((s * T + T - 1) * V, (s * T + T) * V));
}

/**
 * The generated ids of each sample (prompt excluded), computing the whole context again for every
 * new token: the reference the KV-cache path is checked against.
 */
export async function generateByRecompute(model: DeepSeekModel, o: GenerateOptions): Promise<number[][]> {
  const seqs = Array.from({ length: o.samples }, () => Array.from(o.prompt));
  for (let t = 0; t < o.tokens; t++) {
    const logits = await lastLogits(model, seqs);
    for (let s = 0; s < o.samples; s++)
      seqs[s].push(drawToken(nextTokenProbs(logits[s], o.sampling, seqs[s]), o.rng));
  }
  return seqs.map((s) => s.slice(o.prompt.length));
}

/** The generated ids of each sample (prompt excluded), each new token one position through the network. */
export async function generate(model: DeepSeekModel, o: GenerateOptions): Promise<number[][]> {
  const seqs = Array.from({ length: o.samples }, () => Array.from(o.prompt));
  const decoder = new KvCacheDecoder(model, o.samples, o.prompt.length + o.tokens);
  try {
    const first = await decoder.prefill(o.prompt);
    let logits = seqs.map(() => first);
    for (let t = 0; t < o.tokens; t++) {
      const next = seqs.map((seq, s) => drawToken(nextTokenProbs(logits[s], o.sampling, seq), o.rng));
      next.forEach((id, s) => {
        seqs[s].push(id);
      });
      if (t + 1 < o.tokens) logits = await decoder.step(next);
    }
  } finally {
    decoder.dispose();
  }
  return seqs.map((s) => s.slice(o.prompt.length));
}
