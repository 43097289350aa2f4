// The `ts` backend: plain TypeScript on typed arrays. It is the exact, readable reference that every
// other backend is tested against, not a fast path.
import { decodeBf16, encodeBf16, roundBf16 } from "@moe8/fp8-core";
import type {
  AdamWOptions,
  AdamWSlot,
  AttentionOptions,
  Backend,
  BiasUpdateOptions,
  GroupedMatmulOptions,
  HeadPart,
  HeadSliceOptions,
  MatmulOptions,
  PermuteResult,
  PreparedAdamW,
  PreparedClipScale,
  QuantizeOptions,
  RmsnormAccumulate,
  RopeOptions,
  RouterResult,
} from "../backend.ts";
import {
  accumulateNorm,
  addUniformNoiseHost,
  attentionRowsError,
  checkAdamWSlots,
  clipScaleOver,
  combineAddError,
  combineBackwardQuantizedVia,
  type GradQuant,
  groupedMatmulQuantizedVia,
  intoBf16,
  matmulQuantizedVia,
  type NoiseOptions,
  quantizedVia,
  requantizeViaF32,
  rmsnormQuantizedVia,
  storeBf16Error,
  storedAs,
  swigluBackwardQuantizedVia,
  swigluQuantizedVia,
} from "../backend.ts";
import { f32, f32OrBf16, HostLifetimes, host, i32, rowScales, sameShape, swigluWidth, u8 } from "../host.ts";
import type { Tensor } from "../tensor.ts";
import { type Fp8Format, isFp8 } from "../types.ts";
import { fp8FlowCounts } from "./flow.ts";
import {
  batchDims,
  checkFp8,
  dequantizeHost,
  type Fp8Operand,
  gemmF32,
  gemmFp8,
  quantizeHost,
  roundInPlaceBf16,
  scaleCount,
} from "./linear.ts";
import * as moe from "./moe.ts";
import * as nn from "./nn.ts";

/** M, N, K of op(A) op(B) from the stored shapes, with a clear error when they do not fit. */
export function gemmDims(
  a: { rows: number; cols: number },
  b: { rows: number; cols: number },
  o: MatmulOptions,
) {
  const [M, Ka] = o.transA ? [a.cols, a.rows] : [a.rows, a.cols];
  const [Kb, N] = o.transB ? [b.cols, b.rows] : [b.rows, b.cols];
  if (Ka !== Kb) throw new Error(`matmul: inner dimensions ${Ka} and ${Kb} differ`);
  return { M, N, K: Ka };
}

/**
 * One stored matrix of a tensor for a GEMM: `rows` x `cols` elements from element `off` (a whole
 * matrix, one of a stack, or one expert's rows), and for an FP8 tensor its scales from `scaleOff`.
 */
interface MatrixSlice {
  t: Tensor;
  off: number;
  scaleOff: number;
  rows: number;
  cols: number;
}

const whole = (t: Tensor): MatrixSlice => ({ t, off: 0, scaleOff: 0, rows: t.rows, cols: t.cols });

export class TsBackend extends HostLifetimes implements Backend {
  readonly name = "ts" as const;

  // --- elementwise -----------------------------------------------------------------------------
  add(a: Tensor, b: Tensor): Tensor {
    sameShape(a, b, "add");
    const x = f32(a);
    const y = f32(b);
    const out = this.alloc(a.shape);
    const o = f32(out);
    for (let i = 0; i < o.length; i++) o[i] = x[i] + y[i];
    return out;
  }

  addInto(dst: Tensor, src: Tensor, alpha = 1): void {
    sameShape(dst, src, "addInto");
    const d = f32(dst);
    const s = f32(src);
    for (let i = 0; i < d.length; i++) d[i] += alpha * s[i];
  }

  scale(a: Tensor, s: number): Tensor {
    const out = this.alloc(a.shape);
    const x = f32(a);
    const o = f32(out);
    for (let i = 0; i < o.length; i++) o[i] = x[i] * s;
    return out;
  }

  fill(t: Tensor, value: number): void {
    // bf16 storage holds bits: fill with the encoded value, not the number.
    if (t.dtype === "bf16") (host(t) as Uint16Array).fill(encodeBf16(Float32Array.of(value))[0]);
    else (host(t) as Float32Array).fill(value);
  }

  copy(t: Tensor): Tensor {
    return this.wrap(host(t).slice(), t.shape, t.dtype);
  }

