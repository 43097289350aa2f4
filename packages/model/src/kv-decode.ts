// Generation with a KV cache (packages/attention/src/decode.ts): the prompt runs once for all the
// samples, then each step runs the network on one new position per sample, attention reading the
// earlier positions' keys and values from the cache. The trunk below is DeepSeekModel's forward with MLA.forward
// replaced by mlaExtend and nothing saved for backward: the same ops in the same order, so the
// logits are those of a full forward over the whole context.
import { createMlaKvCache, disposeMlaKvCache, type MlaKvCache, mlaExtend } from "@moe8/attention";
import { MoELayer } from "@moe8/moe-layers";
import type { Tensor } from "@moe8/tensor";
import type { DeepSeekModel } from "./model.ts";

export class KvCacheDecoder {
  private readonly caches: MlaKvCache[];
  /** Positions already in the cache. */
  length = 0;

  constructor(
    readonly model: DeepSeekModel,
    readonly samples: number,
    readonly maxLen: number,
  ) {
    this.caches = model.blocks.map((blk) => createMlaKvCache(blk.attn, samples, maxLen));
  }

  /**
   * Runs the prompt, shared by every sample, once (mlaExtend writes its keys and values to every
   * sample's cache); returns the logits of its last position [V].
   */
  async prefill(prompt: ArrayLike<number>): Promise<Float32Array> {
    if (this.length !== 0) throw new Error("decode: prefill of a cache already in use");
    const P = prompt.length;
    const all = await this.extend(Array.from(prompt), P);
    this.length = P;
    const V = this.model.cfg.vocab_size;
    return all.slice((P - 1) * V, P * V);
  }

  /** Appends one token per sample and returns each sample's logits [V] for the next position. */
  async step(ids: number[]): Promise<Float32Array[]> {
    if (ids.length !== this.samples) throw new Error(`decode: ${ids.length} ids for ${this.samples} samples`);
    const all = await this.extend(ids, 1);
    this.length += 1;
    const V = this.model.cfg.vocab_size;
    return ids.map((_, s) => all.slice(s * V, (s + 1) * V));
  }

  /**
   * One sample's n new positions (a cache of one sample): each position's logits [V] and the last
   * layer's outputs before the final norm [n * d] (what the MTP module reads, speculative.ts).
   */
  async extendOne(ids: number[], n: number): Promise<{ logits: Float32Array[]; hidden: Float32Array }> {
    if (this.samples !== 1) throw new Error("decode: extendOne needs a cache of one sample");
    const hidden: Float32Array[] = [];
    const all = await this.extend(ids, n, hidden);
    this.length += n;
    const V = this.model.cfg.vocab_size;
    return { logits: ids.map((_, i) => all.slice(i * V, (i + 1) * V)), hidden: hidden[0] };
  }

  /** Forgets the last `n` positions (a rejected draft's): the next extend writes over them. */
  rollback(n: number): void {
    if (n < 0 || n > this.length)
      throw new Error(`decode: cannot roll back ${n} of ${this.length} positions`);
    this.length -= n;
  }

  /**
   * Logits [S*n, V] of n new positions of S sequences (ids sample major: one position of every
   * sample, or the shared prompt as S = 1), read back to the host; with `hidden`, the last layer's
   * outputs before the final norm too.
   */
  private async extend(ids: number[], n: number, hidden?: Float32Array[]): Promise<Float32Array> {
    const m = this.model;
    const b = m.b;
    const eps = m.cfg.rms_norm_eps;
    const pos = this.length;
    const S = ids.length / n;
    const caches = this.caches;
    return b.scope(async () => {
      let h: Tensor = b.embedding(m.embed.value, b.upload(Int32Array.from(ids), [ids.length], "i32"));
      m.blocks.forEach((blk, l) => {
        const n1 = b.rmsnorm(h, blk.ln1.value, eps);
        const mid = b.add(h, mlaExtend(blk.attn, n1.y, caches[l], pos, n));
        const n2 = b.rmsnorm(mid, blk.ln2.value, eps);
        const y = blk.mlp instanceof MoELayer ? blk.mlp.forward(n2.y, S, n) : blk.mlp.forward(n2.y);
        h = b.add(mid, y);
      });
      const out = m.logits(b.rmsnorm(h, m.norm.value, eps).y);
      m.clearSaved();
      if (hidden) hidden.push((await h.read()) as Float32Array);
      return (await out.read()) as Float32Array;
    });
  }

  dispose(): void {
    for (const c of this.caches) disposeMlaKvCache(c);
  }
}
