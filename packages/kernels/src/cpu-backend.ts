// The `cpu` backend: host tensors (the same lifetimes as `ts`) with every op running in the native
// addon (Rust, rayon, SIMD). Inputs are passed as the tensors' own typed arrays (no copies) and
// outputs are taken here from the buffer pool (cpu-pool.ts: released tensors give their storage
// back to it) and written in place by the kernels. The semantics are those of the `ts` reference
// backend, which the shared op suite checks.
import {
  type AdamWOptions,
  type AdamWSlot,
  type AttentionOptions,
  accumulateNorm,
  addUniformNoiseHost,
  attentionRowsError,
  type Backend,
  type BiasUpdateOptions,
  batchDims,
  checkAdamWSlots,
  clipScaleOver,
  combineAddError,
  combineBackwardQuantizedVia,
  type DType,
  type Fp8Format,
  f32,
  f32OrBf16,
  type GradQuant,
  type GroupedMatmulOptions,
  gemmDims,
  groupedMatmulQuantizedVia,
  type HeadPart,
  type HeadSliceOptions,
  type HostArray,
  HostLifetimes,
  host,
  i32,
  intoBf16,
  isFp8,
  type MatmulOptions,
  matmulQuantizedVia,
  type NoiseOptions,
  numel,
  type PermuteResult,
  type PreparedAdamW,
  type PreparedClipScale,
  type QuantGroup,
  type QuantizeOptions,
  quantizedVia,
  type RmsnormAccumulate,
  type RopeOptions,
  type RouterResult,
  requantizeViaF32,
  rmsnormQuantizedVia,
  rowScales,
  rowSpan,
  sameShape,
  scaleCount,
  storeBf16Error,
  storedAs,
  swigluBackwardQuantizedVia,
  swigluQuantizedVia,
  swigluWidth,
  type Tensor,
  u8,
} from "@moe8/tensor";
import type { AttentionDims, Fp8Operand } from "../native.d.cts";
import { HostBufferPool, type PoolStats } from "./cpu-pool.ts";
import { type NativeAddon, requireNative } from "./index.ts";

const EMPTY_F32 = new Float32Array(0);
const EMPTY_U16 = new Uint16Array(0);

/** `x`, or a copy of it when its memory overlaps `out` (the kernels never read what they write). */
function distinct<T extends HostArray>(x: T, out: HostArray): T {
  if (x.buffer !== out.buffer) return x;
  const [x0, x1] = [x.byteOffset, x.byteOffset + x.byteLength];
  const [o0, o1] = [out.byteOffset, out.byteOffset + out.byteLength];
  return x0 < o1 && o0 < x1 ? (x.slice() as T) : x;
}

/** An FP8 tensor as the native GEMMs take it; its arrays are copied if they overlap the output `c`. */
function fp8Operand(t: Tensor, what: string, c: Float32Array): Fp8Operand {
  if (!isFp8(t.dtype) || !t.quant)
    throw new Error(`matmul fp8: ${what} must be a quantised FP8 tensor, got ${t}`);
  return {
    data: distinct(u8(t), c),
    scales: distinct(f32(t.quant.scales), c),
    group: t.quant.group,
    format: t.quant.format,
  };
}

export class CpuBackend extends HostLifetimes implements Backend {
  readonly name = "cpu" as const;
  private readonly n: NativeAddon;
  private readonly pool = new HostBufferPool();
  private readonly fresh =
    (globalThis as { process?: { env?: Record<string, string | undefined> } }).process?.env?.MOE8_POISON ===
    "1"
      ? ("poison" as const)
      : ("any" as const);

  constructor() {
    super();
    this.n = requireNative();
  }

  // --- storage (docs/runtime.md rule 6) ----------------------------------------------------------
  /** A zero-filled tensor with pooled storage (what `zeros` gets; op outputs take `out`). */
  protected override alloc(shape: readonly number[], dtype: DType = "f32"): Tensor {
    return this.wrap(this.pool.take(dtype, numel(shape), "zeroed"), shape, dtype);
  }

  /**
   * An op's output: pooled storage as the last user left it, since every kernel writes each element
   * of its outputs. Under MOE8_POISON=1 (read at construction) it starts as 0xff bytes instead (NaN
   * in f32), so an element a kernel leaves unwritten changes the results: the cpu op suite runs so.
   */
  private out(shape: readonly number[], dtype: DType = "f32"): Tensor {
    return this.wrap(this.pool.take(dtype, numel(shape), this.fresh), shape, dtype);
  }