  cast(t: Tensor, dtype: "f32" | "bf16"): Tensor {
    if (t.dtype === dtype) return this.copy(t);
    if (t.dtype === "f32" && dtype === "bf16") return this.wrap(encodeBf16(f32(t)), t.shape, "bf16");
    if (t.dtype === "bf16" && dtype === "f32")
      return this.wrap(decodeBf16(host(t) as Uint16Array), t.shape, "f32");
    throw new Error(`cast: ${t.dtype} to ${dtype} is not supported (use quantize/dequantize for FP8)`);
  }

  sum(t: Tensor): Tensor {
    const x = f32(t);
    let s = 0;
    for (let i = 0; i < x.length; i++) s += x[i];
    return this.wrap(Float32Array.of(s), [1], "f32");
  }

  // --- quantisation ----------------------------------------------------------------------------
  quantize(x: Tensor, opts: QuantizeOptions): Tensor {
    const segments = opts.segments ? i32(opts.segments) : null;
    const { data, scales } = quantizeHost(f32(x), { ...batchDims(x), segments }, opts);
    const format: Fp8Format = opts.format ?? "e4m3";
    const s = this.wrap(scales, [scales.length], "f32");
    return this.wrap(data, x.shape, format, {
      group: opts.group,
      format,
      scales: s,
      segments: opts.segments,
    });
  }

  requantize(q: Tensor, opts: QuantizeOptions): Tensor {
    return requantizeViaF32(this, q, opts);
  }

  dequantize(q: Tensor): Tensor {
    if (!isFp8(q.dtype) || !q.quant) throw new Error(`dequantize: ${q} is not an FP8 tensor`);
    const segments = q.quant.segments ? i32(q.quant.segments) : null;
    const { group, format } = q.quant;
    const out = dequantizeHost(
      { data: u8(q), scales: f32(q.quant.scales), group, format },
      { ...batchDims(q), segments },
    );
    return this.wrap(out, q.shape, "f32");
  }

  fp8Flow(x: Tensor, q: Tensor): Tensor {
    const deq = this.dequantize(q);
    const counts = fp8FlowCounts(f32(x), u8(q), f32(deq), q.quant!.format);
    deq.dispose();
    return this.wrap(Float32Array.from(counts), [2], "f32");
  }

  // --- GEMMs -----------------------------------------------------------------------------------
  /** One GEMM on two stored matrices; writes C[M, N] into `c`. */
  private gemmInto(a: MatrixSlice, b: MatrixSlice, c: Float32Array, o: MatmulOptions): void {
    const { M, N, K } = gemmDims(a, b, o);
    if (M === 0 || N === 0) return;
    if (o.precision === "fp8") {
      checkFp8(a.t, "A");
      checkFp8(b.t, "B");
      const op = (s: MatrixSlice, trans: boolean): Fp8Operand => {
        const qi = s.t.quant!;
        const n = scaleCount(qi.group, s.rows, s.cols);
        return {
          data: u8(s.t).subarray(s.off, s.off + s.rows * s.cols),
          scales: f32(qi.scales).subarray(s.scaleOff, s.scaleOff + n),
          rows: s.rows,
          cols: s.cols,
          group: qi.group,
          format: qi.format,
          trans,
        };
      };
      if (K === 0) {
        c.fill(0, 0, M * N);
        return;
      }
      const r = gemmFp8(op(a, !!o.transA), op(b, !!o.transB), o.promotion ?? 128);
      c.set(r);
      return;
    }
    // One expert's slice of an f32 operand, or of a bf16 one decoded (grouped GEMMs come here per expert).
    const values = (s: MatrixSlice) => {
      const n = s.rows * s.cols;
      return s.t.dtype === "bf16" && o.precision === "bf16"
        ? decodeBf16((host(s.t) as Uint16Array).subarray(s.off, s.off + n))
        : f32(s.t).subarray(s.off, s.off + n);
    };
    let x = values(a);
    let y = values(b);
    if (o.precision === "bf16") {
      x = roundBf16(x);
      y = roundBf16(y);
    }
    gemmF32(x, y, c, { M, N, K }, o);
  }

  private finish(c: Float32Array, shape: number[], o: MatmulOptions): Tensor {
    if (o.outBf16) roundInPlaceBf16(c);
    if (o.accumulate) {
      const acc = f32(o.accumulate);
      if (acc.length !== c.length)
        throw new Error(`matmul: accumulate has shape [${o.accumulate.shape}], want [${shape}]`);
      for (let i = 0; i < c.length; i++) acc[i] += c[i];
      return o.accumulate;
    }
    return this.wrap(c, shape, "f32");
  }

