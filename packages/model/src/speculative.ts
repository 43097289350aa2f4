// Self-speculative decoding with the multi-token prediction module, as DeepSeek-V3 proposes using it
// at inference (report section 5.4.3): the MTP module drafts the token after next from the trunk's
// last hidden state and the token just drawn, and one pass of the trunk over [that token, the draft]
// both verifies the draft and gives the next position's logits. Speculative sampling (Leviathan et
// al. 2023, Chen et al. 2023) accepts a draft d drawn from the module's distribution q with
// probability min(1, p(d) / q(d)), p the trunk's, and otherwise draws from max(0, p - q)
// renormalised, so every token is distributed exactly as the trunk alone would draw it; with
// temperature 0 (p and q one-hot) a draft is kept exactly when it is the trunk's greedy choice, and
// the text is the plain greedy text. An accepted draft saves one pass of the trunk per token.
//
// Each sample runs on its own one-sample KV caches (the trunk's, kv-decode.ts, and the module's
// block's): samples accept different drafts, so their lengths part.
import { createMlaKvCache, disposeMlaKvCache, type MlaKvCache, mlaExtend } from "@moe8/attention";
import { MoELayer } from "@moe8/moe-layers";
import type { Rng, Tensor } from "@moe8/tensor";
import type { GenerateOptions } from "./generate.ts";
import { KvCacheDecoder } from "./kv-decode.ts";
import type { DeepSeekModel } from "./model.ts";
import { drawToken, nextTokenProbs } from "./sampling.ts";

export interface SpeculativeStats {
  /** Drafts proposed by the MTP module, and those the trunk accepted. */
  drafted: number;
  accepted: number;
  /** Passes of the trunk after the prompt's (one per verified draft, or per token without one). */
  trunkPasses: number;
  /** New tokens, all samples together. */
  tokens: number;
}

/**
 * The token to keep at a drafted position: the draft when a uniform falls under p(d) / q(d), else a
 * draw from max(0, p - q) (drawToken normalises). p: the trunk's distribution there, q: the one the
 * draft was drawn from.
 */
export function verifyDraft(
  p: Float64Array,
  q: Float64Array,
  draft: number,
  rng: Rng,
): { token: number; accepted: boolean } {
  const ratio = q[draft] > 0 ? p[draft] / q[draft] : 0;
  // (No uniform is drawn when the answer is certain: greedy decoding consumes none.)
  if (ratio >= 1 || (ratio > 0 && rng.next() < ratio)) return { token: draft, accepted: true };
  const residual = p.map((v, i) => Math.max(0, v - q[i]));
  return { token: drawToken(residual.some((v) => v > 0) ? residual : p, rng), accepted: false };
}

/** The MTP module's block with a KV cache of one sample, run on new positions of one sequence. */
class MtpDecoder {
  private readonly cache: MlaKvCache;
  private length = 0;

  constructor(
    readonly model: DeepSeekModel,
    maxLen: number,
  ) {
    this.cache = createMlaKvCache(model.mtp!.block.attn, 1, maxLen);
  }

  /**
   * The module on n new positions i: `hidden` the trunk's h_i [n * d] (before its final norm),
   * `next` the tokens t_{i+1}. Returns the logits [V] of the last position's draft, t_{i+2}.
   */
  async extend(hidden: Float32Array, next: number[], n: number): Promise<Float32Array> {
    const m = this.model;
    const mtp = m.mtp!;
    const b = m.b;
    const eps = m.cfg.rms_norm_eps;
    const d = m.cfg.hidden_size;
    const pos = this.length;
    const logits = await b.scope(async () => {
      const e = b.embedding(m.embed.value, b.upload(Int32Array.from(next), [n], "i32"));
      const en = b.rmsnorm(e, mtp.enorm.value, eps);
      const hn = b.rmsnorm(b.upload(hidden, [n, d]), mtp.hnorm.value, eps);
      const x = mtp.ehProj.forward(b.headConcat(en.y, hn.y, 1, 1));
      const blk = mtp.block;
      const n1 = b.rmsnorm(x, blk.ln1.value, eps);
      const mid = b.add(x, mlaExtend(blk.attn, n1.y, this.cache, pos, n));
      const n2 = b.rmsnorm(mid, blk.ln2.value, eps);
      const y: Tensor = blk.mlp instanceof MoELayer ? blk.mlp.forward(n2.y, 1, n) : blk.mlp.forward(n2.y);
      const out = m.logits(b.rmsnorm(b.add(mid, y), mtp.norm.value, eps).y);
      m.clearSaved();
      return (await out.read()) as Float32Array;
    });
    this.length += n;
    const V = m.cfg.vocab_size;
    return logits.slice((n - 1) * V, n * V);
  }