  /** Hands a released tensor's storage back to the pool (a view's storage is its base's). */
  protected override freeStorage(t: Tensor): void {
    if (ArrayBuffer.isView(t.storage)) this.pool.give(t.storage as HostArray);
  }

  /** A pooled tensor holding a copy of `data`. */
  private copyOf(data: HostArray, shape: readonly number[], dtype: DType): Tensor {
    const a = this.pool.take(dtype, data.length, "any");
    a.set(data as never);
    return this.wrap(a, shape, dtype);
  }

  /** A one-element f32 tensor (losses, norms). */
  private scalar(v: number): Tensor {
    const t = this.alloc([1]);
    f32(t)[0] = v;
    return t;
  }

  override upload(data: HostArray, shape: readonly number[], dtype: DType = "f32"): Tensor {
    if (data.length !== numel(shape)) throw new Error(`data of ${data.length} elements for shape [${shape}]`);
    return this.copyOf(data, shape, dtype);
  }

  override rows(t: Tensor, start: number, count: number): Tensor {
    const w = rowSpan(t, start, count, "rows");
    const src = host(t).subarray(start * w, (start + count) * w) as HostArray;
    return this.copyOf(src, [count, ...t.shape.slice(1)], t.dtype);
  }

  /** The buffer pool's counters: a steady-state step must not add misses (tests/cpu-pool.test.ts). */
  poolStats(): PoolStats {
    return this.pool.stats();
  }

  /** Returns the pool's free buffers to the garbage collector (after a run, or between phases). */
  trimPool(): void {
    this.pool.trim();
  }

  // --- elementwise -----------------------------------------------------------------------------
  add(a: Tensor, b: Tensor): Tensor {
    sameShape(a, b, "add");
    const out = this.out(a.shape);
    this.n.addF32(f32(a), f32(b), f32(out));
    return out;
  }

  addInto(dst: Tensor, src: Tensor, alpha = 1): void {
    sameShape(dst, src, "addInto");
    const d = f32(dst);
    this.n.addIntoF32(d, distinct(f32(src), d), alpha);
  }

  scale(a: Tensor, s: number): Tensor {
    const out = this.out(a.shape);
    this.n.scaleF32(f32(a), s, f32(out));
    return out;
  }

  fill(t: Tensor, value: number): void {
    (host(t) as Float32Array).fill(value);
  }

  copy(t: Tensor): Tensor {
    return this.copyOf(host(t), t.shape, t.dtype);
  }

  cast(t: Tensor, dtype: "f32" | "bf16"): Tensor {
    if (t.dtype === dtype) return this.copy(t);
    if (t.dtype === "f32" && dtype === "bf16") {
      const out = this.out(t.shape, "bf16");
      this.n.castF32ToBf16(f32(t), host(out) as Uint16Array);
      return out;
    }
    if (t.dtype === "bf16" && dtype === "f32") {
      const out = this.out(t.shape, "f32");
      this.n.castBf16ToF32(host(t) as Uint16Array, f32(out));
      return out;
    }
    throw new Error(`cast: ${t.dtype} to ${dtype} is not supported (use quantize/dequantize for FP8)`);
  }

  sum(t: Tensor): Tensor {
    return this.scalar(this.n.sumF32(f32(t)));
  }

  // --- quantisation ----------------------------------------------------------------------------
  quantize(x: Tensor, opts: QuantizeOptions): Tensor {
    const { batch, rows, cols } = batchDims(x);
    const format: Fp8Format = opts.format ?? "e4m3";
    const seg = opts.segments ? i32(opts.segments) : null;
    if (seg && (opts.group !== "column-tile" || batch !== 1))
      throw new Error("quantize: segments need a 2-D column-tile");
    const { s, data } = this.quantOutputs(x.size, rows, cols, opts.group, seg, batch);
    this.n.quantizeFp8(
      f32(x),
      { rows, cols, batch, group: opts.group, format },
      this.scaling(opts),
      data,
      f32(s),
      seg,
    );
    return this.wrap(data, x.shape, format, {
      group: opts.group,
      format,
      scales: s,
      segments: opts.segments,
    });
  }