  matmul(a: Tensor, b: Tensor, o: MatmulOptions): Tensor {
    const bad = storeBf16Error(o);
    if (bad) throw new Error(bad);
    if (o.storeQuantized) return matmulQuantizedVia(this, a, b, o);
    const { M, N } = gemmDims(a, b, o);
    const c = new Float32Array(M * N);
    this.gemmInto(whole(a), whole(b), c, o);
    // BF16 storage: the f32 product rounded to BF16 values, then stored as BF16 (exact).
    return storedAs(this, this.finish(c, [M, N], o.storeBf16 ? { ...o, outBf16: true } : o), o.storeBf16);
  }

  groupedMatmul(a: Tensor, b: Tensor, offsets: Tensor, o: GroupedMatmulOptions): Tensor {
    const bad = storeBf16Error(o);
    if (bad) throw new Error(bad);
    if (o.storeQuantized) return groupedMatmulQuantizedVia(this, a, b, offsets, o);
    const off = i32(offsets);
    const E = off.length - 1;
    const fp8 = o.precision === "fp8";
    if (o.segment === "m") {
      // a [Mtot, K] split by rows; b: E matrices [K, N] (or [N, K] with transB).
      if (o.transA) throw new Error("groupedMatmul m: A must not be transposed");
      const bd = batchDims(b);
      if (bd.batch !== E) throw new Error(`groupedMatmul: B holds ${bd.batch} matrices for ${E} experts`);
      const N = o.transB ? bd.rows : bd.cols;
      const K = a.cols;
      const c = new Float32Array(a.rows * N);
      // Scales of A's rows: tile/row scales advance per row; one tensor scale is shared.
      const aScales = fp8 && a.quant!.group !== "tensor" ? scaleCount(a.quant!.group, 1, K) : 0;
      const bScales = fp8 ? scaleCount(b.quant!.group, bd.rows, bd.cols) : 0;
      for (let e = 0; e < E; e++) {
        const rows = off[e + 1] - off[e];
        if (rows === 0) continue;
        const ce = c.subarray(off[e] * N, off[e + 1] * N);
        this.gemmInto(
          { t: a, off: off[e] * K, scaleOff: off[e] * aScales, rows, cols: K },
          { t: b, off: e * bd.rows * bd.cols, scaleOff: e * bScales, rows: bd.rows, cols: bd.cols },
          ce,
          o,
        );
      }
      if (o.storeBf16) return intoBf16(this, this.finish(c, [a.rows, N], { ...o, outBf16: true }));
      return this.finish(c, [a.rows, N], o);
    }
    // segment k: C[e] = A_e^T B_e over each expert's rows; a [Ktot, M], b [Ktot, N].
    if (!o.transA || o.transB) throw new Error("groupedMatmul k: A must be transposed and B not");
    const M = a.cols;
    const N = b.cols;
    const c = new Float32Array(E * M * N);
    let aS = 0;
    let bS = 0;
    for (let e = 0; e < E; e++) {
      const rows = off[e + 1] - off[e];
      if (rows > 0)
        this.gemmInto(
          { t: a, off: off[e] * M, scaleOff: aS, rows, cols: M },
          { t: b, off: off[e] * N, scaleOff: bS, rows, cols: N },
          c.subarray(e * M * N, (e + 1) * M * N),
          o,
        );
      if (fp8) {
        // 128x1 scales restart at each segment; a tensor-wise scale is shared by all experts.
        if (a.quant!.group !== "tensor") aS += scaleCount(a.quant!.group, rows, M);
        if (b.quant!.group !== "tensor") bS += scaleCount(b.quant!.group, rows, N);
      }
    }
    return this.finish(c, [E, M, N], o);
  }

  // --- dense layers ----------------------------------------------------------------------------
  rmsnorm(x: Tensor, w: Tensor, eps: number) {
    const r = nn.rmsnorm(f32(x), f32(w), x.rows, x.cols, eps);
    return { y: this.wrap(r.y, x.shape, "f32"), rstd: this.wrap(r.rstd, [x.rows], "f32") };
  }

