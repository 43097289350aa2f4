// Inference with a KV cache: MLA over new positions only, the keys and values of earlier positions
// read from a cache instead of being computed again. The cache holds the per-head keys (after RoPE)
// and values of every sample, what the attention core consumes, so a new position costs its own
// projections and nothing for the positions before it. (Caching the compressed latent c and k_pe
// instead would hold r + dr numbers per position instead of H*(dn+dr+dv), but each step would then
// run kv_b_proj over every cached position again.)
//
// The samples' caches are one matrix per layer with the samples side by side as heads: keys
// [maxLen, S*H*(dn+dr)] and values [maxLen, S*H*dv], sample s holding heads s*H..s*H+H-1. One new
// position of each of the S samples is then one row of S*H heads, so a decode step appends one row
// to the cache and runs one attention over it (batch 1, S*H heads, one query against the pos + 1
// cached keys), whatever the number of samples.
//
// The ops are those of MLA.forward in the same order, so a cached decode computes what a full forward
// computes for the same position: RoPE takes the new rows' position as its start, and the attention
// op takes fewer queries than keys (kvSeq), the queries sitting at the last positions. A new token
// costs one row in every op but attention, which reads the pos + 1 cached keys and values as it must
// (read in place: with batch 1 the attention op takes a k and v longer than kvSeq).
import type { Backend, Tensor } from "@moe8/tensor";
import type { MLA } from "./mla.ts";

/**
 * One layer's cache of `samples` samples: keys [maxLen, samples*H*(dn+dr)] and values
 * [maxLen, samples*H*dv], sample s in heads s*H.. (long-lived).
 */
export interface MlaKvCache {
  k: Tensor;
  v: Tensor;
  samples: number;
  maxLen: number;
}

export function createMlaKvCache(mla: MLA, samples: number, maxLen: number): MlaKvCache {
  const { num_attention_heads: H, qk_nope_head_dim: dn, qk_rope_head_dim: dr, v_head_dim: dv } = mla.cfg;
  const b = mla.b;
  return {
    k: b.keep(b.zeros([maxLen, samples * H * (dn + dr)])),
    v: b.keep(b.zeros([maxLen, samples * H * dv])),
    samples,
    maxLen,
  };
}

export function disposeMlaKvCache(cache: MlaKvCache): void {
  cache.k.dispose();
  cache.v.dispose();
}

/** x [n, w] repeated `times` times side by side, [n, times*w]. */
function repeatCols(b: Backend, x: Tensor, times: number): Tensor {
  if (times === 1) return x;
  const w = x.cols;
  const y = b.zeros([x.rows, times * w]);
  for (let s = 0; s < times; s++)
    b.headScatterAdd(y, x, { heads: 1, width: times * w, start: s * w, len: w });
  return y;
}

/**
 * MLA for n new positions per sample starting at `pos` (a: normalised hidden states [S*n, d], sample
 * major): either one position of each of the cache's S samples, or n positions of one sequence,
 * which at position 0 with S > 1 is a prompt shared by every sample (computed once, its keys and
 * values written to every sample's cache). Appends the keys and values to the cache and returns the
 * attention output [S*n, d]. Nothing is saved for backward: call mla.clearSaved() after the step.
 */
export function mlaExtend(mla: MLA, a: Tensor, cache: MlaKvCache, pos: number, n: number): Tensor {
  const b = mla.b;
  const {
    num_attention_heads: H,
    kv_lora_rank: r,
    qk_nope_head_dim: dn,
    qk_rope_head_dim: dr,
    v_head_dim: dv,
    rms_norm_eps: eps,
    rope_theta: theta,
  } = mla.cfg;
  const S = a.rows / n;
  if (!(S === cache.samples || (S === 1 && pos === 0)))
    throw new Error(`decode: ${a.rows} rows for ${cache.samples} samples of ${n} positions at ${pos}`);
  // S samples of n positions are one block [n, S*H*w] of S*H heads only for S = 1 or n = 1.
  if (S > 1 && n > 1)
    throw new Error(`decode: ${n} new positions of ${S} samples (one at a time after the prompt)`);
  if (pos + n > cache.maxLen)
    throw new Error(`decode: position ${pos + n} is past the cache's ${cache.maxLen}`);
  let qLin: Tensor;
  if (mla.q) qLin = mla.q.forward(a);
  else {
    const qn = b.rmsnorm(mla.qA!.forward(a), mla.qNorm!.value, eps);
    qLin = mla.qB!.forward(qn.y);
  }
  const rope = { dim: dr, theta, seqLen: n, start: pos };
  const q = b.rope(qLin, { ...rope, heads: H, width: dn + dr, offset: dn });
  const kv = b.rope(mla.kvA.forward(a), { ...rope, heads: 1, width: r + dr, offset: r });
  const c = b.headSlice(kv, { heads: 1, width: r + dr, start: 0, len: r });
  const kpe = b.headSlice(kv, { heads: 1, width: r + dr, start: r, len: dr });
  const kvb = mla.kvB.forward(b.rmsnorm(c, mla.kvNorm.value, eps).y);
  const knope = b.headSlice(kvb, { heads: H, width: dn + dv, start: 0, len: dn });
  const v = b.headSlice(kvb, { heads: H, width: dn + dv, start: dn, len: dv });
  const k = b.headConcat(knope, kpe, H, 1);
  // The new rows as [n, S*H*w] (sample s in heads s*H..), then in the cache for every sample.
  const kRows = b.reshape(k, [n, S * H * (dn + dr)]);
  const vRows = b.reshape(v, [n, S * H * dv]);
  b.setRows(cache.k, pos, repeatCols(b, kRows, cache.samples / S));
  b.setRows(cache.v, pos, repeatCols(b, vRows, cache.samples / S));
  // From position 0 the new keys are all there is; later the cache holds them all.
  const T = pos + n;
  // (The attention op reads the first T rows of the cache in place: batch 1 allows a longer k, v.)
  const keys = pos === 0 ? kRows : cache.k;
  const values = pos === 0 ? vRows : cache.v;
  const att = b.attention(b.reshape(q, [n, S * H * (dn + dr)]), keys, values, {
    batch: 1,
    seq: n,
    kvSeq: T,
    heads: S * H,
    scale: 1 / Math.sqrt(dn + dr),
    precision: mla.precision.core,
  });
  return mla.out.forward(b.reshape(att.o, [S * n, H * dv]));
}