  /** The codes and the scales tensor of a quantisation of `batch` [rows, cols] matrices. */
  private quantOutputs(
    size: number,
    rows: number,
    cols: number,
    group: QuantGroup,
    seg: Int32Array | null,
    batch = 1,
  ) {
    let nScales = 0;
    let capacity = 0;
    if (seg) {
      for (let e = 0; e + 1 < seg.length; e++) nScales += scaleCount(group, seg[e + 1] - seg[e], cols);
      // The count follows the routing; its bound (as on cuda) keeps every step in one size class.
      capacity = (Math.ceil(rows / 128) + seg.length - 1) * cols;
    } else if (rows > 0) nScales = batch * scaleCount(group, rows, cols);
    const s = this.wrap(this.pool.take("f32", nScales, this.fresh, capacity), [nScales], "f32");
    // One byte per code in either FP8 format.
    const data = this.pool.take("e4m3", size, this.fresh) as Uint8Array;
    return { s, data };
  }

  private scaling(opts: QuantizeOptions) {
    return { mode: opts.unit ? "unit" : opts.pow2Scales ? "pow2" : "amax", eps: opts.eps ?? 1e-12 };
  }

  fp8Flow(x: Tensor, q: Tensor): Tensor {
    if (!isFp8(q.dtype) || !q.quant) throw new Error(`fp8Flow: ${q} is not an FP8 tensor`);
    const deq = this.dequantize(q);
    const out = this.out([2], "f32");
    this.n.fp8Flow(f32(x), u8(q), f32(deq), q.quant.format, f32(out));
    deq.dispose();
    return out;
  }

  /**
   * Wgrad's column tiles from a cached FP8 matrix, in one native pass that decodes each 128-row
   * group into a scratch tile (bit for bit quantize(dequantize(q))); other layouts go through f32.
   */
  requantize(q: Tensor, opts: QuantizeOptions): Tensor {
    if (!isFp8(q.dtype) || !q.quant) throw new Error(`requantize: ${q} is not an FP8 tensor`);
    const { batch, rows, cols } = batchDims(q);
    if (opts.group !== "column-tile" || batch !== 1 || q.quant.segments)
      return requantizeViaF32(this, q, opts);
    const format: Fp8Format = opts.format ?? "e4m3";
    const seg = opts.segments ? i32(opts.segments) : null;
    const { s, data } = this.quantOutputs(q.size, rows, cols, opts.group, seg);
    const layout = { rows, cols, batch, group: q.quant.group, format: q.quant.format };
    this.n.requantizeFp8(u8(q), f32(q.quant.scales), layout, this.scaling(opts), format, data, f32(s), seg);
    return this.wrap(data, q.shape, format, {
      group: opts.group,
      format,
      scales: s,
      segments: opts.segments,
    });
  }

  dequantize(q: Tensor): Tensor {
    if (!isFp8(q.dtype) || !q.quant) throw new Error(`dequantize: ${q} is not an FP8 tensor`);
    const { batch, rows, cols } = batchDims(q);
    const out = this.out(q.shape, "f32");
    const seg = q.quant.segments ? i32(q.quant.segments) : null;
    const layout = { rows, cols, batch, group: q.quant.group, format: q.quant.format };
    this.n.dequantizeFp8(u8(q), f32(q.quant.scales), layout, f32(out), seg);
    return out;
  }

  // --- GEMMs -----------------------------------------------------------------------------------
  /**
   * Where the GEMM writes: `accumulate` itself when it can add into it directly (`direct`), else a
   * new output tensor.
   */
  private gemmTarget(size: number, shape: number[], o: MatmulOptions): { out: Tensor; direct: boolean } {
    if (o.accumulate) {
      if (o.accumulate.size !== size)
        throw new Error(`matmul: accumulate has shape [${o.accumulate.shape}], want [${shape}]`);
      // The reference rounds the product to BF16 before adding it: then the GEMM needs its own output.
      if (!o.outBf16) return { out: o.accumulate, direct: true };
    }
    return { out: this.out(shape), direct: false };
  }

  private finish(out: Tensor, direct: boolean, o: MatmulOptions): Tensor {
    if (direct || !o.accumulate) return out;
    this.n.addIntoF32(f32(o.accumulate), f32(out), 1);
    out.dispose();
    return o.accumulate;
  }

  /**
   * An f32 tensor's array, or a bf16 tensor decoded to f32 (a temporary copy) where the op takes
   * BF16 inputs (`lowp`: bf16 GEMMs).
   */
  private values(t: Tensor, lowp = true): Float32Array {
    if (t.dtype !== "bf16" || !lowp) return f32(t);
    const x = this.decodeScratch(t.size);
    this.n.castBf16ToF32(host(t) as Uint16Array, x);
    return x;
  }

