// Reference kernels for the dense layers' ops, on plain typed arrays. Sums run in f64.
import { roundBf16, roundBf16Scalar } from "@moe8/fp8-core";
import type { AttentionOptions, HeadSliceOptions, RopeOptions } from "../backend.ts";

export function rmsnorm(x: Float32Array, w: Float32Array, rows: number, cols: number, eps: number) {
  const y = new Float32Array(x.length);
  const rstd = new Float32Array(rows);
  for (let r = 0; r < rows; r++) {
    const o = r * cols;
    let ss = 0;
    for (let c = 0; c < cols; c++) ss += x[o + c] * x[o + c];
    const s = 1 / Math.sqrt(ss / cols + eps);
    rstd[r] = s;
    for (let c = 0; c < cols; c++) y[o + c] = x[o + c] * s * w[c];
  }
  return { y, rstd };
}

export function rmsnormBackward(
  dy: Float32Array,
  x: Float32Array,
  w: Float32Array,
  rstd: Float32Array,
  rows: number,
  cols: number,
) {
  const dx = new Float32Array(x.length);
  const dw = new Float64Array(cols);
  for (let r = 0; r < rows; r++) {
    const o = r * cols;
    const s = rstd[r];
    let dot = 0;
    for (let c = 0; c < cols; c++) dot += dy[o + c] * w[c] * x[o + c];
    const k = (s * s * dot) / cols;
    for (let c = 0; c < cols; c++) {
      dx[o + c] = s * (dy[o + c] * w[c] - x[o + c] * k);
      dw[c] += dy[o + c] * x[o + c] * s;
    }
  }
  return { dx, dw: Float32Array.from(dw) };
}

export function rope(x: Float32Array, rows: number, o: RopeOptions): Float32Array {
  const y = Float32Array.from(x);
  const half = o.dim / 2;
  const rowLen = o.heads * o.width;
  const start = o.start ?? 0;
  for (let r = 0; r < rows; r++) {
    const pos = start + (r % o.seqLen);
    for (let i = 0; i < half; i++) {
      const angle = pos * o.theta ** ((-2 * i) / o.dim);
      const c = Math.cos(angle);
      const s = o.inverse ? -Math.sin(angle) : Math.sin(angle);
      for (let h = 0; h < o.heads; h++) {
        const j = r * rowLen + h * o.width + o.offset + 2 * i;
        const a = x[j];
        const b = x[j + 1];
        y[j] = a * c - b * s;
        y[j + 1] = a * s + b * c;
      }
    }
  }
  return y;
}

export function headSlice(x: Float32Array, rows: number, o: HeadSliceOptions): Float32Array {
  const outHeads = o.sumHeads ? 1 : o.heads;
  const y = new Float32Array(rows * outHeads * o.len);
  for (let r = 0; r < rows; r++)
    for (let h = 0; h < o.heads; h++) {
      const src = r * o.heads * o.width + h * o.width + o.start;
      const dst = r * outHeads * o.len + (o.sumHeads ? 0 : h * o.len);
      for (let c = 0; c < o.len; c++) y[dst + c] += x[src + c];
    }
  return y;
}

export function headScatterAdd(
  dst: Float32Array,
  src: Float32Array,
  rows: number,
  o: HeadSliceOptions,
): void {
  for (let r = 0; r < rows; r++)
    for (let h = 0; h < o.heads; h++) {
      const d = r * o.heads * o.width + h * o.width + o.start;
      const s = r * o.heads * o.len + h * o.len;
      for (let c = 0; c < o.len; c++) dst[d + c] += src[s + c];
    }
}

/**
 * Per row and head [a_h | b_h]: `la` and `lb` values per head; b has `bHeads` heads (all or one). a's
 * heads are `aw` wide (la by default) and a_h starts at column `a0` of its head (0 by default).
 */
export function headConcat(
  a: Float32Array,
  b: Float32Array,
  o: { rows: number; heads: number; la: number; lb: number; bHeads: number; aw?: number; a0?: number },
) {
  const { rows, heads, la, lb, bHeads } = o;
  const aw = o.aw ?? la;
  const a0 = o.a0 ?? 0;
  const w = la + lb;
  const y = new Float32Array(rows * heads * w);
  for (let r = 0; r < rows; r++)
    for (let h = 0; h < heads; h++) {
      const d = r * heads * w + h * w;
      const s0 = r * heads * aw + h * aw + a0;
      y.set(a.subarray(s0, s0 + la), d);
      const bh = bHeads === 1 ? 0 : h;
      const s = r * bHeads * lb + bh * lb;
      y.set(b.subarray(s, s + lb), d + la);
    }
  return y;
}

const bf = (x: Float32Array, on: boolean) => (on ? roundBf16(x) : x);

/** The attention options with the head widths: `dqk` of q and k, `dv` of v and o. */
export interface AttentionShape extends AttentionOptions {
  dqk: number;
  dv: number;
}

/**
 * Causal attention per (batch, head); returns o and the log-sum-exp of each query's scores. With
 * `kvSeq` keys per sample the `seq` queries are the last positions: query i sees keys 0..kvSeq-seq+i.
 */
