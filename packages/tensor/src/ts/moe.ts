// Reference kernels for routing, dispatch/combine, load balancing, the loss and the optimiser.
import type { BiasUpdateOptions } from "../backend.ts";

const sigmoid = (x: number) => 1 / (1 + Math.exp(-x));

/** N tokens routed to k of E experts; the selected weights are scaled by `scaling`. */
export interface Routing {
  N: number;
  E: number;
  k: number;
  scaling: number;
}

/** Sigmoid scores, top-k over score + bias (ties to the lower expert index), normalised weights. */
export function router(logits: Float32Array, bias: Float32Array, { N, E, k, scaling }: Routing) {
  const scores = new Float32Array(N * E);
  const topIdx = new Int32Array(N * k);
  const weights = new Float32Array(N * k);
  const chosen = new Uint8Array(E);
  for (let n = 0; n < N; n++) {
    for (let e = 0; e < E; e++) scores[n * E + e] = sigmoid(logits[n * E + e]);
    chosen.fill(0);
    let sum = 0;
    for (let j = 0; j < k; j++) {
      let best = -1;
      let bestV = -Infinity;
      for (let e = 0; e < E; e++) {
        const v = Math.fround(scores[n * E + e] + bias[e]);
        if (!chosen[e] && (best < 0 || v > bestV)) {
          best = e;
          bestV = v;
        }
      }
      chosen[best] = 1;
      topIdx[n * k + j] = best;
      sum += scores[n * E + best];
    }
    for (let j = 0; j < k; j++) weights[n * k + j] = (scaling * scores[n * E + topIdx[n * k + j]]) / sum;
  }
  return { scores, topIdx, weights };
}

export function routerBackward(
  dweights: Float32Array,
  scores: Float32Array,
  topIdx: Int32Array,
  { N, E, k, scaling }: Routing,
  dscores: Float32Array | null,
): Float32Array {
  const dlogits = new Float32Array(N * E);
  const ds = new Float64Array(E);
  for (let n = 0; n < N; n++) {
    ds.fill(0);
    if (dscores) for (let e = 0; e < E; e++) ds[e] = dscores[n * E + e];
    let S = 0;
    let dot = 0;
    for (let j = 0; j < k; j++) {
      const s = scores[n * E + topIdx[n * k + j]];
      S += s;
      dot += dweights[n * k + j] * s;
    }
    for (let j = 0; j < k; j++) {
      const e = topIdx[n * k + j];
      ds[e] += scaling * (dweights[n * k + j] / S - dot / (S * S));
    }
    for (let e = 0; e < E; e++) {
      const s = scores[n * E + e];
      dlogits[n * E + e] = ds[e] * s * (1 - s);
    }
  }
  return dlogits;
}

/** alpha * sum_i f_i P_i per sequence, averaged over sequences (docs/model.md), and d/d(scores). */
export function balanceLoss(
  scores: Float32Array,
  topIdx: Int32Array,
  { B, T, E, k, alpha }: { B: number; T: number; E: number; k: number; alpha: number },
) {
  const dscores = new Float32Array(B * T * E);
  const f = new Float64Array(E);
  const P = new Float64Array(E);
  let loss = 0;
  for (let b = 0; b < B; b++) {
    f.fill(0);
    P.fill(0);
    for (let t = 0; t < T; t++) {
      const n = b * T + t;
      for (let j = 0; j < k; j++) f[topIdx[n * k + j]] += E / (k * T);
      let Z = 0;
      for (let e = 0; e < E; e++) Z += scores[n * E + e];
      for (let e = 0; e < E; e++) P[e] += scores[n * E + e] / Z / T;
    }
    for (let e = 0; e < E; e++) loss += (alpha * f[e] * P[e]) / B;
    for (let t = 0; t < T; t++) {
      const n = b * T + t;
      let Z = 0;
      for (let e = 0; e < E; e++) Z += scores[n * E + e];
      let fp = 0;
      for (let e = 0; e < E; e++) fp += (f[e] * scores[n * E + e]) / Z;
      for (let e = 0; e < E; e++) dscores[n * E + e] = (alpha / (B * T * Z)) * (f[e] - fp);
    }
  }
  return { loss, dscores };
}

/** Rows grouped by expert, then by token, then by selection rank; stable and deterministic. */
export function permuteOrder(topIdx: Int32Array, N: number, k: number, E: number) {
  const offsets = new Int32Array(E + 1);
  for (let i = 0; i < N * k; i++) offsets[topIdx[i] + 1]++;
  for (let e = 0; e < E; e++) offsets[e + 1] += offsets[e];
  const fill = offsets.slice(0, E);
  const slot = new Int32Array(N * k);
  for (let i = 0; i < N * k; i++) slot[fill[topIdx[i]]++] = i;
  return { slot, offsets };
}