  // Decoded BF16 operands live only for the duration of one native call, so a few grow-only
  // buffers, used round-robin, replace an allocation (and its zero fill) per operand. An op
  // decodes at most two inputs (a GEMM's), fewer than the ring holds.
  private readonly decodeRing: Float32Array[] = [];
  private decodeNext = 0;
  private decodeScratch(n: number): Float32Array {
    const i = this.decodeNext;
    this.decodeNext = (i + 1) % 8;
    let buf = this.decodeRing[i];
    if (!buf || buf.length < n) this.decodeRing[i] = buf = new Float32Array(n);
    return buf.subarray(0, n);
  }

  /** The f32 GEMM operands: BF16-rounded values for a bf16 GEMM, copied if they overlap `c`. */
  private f32Operands(a: Tensor, b: Tensor, lowp: boolean, c: Float32Array): [Float32Array, Float32Array] {
    return [distinct(this.values(a, lowp), c), distinct(this.values(b, lowp), c)];
  }

  matmul(a: Tensor, b: Tensor, opts: MatmulOptions): Tensor {
    const bad = storeBf16Error(opts);
    if (bad) throw new Error(bad);
    if (opts.storeQuantized) return matmulQuantizedVia(this, a, b, opts);
    // BF16 storage: the f32 product rounded to BF16 values, then stored as BF16 (exact).
    const o = opts.storeBf16 ? { ...opts, outBf16: true } : opts;
    const { M, N, K } = gemmDims(a, b, o);
    const shape = [M, N];
    const { out, direct } = this.gemmTarget(M * N, shape, o);
    const c = f32(out);
    if (M > 0 && N > 0) {
      const gemm = { m: M, n: N, k: K, transA: !!o.transA, transB: !!o.transB, accumulate: direct };
      const outputBf16 = !!o.outBf16;
      if (o.precision === "fp8") {
        const promotion = o.promotion ?? 128;
        const [A, B] = [fp8Operand(a, "A", c), fp8Operand(b, "B", c)];
        this.n.gemmFp8(A, B, c, { ...gemm, outputBf16, promotion });
      } else {
        const lowp = o.precision === "bf16";
        const [x, y] = this.f32Operands(a, b, lowp, c);
        this.n.gemmF32(x, y, c, { ...gemm, inputsBf16: lowp, outputBf16 });
      }
    }
    return storedAs(this, this.finish(out, direct, o), o.storeBf16);
  }

  groupedMatmul(a: Tensor, b: Tensor, offsets: Tensor, opts: GroupedMatmulOptions): Tensor {
    const bad = storeBf16Error(opts);
    if (bad) throw new Error(bad);
    if (opts.storeQuantized) return groupedMatmulQuantizedVia(this, a, b, offsets, opts);
    // BF16 storage: the f32 product rounded to BF16 values, then stored as BF16 (exact).
    const o = opts.storeBf16 ? { ...opts, outBf16: true } : opts;
    const off = i32(offsets);
    const E = off.length - 1;
    const fp8 = o.precision === "fp8";
    let M: number;
    let N: number;
    let K: number;
    let shape: number[];
    if (o.segment === "m") {
      if (o.transA) throw new Error("groupedMatmul m: A must not be transposed");
      const bd = batchDims(b);
      if (bd.batch !== E) throw new Error(`groupedMatmul: B holds ${bd.batch} matrices for ${E} experts`);
      M = a.rows;
      K = a.cols;
      N = o.transB ? bd.rows : bd.cols;
      shape = [M, N];
    } else {
      if (!o.transA || o.transB) throw new Error("groupedMatmul k: A must be transposed and B not");
      M = a.cols;
      N = b.cols;
      K = a.rows;
      shape = [E, M, N];
    }
    const size = shape.reduce((p, d) => p * d, 1);
    const { out, direct } = this.gemmTarget(size, shape, o);
    const c = f32(out);
    if (size > 0) {
      const gemm = { m: M, n: N, k: K, transA: !!o.transA, transB: !!o.transB, accumulate: direct };
      const outputBf16 = !!o.outBf16;
      if (fp8) {
        const promotion = o.promotion ?? 128;
        const [A, B] = [fp8Operand(a, "A", c), fp8Operand(b, "B", c)];
        this.n.groupedGemmFp8(A, B, c, off, o.segment, { ...gemm, outputBf16, promotion });
      } else {
        const lowp = o.precision === "bf16";
        const [x, y] = this.f32Operands(a, b, lowp, c);
        this.n.groupedGemmF32(x, y, c, off, o.segment, { ...gemm, inputsBf16: lowp, outputBf16 });
      }
    }
    const result = this.finish(out, direct, o);
    return o.storeBf16 ? intoBf16(this, result) : result;
  }

