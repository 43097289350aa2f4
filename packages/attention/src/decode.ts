// Inference with a KV cache: MLA over new positions only, the keys and values of earlier positions
// read from a cache instead of being computed again. The cache holds each sample's per-head keys
// (after RoPE) and values, [maxLen, H*(dn+dr)] and [maxLen, H*dv]: what the attention core consumes,
// so a new position costs its own projections and nothing for the positions before it. (Caching the
// compressed latent c and k_pe instead would hold r + dr numbers per position instead of
// H*(dn+dr+dv), but each step would then run kv_b_proj over every cached position again.)
//
// Only existing backend ops are used, the same ones in the same order as MLA.forward, so a cached
// decode computes what a full forward computes for the same position. Two of them take the whole
// context: RoPE places a row at position r % seqLen, so a new position p is rotated as the last row
// of a zero-padded block of p + 1 rows; and the causal attention op takes equal numbers of queries
// and keys, so the new query is the last of p + 1 query rows (the others zero). The projections,
// norms and experts, where the time goes, run on the new rows only.
import type { Tensor } from "@moe8/tensor";
import type { MLA } from "./mla.ts";

/** One layer's cache: per sample, keys [maxLen, H*(dn+dr)] and values [maxLen, H*dv] (long-lived). */
export interface MlaKvCache {
  k: Tensor[];
  v: Tensor[];
  maxLen: number;
}

export function createMlaKvCache(mla: MLA, samples: number, maxLen: number): MlaKvCache {
  const { num_attention_heads: H, qk_nope_head_dim: dn, qk_rope_head_dim: dr, v_head_dim: dv } = mla.cfg;
  const b = mla.b;
  return {
    k: Array.from({ length: samples }, () => b.keep(b.zeros([maxLen, H * (dn + dr)]))),
    v: Array.from({ length: samples }, () => b.keep(b.zeros([maxLen, H * dv]))),
    maxLen,
  };
}

export function disposeMlaKvCache(cache: MlaKvCache): void {
  for (const t of [...cache.k, ...cache.v]) t.dispose();
}

/**
 * RoPE of rows [S*n, heads*width] at positions pos..pos+n-1 of each of the S samples. From position
 * 0 the op's own positions (r % n) are right; later (one new row per sample) the S rows are seen as
 * one row of S*heads heads and rotated as the last of pos + 1 rows.
 */
function ropeAt(
  mla: MLA,
  x: Tensor,
  heads: number,
  width: number,
  offset: number,
  pos: number,
  n: number,
): Tensor {
  const b = mla.b;
  const opts = { heads, width, offset, dim: mla.cfg.qk_rope_head_dim, theta: mla.cfg.rope_theta };
  if (pos === 0) return b.rope(x, { ...opts, seqLen: n });
  if (n !== 1)
    throw new Error(`decode: ${n} new positions at position ${pos} (one at a time after the prompt)`);
  const S = x.rows;
  const padded = b.zeros([pos + 1, S * heads * width]);
  b.setRows(padded, pos, b.reshape(x, [1, S * heads * width]));
  const y = b.rope(padded, { ...opts, heads: S * heads, seqLen: pos + 1 });
  b.release(padded);
  const row = b.rows(y, pos, 1);
  b.release(y);
  return b.reshape(row, [S, heads * width]);
}

/**
 * MLA for n new positions per sample starting at `pos` (a: normalised hidden states [S*n, d], sample
 * major). Appends their keys and values to the cache and returns the attention output [S*n, d].
 * Nothing is saved for backward: call mla.clearSaved() after the step.
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
  } = mla.cfg;
  const S = cache.k.length;
  if (a.rows !== S * n) throw new Error(`decode: ${a.rows} rows for ${S} samples of ${n} positions`);
  if (pos + n > cache.maxLen)
    throw new Error(`decode: position ${pos + n} is past the cache's ${cache.maxLen}`);
  let qLin: Tensor;
  if (mla.q) qLin = mla.q.forward(a);
  else {
    const qn = b.rmsnorm(mla.qA!.forward(a), mla.qNorm!.value, eps);
    qLin = mla.qB!.forward(qn.y);
  }
  const q = ropeAt(mla, qLin, H, dn + dr, dn, pos, n);
  const kv = ropeAt(mla, mla.kvA.forward(a), 1, r + dr, r, pos, n);
  const c = b.headSlice(kv, { heads: 1, width: r + dr, start: 0, len: r });
  const kpe = b.headSlice(kv, { heads: 1, width: r + dr, start: r, len: dr });
  const kvb = mla.kvB.forward(b.rmsnorm(c, mla.kvNorm.value, eps).y);
  const knope = b.headSlice(kvb, { heads: H, width: dn + dv, start: 0, len: dn });
  const v = b.headSlice(kvb, { heads: H, width: dn + dv, start: dn, len: dv });
  const k = b.headConcat(knope, kpe, H, 1);
  const T = pos + n;
  const o = b.zeros([S * n, H * dv]);
  for (let s = 0; s < S; s++) {
    b.setRows(cache.k[s], pos, b.rows(k, s * n, n));
    b.setRows(cache.v[s], pos, b.rows(v, s * n, n));
    let qs = b.rows(q, s * n, n);
    if (pos > 0) {
      const padded = b.zeros([T, H * (dn + dr)]);
      b.setRows(padded, pos, qs);
      qs = padded;
    }
    const att = b.attention(qs, b.rows(cache.k[s], 0, T), b.rows(cache.v[s], 0, T), {
      batch: 1,
      seq: T,
      heads: H,
      scale: 1 / Math.sqrt(dn + dr),
      precision: mla.precision.core,
    });
    b.setRows(o, s * n, b.rows(att.o, pos, n));
  }
  return mla.out.forward(o);
}