/** xs[r] = x[slot[r] / k], rows of d elements (f32 values, or FP8 codes and their row scales). */
export function gatherRows<A extends Float32Array | Uint8Array>(
  x: A,
  d: number,
  slot: Int32Array,
  k: number,
): A {
  const xs = new (x.constructor as new (n: number) => A)(slot.length * d);
  for (let r = 0; r < slot.length; r++) {
    const n = Math.floor(slot[r] / k);
    xs.set(x.subarray(n * d, (n + 1) * d), r * d);
  }
  return xs;
}

/** Position of each selection n*k+j among the permuted rows. */
export function inverse(slot: Int32Array): Int32Array {
  const pos = new Int32Array(slot.length);
  for (let r = 0; r < slot.length; r++) pos[slot[r]] = r;
  return pos;
}

export function permuteBackward(dxs: Float32Array, slot: Int32Array, N: number, d: number): Float32Array {
  const k = slot.length / N;
  const pos = inverse(slot);
  const dx = new Float32Array(N * d);
  for (let n = 0; n < N; n++)
    for (let j = 0; j < k; j++) {
      const r = pos[n * k + j];
      for (let c = 0; c < d; c++) dx[n * d + c] += dxs[r * d + c];
    }
  return dx;
}

export function combine(
  ys: Float32Array,
  slot: Int32Array,
  w: Float32Array,
  N: number,
  d: number,
): Float32Array {
  const k = slot.length / N;
  const pos = inverse(slot);
  const y = new Float32Array(N * d);
  const acc = new Float64Array(d);
  for (let n = 0; n < N; n++) {
    acc.fill(0);
    for (let j = 0; j < k; j++) {
      const r = pos[n * k + j];
      const wj = w[n * k + j];
      for (let c = 0; c < d; c++) acc[c] += wj * ys[r * d + c];
    }
    y.set(acc, n * d);
  }
  return y;
}

export function combineBackward(
  dy: Float32Array,
  ys: Float32Array,
  slot: Int32Array,
  w: Float32Array,
  N: number,
  d: number,
) {
  const k = slot.length / N;
  const dys = new Float32Array(ys.length);
  const dw = new Float32Array(N * k);
  for (let r = 0; r < slot.length; r++) {
    const i = slot[r];
    const n = Math.floor(i / k);
    let dot = 0;
    for (let c = 0; c < d; c++) {
      dys[r * d + c] = w[i] * dy[n * d + c];
      dot += dy[n * d + c] * ys[r * d + c];
    }
    dw[i] = dot;
  }
  return { dys, dweights: dw };
}

/** The reference of Backend.biasUpdate, in f64 with one rounding to f32 per bias. */
export function biasUpdate(
  bias: Float32Array,
  offsets: Int32Array,
  { gamma, rule }: BiasUpdateOptions,
): void {
  const E = bias.length;
  const mean = (offsets[E] - offsets[0]) / E;
  if (!(mean > 0)) return; // no token was routed: no load to balance
  for (let e = 0; e < E; e++) {
    const load = offsets[e + 1] - offsets[e];
    const err = (mean - load) / mean;
    bias[e] +=
      gamma *
      (rule === "sign" ? Math.sign(mean - load) : rule === "clipped" ? Math.max(-1, Math.min(1, err)) : err);
  }
}

/** Mean cross-entropy and gradScale * (softmax - onehot) / N. */
export function crossEntropy(
  logits: Float32Array,
  targets: Int32Array,
  N: number,
  V: number,
  gradScale: number,
) {
  const dlogits = new Float32Array(N * V);
  let loss = 0;
  for (let n = 0; n < N; n++) {
    const o = n * V;
    let m = -Infinity;
    for (let v = 0; v < V; v++) if (logits[o + v] > m) m = logits[o + v];
    let z = 0;
    for (let v = 0; v < V; v++) z += Math.exp(logits[o + v] - m);
    const t = targets[n];
    if (t < 0 || t >= V) throw new Error(`crossEntropy: target ${t} outside the vocabulary of ${V}`);
    loss += m + Math.log(z) - logits[o + t];
    for (let v = 0; v < V; v++) dlogits[o + v] = (gradScale * Math.exp(logits[o + v] - m)) / z / N;
    dlogits[o + t] -= gradScale / N;
  }
  return { loss: loss / N, dlogits };
}