  dispose(): void {
    disposeMlaKvCache(this.cache);
  }
}

/** One sample's new tokens. */
async function oneSample(
  model: DeepSeekModel,
  o: GenerateOptions,
  stats: SpeculativeStats,
): Promise<number[]> {
  const seq = Array.from(o.prompt);
  const P = seq.length;
  const d = model.cfg.hidden_size;
  const trunk = new KvCacheDecoder(model, 1, P + o.tokens);
  const mtp = new MtpDecoder(model, P + o.tokens);
  const draw = (logits: Float32Array) => {
    const id = drawToken(nextTokenProbs(logits, o.sampling, seq), o.rng);
    seq.push(id);
    return id;
  };
  try {
    // The prompt through the trunk, its next token, and the module over the prompt's positions
    // (each h_i with t_{i+1}, the last with the token just drawn): the first draft's distribution.
    const pre = await trunk.extendOne(seq, P);
    let last = draw(pre.logits[P - 1]);
    let qLogits = await mtp.extend(pre.hidden, seq.slice(1, P + 1), P);
    while (seq.length - P < o.tokens) {
      // The trunk has run every position but the last token's.
      if (seq.length - P === o.tokens - 1) {
        // One token left: no room for a draft.
        const r = await trunk.extendOne([last], 1);
        stats.trunkPasses++;
        draw(r.logits[0]);
        break;
      }
      const q = nextTokenProbs(qLogits, o.sampling, seq);
      const draft = drawToken(q, o.rng);
      const r = await trunk.extendOne([last, draft], 2);
      stats.trunkPasses++;
      stats.drafted++;
      const v = verifyDraft(nextTokenProbs(r.logits[0], o.sampling, seq), q, draft, o.rng);
      seq.push(v.token);
      if (v.accepted) {
        stats.accepted++;
        if (seq.length - P === o.tokens) break;
        // The draft's position was computed with it: the next token comes from its logits.
        last = draw(r.logits[1]);
        qLogits = await mtp.extend(r.hidden, seq.slice(-2), 2);
      } else {
        // The draft's position held the rejected token: forget it.
        trunk.rollback(1);
        last = v.token;
        qLogits = await mtp.extend(r.hidden.subarray(0, d), [v.token], 1);
      }
    }
  } finally {
    trunk.dispose();
    mtp.dispose();
  }
  stats.tokens += seq.length - P;
  return seq.slice(P);
}

/**
 * The generated ids of each sample (prompt excluded), drafted by the model's MTP module and verified
 * by its trunk (see the file comment); `stats` counts the drafts and the trunk's passes.
 */
export async function generateSpeculative(
  model: DeepSeekModel,
  o: GenerateOptions,
): Promise<{ samples: number[][]; stats: SpeculativeStats }> {
  if (!model.mtp)
    throw new Error("speculative decoding needs a model with the multi-token prediction module");
  const stats: SpeculativeStats = { drafted: 0, accepted: 0, trunkPasses: 0, tokens: 0 };
  const samples: number[][] = [];
  for (let s = 0; s < o.samples; s++) samples.push(await oneSample(model, o, stats));
  return { samples, stats };
}