  // --- dense layers ----------------------------------------------------------------------------
  rmsnorm(x: Tensor, w: Tensor, eps: number) {
    const y = this.out(x.shape);
    const rstd = this.out([x.rows]);
    this.n.rmsnorm(f32(x), f32(w), { rows: x.rows, cols: x.cols }, eps, f32(y), f32(rstd));
    return { y, rstd };
  }

  rmsnormBackward(dy: Tensor, x: Tensor, w: Tensor, rstd: Tensor, accumulate?: RmsnormAccumulate) {
    const dx = this.out(x.shape);
    const dw = this.out(w.shape);
    const shape = { rows: x.rows, cols: x.cols };
    this.n.rmsnormBackward(f32(dy), f32(x), f32(w), f32(rstd), shape, f32(dx), f32(dw));
    return accumulateNorm(this, { dx, dw }, accumulate);
  }

  rope(x: Tensor, o: RopeOptions): Tensor {
    const y = this.out(x.shape);
    const { storeBf16, ...opts } = o;
    this.n.rope(f32(x), { ...opts, rows: x.rows }, f32(y));
    return storedAs(this, y, storeBf16);
  }

  headSlice(x: Tensor, o: HeadSliceOptions): Tensor {
    const y = this.out([x.rows, (o.sumHeads ? 1 : o.heads) * o.len]);
    const { storeBf16, ...opts } = o;
    this.n.headSlice(f32(x), { ...opts, rows: x.rows }, f32(y));
    return storedAs(this, y, storeBf16);
  }

  headScatterAdd(dst: Tensor, src: Tensor, o: HeadSliceOptions): void {
    const d = f32(dst);
    this.n.headScatterAdd(d, distinct(f32(src), d), { ...o, rows: dst.rows });
  }

  headConcat(
    a: Tensor,
    b: Tensor,
    heads: number,
    bHeads: number,
    storeBf16 = false,
    aPart?: HeadPart,
  ): Tensor {
    if (aPart) {
      // The part as its own tensor first (the native kernel reads whole heads).
      const part = this.headSlice(a, { heads, ...aPart });
      const y = this.headConcat(part, b, heads, bHeads, storeBf16);
      this.release(part);
      return y;
    }
    const la = a.cols / heads;
    const lb = b.cols / bHeads;
    const y = this.out([a.rows, heads * (la + lb)]);
    this.n.headConcat(f32(a), f32(b), { rows: a.rows, heads, la, lb, bHeads }, f32(y));
    return storedAs(this, y, storeBf16);
  }

  /** The native attention's sizes: the options and the per-head widths of q·k and v. */
  private attentionDims(q: Tensor, v: Tensor, o: AttentionOptions): AttentionDims {
    const { batch, seq, kvSeq, heads, scale, precision } = o;
    return { batch, seq, kvSeq, heads, dqk: q.cols / heads, dv: v.cols / heads, scale, precision };
  }

  /**
   * An attention input as the kernel reads it: f32 values, or a bf16 tensor's codes (decoded as it
   * copies its tiles, with no f32 copy of the whole tensor); only the first `rows` (a longer KV
   * cache is read in place).
   */
  private attentionInput(t: Tensor, rows = t.rows): Float32Array | Uint16Array {
    const x = t.dtype === "bf16" ? (host(t) as Uint16Array) : f32(t);
    return rows === t.rows ? x : x.subarray(0, rows * t.cols);
  }