export function attention(q: Float32Array, k: Float32Array, v: Float32Array, o: AttentionShape) {
  const { batch: B, seq: T, heads: H, scale, dqk, dv } = o;
  const Tk = o.kvSeq ?? T;
  if (!(Tk >= T)) throw new Error(`attention: kvSeq ${Tk} below seq ${T}`);
  const lowp = o.precision === "bf16";
  q = bf(q, lowp);
  k = bf(k, lowp);
  v = bf(v, lowp);
  const out = new Float32Array(B * T * H * dv);
  const lse = new Float32Array(B * H * T);
  const p = new Float32Array(Tk);
  const acc = new Float64Array(dv);
  for (let b = 0; b < B; b++)
    for (let h = 0; h < H; h++)
      for (let i = 0; i < T; i++) {
        const qi = (b * T + i) * H * dqk + h * dqk;
        // The last key query i sees: its own position among the kvSeq.
        const last = Tk - T + i;
        let m = -Infinity;
        for (let j = 0; j <= last; j++) {
          const kj = (b * Tk + j) * H * dqk + h * dqk;
          let s = 0;
          for (let c = 0; c < dqk; c++) s += q[qi + c] * k[kj + c];
          p[j] = s * scale;
          if (p[j] > m) m = p[j];
        }
        let l = 0;
        for (let j = 0; j <= last; j++) {
          p[j] = Math.exp(p[j] - m);
          l += p[j];
        }
        lse[(b * H + h) * T + i] = m + Math.log(l);
        acc.fill(0);
        for (let j = 0; j <= last; j++) {
          const pj = lowp ? roundBf16Scalar(p[j] / l) : p[j] / l;
          const vj = (b * Tk + j) * H * dv + h * dv;
          for (let c = 0; c < dv; c++) acc[c] += pj * v[vj + c];
        }
        out.set(acc, (b * T + i) * H * dv + h * dv);
      }
  return { o: out, lse };
}

export function attentionBackward(
  dO: Float32Array,
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
  out: Float32Array,
  lse: Float32Array,
  o: AttentionShape,
) {
  const { batch: B, seq: T, heads: H, scale, dqk, dv } = o;
  if ((o.kvSeq ?? T) !== T) throw new Error(`attentionBackward: kvSeq ${o.kvSeq} is not seq ${T}`);
  const lowp = o.precision === "bf16";
  q = bf(q, lowp);
  k = bf(k, lowp);
  v = bf(v, lowp);
  dO = bf(dO, lowp);
  const dq = new Float32Array(q.length);
  const dk = new Float64Array(k.length);
  const dvv = new Float64Array(v.length);
  const round = (x: number) => (lowp ? roundBf16Scalar(x) : x);
  for (let b = 0; b < B; b++)
    for (let h = 0; h < H; h++)
      for (let i = 0; i < T; i++) {
        const qi = (b * T + i) * H * dqk + h * dqk;
        const oi = (b * T + i) * H * dv + h * dv;
        let D = 0;
        for (let c = 0; c < dv; c++) D += dO[oi + c] * out[oi + c];
        const L = lse[(b * H + h) * T + i];
        const dqi = new Float64Array(dqk);
        for (let j = 0; j <= i; j++) {
          const kj = (b * T + j) * H * dqk + h * dqk;
          const vj = (b * T + j) * H * dv + h * dv;
          let s = 0;
          for (let c = 0; c < dqk; c++) s += q[qi + c] * k[kj + c];
          const P = Math.exp(s * scale - L);
          let dP = 0;
          for (let c = 0; c < dv; c++) dP += dO[oi + c] * v[vj + c];
          const Pr = round(P);
          for (let c = 0; c < dv; c++) dvv[vj + c] += Pr * dO[oi + c];
          const dS = round(P * (dP - D)) * scale;
          for (let c = 0; c < dqk; c++) {
            dqi[c] += dS * k[kj + c];
            dk[kj + c] += dS * q[qi + c];
          }
        }
        for (let c = 0; c < dqk; c++) dq[qi + c] = dqi[c];
      }
  return { dq, dk: Float32Array.from(dk), dv: Float32Array.from(dvv) };
}

const sigmoid = (x: number) => 1 / (1 + Math.exp(-x));

/** h = silu(g) * u for each row of gu = [g | u] ([rows, 2 inter]); h is [rows, inter]. */
export function swiglu(gu: Float32Array, inter: number): Float32Array {
  const rows = gu.length / (2 * inter);
  const h = new Float32Array(rows * inter);
  for (let r = 0; r < rows; r++)
    for (let c = 0; c < inter; c++) {
      const g = gu[r * 2 * inter + c];
      h[r * inter + c] = g * sigmoid(g) * gu[r * 2 * inter + inter + c];
    }
  return h;
}

/** d[g | u] of swiglu (the packed layout of gu) from dh [rows, inter]. */
export function swigluBackward(dh: Float32Array, gu: Float32Array, inter: number): Float32Array {
  const dgu = new Float32Array(gu.length);
  for (let r = 0; r < dh.length / inter; r++)
    for (let c = 0; c < inter; c++) {
      const [gi, ui] = [r * 2 * inter + c, r * 2 * inter + inter + c];
      const [g, u, d] = [gu[gi], gu[ui], dh[r * inter + c]];
      const s = sigmoid(g);
      dgu[ui] = d * g * s;
      dgu[gi] = d * u * s * (1 + g * (1 - s));
    }
  return dgu;
}