  rmsnormBackward(dy: Tensor, x: Tensor, w: Tensor, rstd: Tensor, accumulate?: RmsnormAccumulate) {
    const r = nn.rmsnormBackward(f32(dy), f32(x), f32(w), f32(rstd), x.rows, x.cols);
    const out = { dx: this.wrap(r.dx, x.shape, "f32"), dw: this.wrap(r.dw, w.shape, "f32") };
    return accumulateNorm(this, out, accumulate);
  }

  rope(x: Tensor, o: RopeOptions): Tensor {
    return storedAs(this, this.wrap(nn.rope(f32(x), x.rows, o), x.shape, "f32"), o.storeBf16);
  }

  headSlice(x: Tensor, o: HeadSliceOptions): Tensor {
    const out = nn.headSlice(f32(x), x.rows, o);
    return storedAs(this, this.wrap(out, [x.rows, out.length / x.rows], "f32"), o.storeBf16);
  }

  headScatterAdd(dst: Tensor, src: Tensor, o: HeadSliceOptions): void {
    nn.headScatterAdd(f32(dst), f32(src), dst.rows, o);
  }

  headConcat(
    a: Tensor,
    b: Tensor,
    heads: number,
    bHeads: number,
    storeBf16 = false,
    aPart?: HeadPart,
  ): Tensor {
    const la = aPart ? aPart.len : a.cols / heads;
    const lb = b.cols / bHeads;
    const part = aPart ? { aw: aPart.width, a0: aPart.start } : {};
    const out = nn.headConcat(f32(a), f32(b), { rows: a.rows, heads, la, lb, bHeads, ...part });
    return storedAs(this, this.wrap(out, [a.rows, heads * (la + lb)], "f32"), storeBf16);
  }

  attention(q: Tensor, k: Tensor, v: Tensor, o: AttentionOptions) {
    const bad = attentionRowsError(q.rows, k.rows, v.rows, o);
    if (bad) throw new Error(bad);
    const dqk = q.cols / o.heads;
    const dv = v.cols / o.heads;
    // The first batch*kvSeq rows of k and v (a longer KV cache is read in place).
    const n = o.batch * (o.kvSeq ?? o.seq);
    const rows = (t: Tensor) => f32OrBf16(t).subarray(0, n * t.cols);
    const r = nn.attention(f32OrBf16(q), rows(k), rows(v), { ...o, dqk, dv });
    return {
      o: this.wrap(r.o, [q.rows, v.cols], "f32"),
      lse: this.wrap(r.lse, [o.batch * o.heads * o.seq], "f32"),
    };
  }

  attentionBackward(
    dO: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    o: AttentionOptions,
  ) {
    const dqk = q.cols / o.heads;
    const dv = v.cols / o.heads;
    const [g, x, y, z, w] = [dO, q, k, v, out].map(f32OrBf16);
    const r = nn.attentionBackward(g, x, y, z, w, f32(lse), { ...o, dqk, dv });
    return {
      dq: this.wrap(r.dq, q.shape, "f32"),
      dk: this.wrap(r.dk, k.shape, "f32"),
      dv: this.wrap(r.dv, v.shape, "f32"),
    };
  }

  swiglu(gu: Tensor): Tensor {
    const inter = swigluWidth(gu, "swiglu");
    return this.wrap(nn.swiglu(f32OrBf16(gu), inter), [gu.rows, inter], "f32");
  }

  swigluBackward(dh: Tensor, gu: Tensor): Tensor {
    const inter = swigluWidth(gu, "swigluBackward", dh);
    return this.wrap(nn.swigluBackward(f32OrBf16(dh), f32OrBf16(gu), inter), [gu.rows, 2 * inter], "f32");
  }

  embedding(w: Tensor, ids: Tensor): Tensor {
    const W = f32(w);
    const id = i32(ids);
    const d = w.cols;
    const out = new Float32Array(id.length * d);
    for (let n = 0; n < id.length; n++) {
      if (id[n] < 0 || id[n] >= w.rows)
        throw new Error(`embedding: token id ${id[n]} outside the vocabulary of ${w.rows}`);
      out.set(W.subarray(id[n] * d, (id[n] + 1) * d), n * d);
    }
    return this.wrap(out, [id.length, d], "f32");
  }

  embeddingBackward(dw: Tensor, dy: Tensor, ids: Tensor): void {
    const D = f32(dw);
    const g = f32(dy);
    const id = i32(ids);
    const d = dw.cols;
    for (let n = 0; n < id.length; n++) for (let c = 0; c < d; c++) D[id[n] * d + c] += g[n * d + c];
  }