  attention(q: Tensor, k: Tensor, v: Tensor, o: AttentionOptions) {
    const bad = attentionRowsError(q.rows, k.rows, v.rows, o);
    if (bad) throw new Error(bad);
    const out = this.out([q.rows, v.cols]);
    const lse = this.out([o.batch * o.heads * o.seq]);
    const dims = this.attentionDims(q, v, o);
    // The first batch*kvSeq rows of k and v (a longer KV cache is read in place, not copied).
    const n = o.batch * (o.kvSeq ?? o.seq);
    const [qv, kv, vv] = [this.attentionInput(q), this.attentionInput(k, n), this.attentionInput(v, n)];
    this.n.attentionForward(qv, kv, vv, dims, f32(out), f32(lse));
    return { o: out, lse };
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
    const dq = this.out(q.shape);
    const dk = this.out(k.shape);
    const dv = this.out(v.shape);
    const dOv = this.attentionInput(dO);
    const saved = {
      q: this.attentionInput(q),
      k: this.attentionInput(k),
      v: this.attentionInput(v),
      o: this.attentionInput(out),
      lse: f32(lse),
    };
    const grads = { dq: f32(dq), dk: f32(dk), dv: f32(dv) };
    this.n.attentionBackward(dOv, saved, this.attentionDims(q, v, o), grads);
    return { dq, dk, dv };
  }

  swiglu(gu: Tensor): Tensor {
    const inter = swigluWidth(gu, "swiglu");
    const h = this.out([gu.rows, inter]);
    this.n.swiglu(this.values(gu), inter, f32(h));
    return h;
  }

  swigluBackward(dh: Tensor, gu: Tensor): Tensor {
    const inter = swigluWidth(gu, "swigluBackward", dh);
    const dgu = this.out([gu.rows, 2 * inter]);
    this.n.swigluBackward(this.values(dh), this.values(gu), inter, f32(dgu));
    return dgu;
  }

  embedding(w: Tensor, ids: Tensor): Tensor {
    const id = i32(ids);
    const out = this.out([id.length, w.cols]);
    this.n.embedding(f32(w), w.rows, w.cols, id, f32(out));
    return out;
  }

  embeddingBackward(dw: Tensor, dy: Tensor, ids: Tensor): void {
    const d = f32(dw);
    this.n.embeddingBackward(d, dw.rows, dw.cols, distinct(f32(dy), d), i32(ids));
  }

  // --- mixture of experts ----------------------------------------------------------------------
  addUniformNoise(x: Tensor, o: NoiseOptions): void {
    if (x.shape.length !== 2) throw new Error(`addUniformNoise: x must be 2-D, got [${x.shape}]`);
    addUniformNoiseHost(f32(x), x.rows, x.cols, o, o.params ? i32(o.params.table) : null);
  }

  router(logits: Tensor, bias: Tensor, k: number, scaling: number): RouterResult {
    const N = logits.rows;
    const E = logits.cols;
    const scores = this.out([N, E]);
    const topIdx = this.out([N, k], "i32");
    const weights = this.out([N, k]);
    const p = { n: N, e: E, k, scaling };
    this.n.router(f32(logits), f32(bias), p, f32(scores), i32(topIdx), f32(weights));
    return { scores, topIdx, weights };
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
    const out = this.out([N, E]);
    const ds = dscores ? f32(dscores) : EMPTY_F32;
    const p = { n: N, e: E, k: topIdx.cols, scaling };
    this.n.routerBackward(f32(dweights), f32(scores), i32(topIdx), p, ds, f32(out));
    return out;
  }

  balanceLoss(scores: Tensor, topIdx: Tensor, o: { batch: number; seq: number; alpha: number }) {
    const dscores = this.out(scores.shape);
    const p = { batch: o.batch, seq: o.seq, e: scores.cols, k: topIdx.cols, alpha: o.alpha };
    const loss = this.n.balanceLoss(f32(scores), i32(topIdx), p, f32(dscores));
    return { loss: this.scalar(loss), dscores };
  }

  moePermute(x: Tensor, topIdx: Tensor, experts: number): PermuteResult {
    const N = topIdx.rows;
    const k = topIdx.cols;
    const slot = this.out([N * k], "i32");
    const offsets = this.out([experts + 1], "i32");
    /** Rows of `d` f32 values gathered by the native op (which also writes slot and offsets). */
    const gather = (src: Float32Array, d: number, dst: Float32Array) =>
      this.n.moePermute(src, i32(topIdx), { n: N, d, k, experts }, dst, i32(slot), i32(offsets));
    if (!x.quant) {
      const xs = this.out([N * k, x.cols]);
      gather(f32(x), x.cols, f32(xs));
      return { xs, slot, offsets };
    }
    // FP8 rows: their scales, then their codes as 4-byte words (a bit copy) when the rows allow it.
    const per = rowScales(x, "moePermute");
    const scales = this.out([N * k * per]);
    gather(f32(x.quant.scales), per, f32(scales));
    const codes = u8(x);
    const out = this.pool.take(x.dtype, N * k * x.cols, this.fresh) as Uint8Array;
    const words = (a: Uint8Array) => new Float32Array(a.buffer, a.byteOffset, a.length / 4);
    if (x.cols % 4 === 0 && codes.byteOffset % 4 === 0 && out.byteOffset % 4 === 0) {
      gather(words(codes), x.cols / 4, words(out));
    } else {
      const sl = i32(slot);
      for (let r = 0; r < N * k; r++) {
        const n = Math.floor(sl[r] / k);
        out.set(codes.subarray(n * x.cols, (n + 1) * x.cols), r * x.cols);
      }
    }
    const xs = this.wrap(out, [N * k, x.cols], x.dtype, { ...x.quant, scales });
    return { xs, slot, offsets };
  }

