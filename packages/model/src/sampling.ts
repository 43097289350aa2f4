// Choosing the next token from a position's logits, as Hugging Face's generate() does it: the
// repetition penalty on the logits of tokens already in the text, then temperature, top-k and top-p
// (nucleus) filtering, then one draw. Temperature 0 is greedy decoding. The same settings are
// written into a checkpoint's generation_config.json, so `sample` and transformers' generate() start
// from the same defaults.
import type { Rng } from "@moe8/tensor";

export interface SamplingOptions {
  /** 0: greedy (the most likely token). */
  temperature: number;
  /** Keep the k most likely tokens; 0 keeps all. */
  topK: number;
  /** Keep the most likely tokens whose probabilities add up to at least p; 1 keeps all. */
  topP: number;
  /** > 1 makes tokens already in the text less likely (CTRL's rule, as transformers applies it). */
  repetitionPenalty: number;
}

export const SAMPLING_DEFAULTS: SamplingOptions = {
  temperature: 0.8,
  topK: 0,
  topP: 1,
  repetitionPenalty: 1,
};

/**
 * The distribution the next token is drawn from: probabilities over the vocabulary, zero for the
 * tokens the filters removed. `seen`: the ids of the text so far (prompt and generated).
 */
export function nextTokenProbs(
  logits: ArrayLike<number>,
  opts: SamplingOptions,
  seen: Iterable<number> = [],
): Float64Array {
  const V = logits.length;
  const x = Float64Array.from(logits as ArrayLike<number>);
  if (opts.repetitionPenalty !== 1)
    for (const id of new Set(seen))
      x[id] = x[id] < 0 ? x[id] * opts.repetitionPenalty : x[id] / opts.repetitionPenalty;
  const p = new Float64Array(V);
  if (opts.temperature === 0) {
    let best = 0;
    for (let v = 1; v < V; v++) if (x[v] > x[best]) best = v;
    p[best] = 1;
    return p;
  }
  // Most likely first; ties keep the lower id first, so filtering is deterministic.
  const order = Array.from({ length: V }, (_, v) => v).sort((a, b) => x[b] - x[a] || a - b);
  const k = opts.topK > 0 ? Math.min(opts.topK, V) : V;
  const m = x[order[0]];
  let sum = 0;
  for (let i = 0; i < k; i++) {
    const v = order[i];
    p[v] = Math.exp((x[v] - m) / opts.temperature);
    sum += p[v];
  }
  // Top-p: the most likely tokens until their mass reaches topP of the top-k mass (at least one).
  // `kept` adds in the order `sum` did, so with topP = 1 every one of the k tokens stays.
  let n = 0;
  let kept = 0;
  while (n < k && (n === 0 || kept < opts.topP * sum)) kept += p[order[n++]];
  for (let i = n; i < k; i++) p[order[i]] = 0;
  for (let v = 0; v < V; v++) p[v] /= kept;
  return p;
}

/** Draws an id from probabilities with one uniform from rng (none when only one id is possible). */
export function drawToken(p: Float64Array, rng: Rng): number {
  let total = 0;
  let possible = 0;
  let last = 0;
  for (let v = 0; v < p.length; v++)
    if (p[v] > 0) {
      total += p[v];
      possible++;
      last = v;
    }
  if (possible === 1) return last;
  let r = rng.next() * total;
  for (let v = 0; v < p.length; v++) {
    if (p[v] <= 0) continue;
    r -= p[v];
    if (r < 0) return v;
  }
  return last; // r was within rounding of total
}

/**
 * generation_config.json for a checkpoint: the sampler's defaults, the context the model was
 * trained on as max_length, and the end-of-text token (when the tokenizer has one) as BOS, EOS and
 * padding, so generate() stops where moe8's documents end.
 */
export function hfGenerationConfig(maxLength: number, eotId: number | undefined): Record<string, unknown> {
  const d = SAMPLING_DEFAULTS;
  return {
    _from_model_config: false,
    bos_token_id: eotId ?? null,
    eos_token_id: eotId ?? null,
    pad_token_id: eotId ?? null,
    do_sample: d.temperature > 0,
    temperature: d.temperature,
    top_k: d.topK,
    top_p: d.topP,
    repetition_penalty: d.repetitionPenalty,
    max_length: maxLength,
  };
}