  // --- mixture of experts ----------------------------------------------------------------------
  addUniformNoise(x: Tensor, o: NoiseOptions): void {
    if (x.shape.length !== 2) throw new Error(`addUniformNoise: x must be 2-D, got [${x.shape}]`);
    addUniformNoiseHost(f32(x), x.rows, x.cols, o, o.params ? i32(o.params.table) : null);
  }

  router(logits: Tensor, bias: Tensor, k: number, scaling: number): RouterResult {
    const N = logits.rows;
    const E = logits.cols;
    const r = moe.router(f32(logits), f32(bias), { N, E, k, scaling });
    return {
      scores: this.wrap(r.scores, [N, E], "f32"),
      topIdx: this.wrap(r.topIdx, [N, k], "i32"),
      weights: this.wrap(r.weights, [N, k], "f32"),
    };
  }

  routerBackward(
    dweights: Tensor,
    scores: Tensor,
    topIdx: Tensor,
    scaling: number,
    dscores?: Tensor,
  ): Tensor {
    const N = scores.rows;
    const E = scores.cols;
    const k = topIdx.cols;
    const routing = { N, E, k, scaling };
    const d = moe.routerBackward(
      f32(dweights),
      f32(scores),
      i32(topIdx),
      routing,
      dscores ? f32(dscores) : null,
    );
    return this.wrap(d, [N, E], "f32");
  }

  balanceLoss(scores: Tensor, topIdx: Tensor, o: { batch: number; seq: number; alpha: number }) {
    const r = moe.balanceLoss(f32(scores), i32(topIdx), {
      B: o.batch,
      T: o.seq,
      E: scores.cols,
      k: topIdx.cols,
      alpha: o.alpha,
    });
    return {
      loss: this.wrap(Float32Array.of(r.loss), [1], "f32"),
      dscores: this.wrap(r.dscores, scores.shape, "f32"),
    };
  }

  moePermute(x: Tensor, topIdx: Tensor, experts: number): PermuteResult {
    const N = topIdx.rows;
    const k = topIdx.cols;
    const { slot, offsets } = moe.permuteOrder(i32(topIdx), N, k, experts);
    let xs: Tensor;
    if (x.quant) {
      const per = rowScales(x, "moePermute");
      const scales = this.wrap(moe.gatherRows(f32(x.quant.scales), per, slot, k), [N * k * per], "f32");
      xs = this.wrap(moe.gatherRows(u8(x), x.cols, slot, k), [N * k, x.cols], x.dtype, {
        ...x.quant,
        scales,
      });
    } else {
      xs = this.wrap(moe.gatherRows(f32(x), x.cols, slot, k), [N * k, x.cols], "f32");
    }
    return {
      xs,
      slot: this.wrap(slot, [N * k], "i32"),
      offsets: this.wrap(offsets, [experts + 1], "i32"),
    };
  }

  moePermuteBackward(dxs: Tensor, slot: Tensor, tokens: number): Tensor {
    return this.wrap(
      moe.permuteBackward(f32OrBf16(dxs), i32(slot), tokens, dxs.cols),
      [tokens, dxs.cols],
      "f32",
    );
  }

  moeCombine(ys: Tensor, slot: Tensor, weights: Tensor, add: readonly Tensor[] = []): Tensor {
    const N = weights.rows;
    const bad = combineAddError(add, N, ys.cols);
    if (bad) throw new Error(bad);
    const y = this.wrap(moe.combine(f32OrBf16(ys), i32(slot), f32(weights), N, ys.cols), [N, ys.cols], "f32");
    for (const a of add) this.addInto(y, a);
    return y;
  }

  moeCombineBackward(dy: Tensor, ys: Tensor, slot: Tensor, weights: Tensor) {
    const r = moe.combineBackward(f32(dy), f32OrBf16(ys), i32(slot), f32(weights), weights.rows, ys.cols);
    return { dys: this.wrap(r.dys, ys.shape, "f32"), dweights: this.wrap(r.dweights, weights.shape, "f32") };
  }

  ropeQuantized(x: Tensor, opts: RopeOptions, q: GradQuant) {
    return quantizedVia(this, this.rope(x, opts), q);
  }