  moePermuteBackward(dxs: Tensor, slot: Tensor, tokens: number): Tensor {
    const dx = this.out([tokens, dxs.cols]);
    this.n.moePermuteBackward(this.values(dxs), i32(slot), { n: tokens, d: dxs.cols }, f32(dx));
    return dx;
  }

  moeCombine(ys: Tensor, slot: Tensor, weights: Tensor, add: readonly Tensor[] = []): Tensor {
    const N = weights.rows;
    const bad = combineAddError(add, N, ys.cols);
    if (bad) throw new Error(bad);
    const y = this.out([N, ys.cols]);
    this.n.moeCombine(this.values(ys), i32(slot), f32(weights), { n: N, d: ys.cols }, f32(y));
    for (const a of add) this.addInto(y, a);
    return y;
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

  moeCombineBackward(dy: Tensor, ys: Tensor, slot: Tensor, weights: Tensor) {
    const dys = this.out(ys.shape);
    const dweights = this.out(weights.shape);
    const tokens = { n: weights.rows, d: ys.cols };
    this.n.moeCombineBackward(
      f32(dy),
      this.values(ys),
      i32(slot),
      f32(weights),
      tokens,
      f32(dys),
      f32(dweights),
    );
    return { dys, dweights };
  }

  biasUpdate(bias: Tensor, offsets: Tensor, opts: BiasUpdateOptions): void {
    this.n.biasUpdate(f32(bias), i32(offsets), opts.gamma, opts.rule);
  }

  // --- loss and optimiser ----------------------------------------------------------------------
  crossEntropy(logits: Tensor, targets: Tensor, gradScale: number, storeBf16 = false) {
    const dlogits = this.out(logits.shape);
    const loss = this.n.crossEntropy(
      f32OrBf16(logits),
      i32(targets),
      logits.rows,
      logits.cols,
      gradScale,
      f32(dlogits),
    );
    return { loss: this.scalar(loss), dlogits: storedAs(this, dlogits, storeBf16) };
  }

  clipScale(grads: Tensor[], maxNorm: number) {
    const [norm, scale] = this.n.clipScale(grads.map(f32), maxNorm);
    return { norm: this.scalar(norm), scale: this.scalar(scale) };
  }

  prepareClipScale(grads: Tensor[]): PreparedClipScale {
    return clipScaleOver(grads, (g, maxNorm) => this.clipScale(g, maxNorm));
  }

  /** One native call per step: the addon's rayon loop runs over the blocks of all the tensors. */
  prepareAdamW(slots: AdamWSlot[]): PreparedAdamW {
    checkAdamWSlots(slots);
    const list = slots.map((s) => ({ ...s }));
    const moment = (t: Tensor): [Float32Array, Uint16Array] =>
      t.dtype === "bf16" ? [EMPTY_F32, host(t) as Uint16Array] : [f32(t), EMPTY_U16];
    let disposed = false;
    return {
      update: (o: AdamWOptions) => {
        if (disposed) throw new Error("adamw: used after dispose()");
        const tensors = list.map(({ p, g, m, v, decay }) => {
          const P = f32(p);
          const [mF32, mBf16] = moment(m);
          const [vF32, vBf16] = moment(v);
          return { p: P, g: distinct(f32(g), P), mF32, mBf16, vF32, vBf16, decay };
        });
        const { lr, beta1, beta2, eps, weightDecay, step } = o;
        const gradScale = f32(o.gradScale)[0];
        this.n.adamwMulti(tensors, { lr, beta1, beta2, eps, weightDecay, step, gradScale });
      },
      dispose: () => {
        disposed = true;
      },
    };
  }
}