  headConcatQuantized(
    a: Tensor,
    b: Tensor,
    heads: number,
    bHeads: number,
    aPart: HeadPart | undefined,
    q: GradQuant,
  ) {
    return quantizedVia(this, this.headConcat(a, b, heads, bHeads, false, aPart), q);
  }

  swigluBackwardQuantized(dh: Tensor, gu: Tensor, q: GradQuant) {
    return swigluBackwardQuantizedVia(this, dh, gu, q);
  }

  rmsnormQuantized(x: Tensor, w: Tensor, eps: number, q: QuantizeOptions) {
    return rmsnormQuantizedVia(this, x, w, eps, q);
  }

  swigluQuantized(gu: Tensor, q: QuantizeOptions) {
    return swigluQuantizedVia(this, gu, q);
  }

  moeCombineBackwardQuantized(dy: Tensor, ys: Tensor, slot: Tensor, weights: Tensor, q: GradQuant) {
    return combineBackwardQuantizedVia(this, dy, ys, slot, weights, q);
  }

  biasUpdate(bias: Tensor, offsets: Tensor, opts: BiasUpdateOptions): void {
    moe.biasUpdate(f32(bias), i32(offsets), opts);
  }

  // --- loss and optimiser ----------------------------------------------------------------------
  crossEntropy(logits: Tensor, targets: Tensor, gradScale: number, storeBf16 = false) {
    const r = moe.crossEntropy(f32OrBf16(logits), i32(targets), logits.rows, logits.cols, gradScale);
    return {
      loss: this.wrap(Float32Array.of(r.loss), [1], "f32"),
      dlogits: storedAs(this, this.wrap(r.dlogits, logits.shape, "f32"), storeBf16),
    };
  }

  clipScale(grads: Tensor[], maxNorm: number) {
    let ss = 0;
    for (const g of grads) {
      const x = f32(g);
      for (let i = 0; i < x.length; i++) ss += x[i] * x[i];
    }
    const norm = Math.sqrt(ss);
    // A non-finite norm gives scale 0: such a step must not move the weights (the trainer skips it too).
    const scale = Number.isFinite(norm) ? Math.min(1, maxNorm / (norm + 1e-6)) : 0;
    return {
      norm: this.wrap(Float32Array.of(norm), [1], "f32"),
      scale: this.wrap(Float32Array.of(scale), [1], "f32"),
    };
  }

  prepareClipScale(grads: Tensor[]): PreparedClipScale {
    return clipScaleOver(grads, (g, maxNorm) => this.clipScale(g, maxNorm));
  }

  prepareAdamW(slots: AdamWSlot[]): PreparedAdamW {
    checkAdamWSlots(slots);
    const list = slots.map((s) => ({ ...s }));
    let disposed = false;
    return {
      update: (o) => {
        if (disposed) throw new Error("adamw: used after dispose()");
        for (const s of list) adamw(s, o);
      },
      dispose: () => {
        disposed = true;
      },
    };
  }
}

/** One tensor's update: the moments in f64, stored (then rounded to BF16 for BF16 moments), and p from the stored values. */
function adamw({ p, g, m, v, decay: decays }: AdamWSlot, o: AdamWOptions): void {
  const P = f32(p);
  const G = f32(g);
  const gs = f32(o.gradScale)[0];
  const bc1 = 1 - o.beta1 ** o.step;
  const bc2 = 1 - o.beta2 ** o.step;
  const decay = 1 - o.lr * (decays ? o.weightDecay : 0);
  const load = (t: Tensor) => (t.dtype === "bf16" ? decodeBf16(host(t) as Uint16Array) : f32(t));
  const M = load(m);
  const V = load(v);
  for (let i = 0; i < P.length; i++) {
    const gi = G[i] * gs;
    M[i] = o.beta1 * M[i] + (1 - o.beta1) * gi;
    V[i] = o.beta2 * V[i] + (1 - o.beta2) * gi * gi;
  }
  // BF16 moments are stored rounded, and the update uses the stored values.
  if (m.dtype === "bf16") (host(m) as Uint16Array).set(encodeBf16(M));
  if (v.dtype === "bf16") (host(v) as Uint16Array).set(encodeBf16(V));
  const Ms = m.dtype === "bf16" ? load(m) : M;
  const Vs = v.dtype === "bf16" ? load(v) : V;
  for (let i = 0; i < P.length; i++)
    P[i] = P[i] * decay - (o.lr * (Ms[i] / bc1)) / (Math.sqrt(Vs[i] / bc2) + o.eps);
}
