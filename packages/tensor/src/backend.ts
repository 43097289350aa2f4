// The Backend interface: the one op set the model is written against (docs/runtime.md rules 1-5).
// Ops return tensors and never host numbers; every shape is row-major and matrices are
// [rows, cols] with all leading dimensions folded into rows. Backward ops are separate ops.
import type * as core from "@moe8/fp8-core";
import type { Tensor } from "./tensor.ts";
import type { DType, Fp8Format, HostArray } from "./types.ts";

export type { MatmulPrecision } from "@moe8/fp8-core";
export type BackendName = "ts" | "cpu" | "cuda";

/** fp8-core's quantisation options, with `segments` a device tensor of E+1 i32 row offsets. */
export type QuantizeOptions = core.QuantizeOptions<Tensor>;

/** fp8-core's GEMM options, accumulating into a tensor of this backend. */
export interface MatmulOptions extends core.MatmulOptions<Tensor> {
  /**
   * Return the output as a bf16 tensor: its values rounded to BF16 as with `outBf16`, stored in half
   * the bytes (for consumers that read BF16: the output head's logits, the experts' activations).
   * Not with `accumulate`; grouped GEMMs: segments along M only.
   */
  storeBf16?: boolean;
  /**
   * Return the output quantised as these options ask, never stored in f32: quantize(product, q)
   * bit for bit, where product is this GEMM with the other options (an FP8 output with its scales,
   * for a next FP8 GEMM that reads nothing else of it). A device backend may quantise in the GEMM's
   * epilogue (cuda on sm_90: E4M3 / E5M2 1x128 tiles of an FP8 Fprop or Dgrad). Not with
   * `accumulate` or `storeBf16`; grouped GEMMs: segments along M only.
   */
  storeQuantized?: QuantizeOptions;
}

export interface GroupedMatmulOptions extends MatmulOptions {
  /**
   * `m`: rows of A are split by expert; B holds E matrices back to back (expert Fprop/Dgrad).
   * `k`: the reduction runs over each expert's rows of A^T and B; C holds E matrices (expert Wgrad).
   */
  segment: "m" | "k";
}

/** moeCombine's `add` checked (every backend refuses the same): at most 2 f32 tensors [N, d]. */
export function combineAddError(add: readonly Tensor[], N: number, d: number): string | null {
  if (add.length > 2) return `moeCombine: at most 2 tensors to add, got ${add.length}`;
  for (const a of add) {
    if (a.dtype !== "f32") return `moeCombine: add must be f32, got ${a.dtype}`;
    if (a.rows !== N || a.cols !== d) return `moeCombine: add [${a.shape}], expected [${N}, ${d}]`;
  }
  return null;
}

/**
 * The options' storeBf16 and storeQuantized checked against the others (every backend refuses the
 * same combinations).
 */
export function storeBf16Error(o: MatmulOptions | GroupedMatmulOptions): string | null {
  const op = "segment" in o ? "groupedMatmul" : "matmul";
  if (o.storeQuantized) {
    if (o.storeBf16) return `${op}: storeQuantized and storeBf16 exclude each other`;
    if ("segment" in o && o.segment !== "m") return "groupedMatmul: storeQuantized needs segments along M";
    if (o.accumulate) return `${op}: storeQuantized cannot accumulate into an f32 tensor`;
    return null;
  }
  if (!o.storeBf16) return null;
  if ("segment" in o && o.segment !== "m") return "groupedMatmul: storeBf16 needs segments along M";
  if (o.accumulate) return `${op}: storeBf16 cannot accumulate into an f32 tensor`;
  return null;
}

export interface AttentionOptions {
  batch: number;
  /** Queries per sample: q and o are [batch*seq, heads*d]. */
  seq: number;
  /**
   * Keys (and values) per sample, at least `seq` (default `seq`): k and v are [batch*kvSeq,
   * heads*d]. The queries sit at the last `seq` of the `kvSeq` positions, so query i sees keys
   * 0..kvSeq-seq+i (a KV-cache decode step: seq 1, kvSeq the context). Forward only:
   * attentionBackward takes kvSeq = seq. With batch 1, k and v may hold more rows than kvSeq (a
   * cache with room for later positions): only their first kvSeq rows are read.
   */
  kvSeq?: number;
  heads: number;
  /** Softmax scale, 1/sqrt(head dim of q·k). */
  scale: number;
  /**
   * `bf16`: q, k, v, dO and the probabilities are rounded to BF16; accumulation stays f32. q, k, v,
   * dO and the forward output may be given as bf16 tensors (e.g. kept for backward at half the
   * memory); the output and gradients are f32.
   */
  precision: "f32" | "bf16";
}

/**
 * Why q, k and v (by their row counts) do not fit the attention options, or null: q has
 * batch*seq rows; k and v batch*kvSeq, or with batch 1 at least kvSeq (only those are read).
 */
export function attentionRowsError(
  qRows: number,
  kRows: number,
  vRows: number,
  o: AttentionOptions,
): string | null {
  const Tk = o.kvSeq ?? o.seq;
  const kv = o.batch * Tk;
  const fits = (rows: number) => (o.batch === 1 ? rows >= kv : rows === kv);
  if (Tk >= o.seq && qRows === o.batch * o.seq && fits(kRows) && fits(vRows)) return null;
  return `attention: q ${qRows}, k ${kRows}, v ${vRows} rows for batch ${o.batch} x seq ${o.seq} (kvSeq ${Tk})`;
}

export interface RopeOptions {
  /** The row layout is [heads][width]; the rotated slice is [offset, offset + dim) of each head. */
  heads: number;
  width: number;
  offset: number;
  dim: number;
  /** Position of row r is start + r % seqLen. */
  seqLen: number;
  /** The position of row 0 (default 0): rows of a KV-cache decode step sit after the context. */
  start?: number;
  theta: number;
  /** Rotate by the negative angle (the backward pass). */
  inverse?: boolean;
  /** Return a bf16 tensor: the f32 result rounded to BF16 (what cast(y, "bf16") gives), one pass. */
  storeBf16?: boolean;
}

/**
 * Where rmsnormBackward adds its results instead of returning new tensors: dx into a running
 * activation gradient, dw into the norm weight's gradient (f32, the results' shapes). Each sum is
 * the f32 addition addInto does, bit for bit.
 */
export interface RmsnormAccumulate {
  dx?: Tensor;
  dw?: Tensor;
}

/** Columns start .. start + len of each `width`-wide head. */
export interface HeadPart {
  width: number;
  start: number;
  len: number;
}

export interface HeadSliceOptions {
  heads: number;
  width: number;
  start: number;
  len: number;
  /** Sum the slices over heads ([R, len] out): the backward of a broadcast head. */
  sumHeads?: boolean;
  /** headSlice: return a bf16 tensor (the f32 result rounded to BF16, as cast gives), one pass. */
  storeBf16?: boolean;
}

export interface RouterResult {
  /** Sigmoid affinities [N, E], f32. */
  scores: Tensor;
  /** Selected experts [N, k], i32, by descending score + bias. */
  topIdx: Tensor;
  /** routed_scaling_factor * s_i / sum of the selected s, [N, k], f32. */
  weights: Tensor;
}

/**
 * What Backend.fromWords rebuilds from 4-byte words: BF16 values, or FP8 codes whose scales follow
 * the rows (1x128 tiles or one per row).
 */
export type WordsKind = { dtype: "bf16" } | { dtype: Fp8Format; group: "tile" | "row" };

/** A matrix in the form the collectives move (Backend.toWords). */
export interface Words {
  /** The storage's bytes as i32 [rows, cols * element bytes / 4]. */
  words: Tensor;
  /** FP8: a copy of the scales, [rows, scales per row]; BF16: null. */
  scales: Tensor | null;
}

export interface PermuteResult {
  /** Token rows copied once per selection and grouped by expert, [N*k, d] (FP8 if x is). */
  xs: Tensor;
  /** For each row of xs the flat selection index n*k + j it came from, [N*k] i32. */
  slot: Tensor;
  /** E+1 row offsets of each expert's rows in xs, i32. */
  offsets: Tensor;
}

/**
 * How `biasUpdate` moves each expert's correction bias from the loads of one step (docs/model.md,
 * "Balancing"): `sign` is DeepSeek-V3's bias_i += gamma * sign(mean - load_i); `error` scales the
 * step by the relative load error, bias_i += gamma * (mean - load_i) / mean, so a collapsed layer
 * is pulled back fast and a nearly balanced one is barely moved; `clipped` is `error` with the
 * relative error clipped to [-1, 1], so an overloaded expert moves no faster than an idle one
 * (with E/k = 10 the error rule's step down is up to 9 times its step up).
 */
export type BiasRule = "sign" | "error" | "clipped";

export interface BiasUpdateOptions {
  gamma: number;
  rule: BiasRule;
}

export interface AdamWOptions {
  lr: number;
  beta1: number;
  beta2: number;
  eps: number;
  /** Decoupled weight decay, for the tensors marked `decay` (the others get none). */
  weightDecay: number;
  /** 1-based step for bias correction. */
  step: number;
  /** A one-element tensor multiplying the gradient (global-norm clipping), read on the device. */
  gradScale: Tensor;
}

/** One tensor AdamW updates: the f32 master weight, its f32 gradient and both moments (f32 or bf16). */
export interface AdamWSlot {
  p: Tensor;
  g: Tensor;
  m: Tensor;
  v: Tensor;
  /** AdamWOptions.weightDecay applies (weights: yes; norms: no). */
  decay: boolean;
}

/**
 * AdamW over a list of tensors fixed once (an optimiser's parameters): each `update` is one step of
 * all of them, in place. On cuda that is one launch over a device table of the tensors built when
 * the list is prepared (so a step uploads nothing); `dispose` frees the table, not the tensors.
 */
export interface PreparedAdamW {
  update(opts: AdamWOptions): void;
  dispose(): void;
}

/**
 * Global-norm clipping over a list of gradients fixed once: `clipScale` is Backend.clipScale of
 * those gradients (on cuda two launches whatever their number, from a device table built once).
 */
export interface PreparedClipScale {
  clipScale(maxNorm: number): { norm: Tensor; scale: Tensor };
  dispose(): void;
}

/**
 * A PreparedClipScale that calls a backend's one-off `clipScale` on a fixed list of gradients (the
 * backends whose norm needs no prepared state: ts, cpu); refuses use after dispose().
 */
export function clipScaleOver(
  grads: Tensor[],
  clipScale: (grads: Tensor[], maxNorm: number) => { norm: Tensor; scale: Tensor },
): PreparedClipScale {
  const list = [...grads];
  let disposed = false;
  return {
    clipScale: (maxNorm) => {
      if (disposed) throw new Error("clipScale: used after dispose()");
      return clipScale(list, maxNorm);
    },
    dispose: () => {
      disposed = true;
    },
  };
}

/**
 * Device work recorded once and replayed as one launch (a CUDA graph): `replay` enqueues exactly the
 * recorded kernels with the recorded arguments and addresses, so what changes between replays must
 * be written into tensors the recorded work reads (its inputs), and its outputs are read after.
 */
export interface CapturedGraph<T> {
  /** What the recorded function returned (tensors made inside it stay valid: the graph's outputs). */
  readonly result: T;
  /** Operations recorded (kernels and memsets). */
  readonly nodes: number;
  /**
   * Tensors made outside the graph that hold device memory its replay writes (the graph's free
   * memory is lent to other work between replays): 0 before a replay may run.
   */
  borrowed(): number;
  /** Enqueues one replay (refused while borrowed() > 0). */
  replay(): void;
  /** Frees the graph and its outputs; its memory goes back to the allocator. */
  dispose(): void;
}

/** Per kernel, its GPU time and launches in one replay of a timed graph (Backend.timeReplayedKernels). */
export interface ReplayedKernelTimes {
  replays: number;
  /** Operations recorded (with the timing's event nodes). */
  nodes: number;
  /** The slowest replay's first start to last end (ms). */
  spanMs: number;
  busyMs: number;
  kernels: { name: string; ms: number; launches: number }[];
}

export interface Backend {
  readonly name: BackendName;

  // Memory and lifetimes (docs/runtime.md rule 6).
  upload(data: HostArray, shape: readonly number[], dtype?: DType): Tensor;
  zeros(shape: readonly number[], dtype?: DType): Tensor;
  read(t: Tensor): Promise<HostArray>;
  /** Overwrites a tensor's contents from the host (same element count and storage type). */
  write(t: Tensor, data: HostArray): void;
  release(t: Tensor): void;
  /** Runs `fn` with a fresh arena: everything allocated inside and not `keep()`-ed is released after. */
  scope<T>(fn: () => T): T;
  /** Moves a tensor out of the current arena so it outlives the scope. */
  keep<T extends Tensor>(t: T): T;
  /** Live tensors and bytes, for leak checks. */
  stats(): { tensors: number; bytes: number };
  /**
   * Records the device work `fn` enqueues (nothing runs until a replay) where the backend can
   * (cuda); absent on the host backends. `fn` must not read from the device or upload to it.
   */
  captureGraph?<T>(fn: () => T): CapturedGraph<T>;
  /**
   * GPU time per kernel of the work `record` enqueues, recorded as a graph with timing events and
   * replayed `replays` times, then freed (cuda); absent where there is no graph to time.
   */
  timeReplayedKernels?<T>(record: () => T, replays?: number): Promise<ReplayedKernelTimes>;
  /** The most tensor bytes live at once since the last resetPeakBytes() (views not counted). */
  peakBytes(): number;
  resetPeakBytes(): void;

  // Elementwise and casts.
  add(a: Tensor, b: Tensor): Tensor;
  /** dst += alpha * src, in place. */
  addInto(dst: Tensor, src: Tensor, alpha?: number): void;
  scale(a: Tensor, s: number): Tensor;
  fill(t: Tensor, value: number): void;
  copy(t: Tensor): Tensor;
  cast(t: Tensor, dtype: "f32" | "bf16"): Tensor;
  /** A tensor with the same storage seen with another shape of equal size. Not separately owned. */
  reshape(t: Tensor, shape: readonly number[]): Tensor;
  /** A copy of rows [start, start + count) along the first dimension (not of a quantised tensor). */
  rows(t: Tensor, start: number, count: number): Tensor;
  /** dst rows [start, start + src rows) = src, in place (same dtype and row size). */
  setRows(dst: Tensor, start: number, src: Tensor): void;
  /**
   * A BF16 matrix (even cols), or an FP8 one whose scales follow its rows (cols % 4 == 0), as the
   * collectives move it (f32 and i32 only): its bytes as i32 words and a copy of its scales, each
   * with one row per row, so that rows(), setRows() and allToAll take them apart and together
   * (expert parallelism's FP8 dispatch and BF16 combine). A bit copy; fromWords is its inverse.
   */
  toWords(t: Tensor): Words;
  /** The matrix toWords made `words` (and `scales`) of, as `kind` says it was; a bit copy. */
  fromWords(words: Tensor, scales: Tensor | null, kind: WordsKind): Tensor;
  sum(t: Tensor): Tensor;

  // FP8 quantisation (fused amax + scale + encode).
  quantize(x: Tensor, opts: QuantizeOptions): Tensor;
  dequantize(q: Tensor): Tensor;
  /**
   * quantize(dequantize(q), opts), bit for bit: an FP8 tensor quantised again in another layout (the
   * Wgrad operand made from a 1x128 FP8 activation cache). A device backend may fuse it.
   */
  requantize(q: Tensor, opts: QuantizeOptions): Tensor;
  /**
   * FP8 range events of a quantisation q of x, as f32 [overflow, underflow] counts: overflow = x was
   * not finite or beyond what rounds to the largest code (clipped by saturation); underflow = a
   * non-zero x encoded to zero.
   */
  fp8Flow(x: Tensor, q: Tensor): Tensor;

  // GEMMs.
  matmul(a: Tensor, b: Tensor, opts: MatmulOptions): Tensor;
  groupedMatmul(a: Tensor, b: Tensor, offsets: Tensor, opts: GroupedMatmulOptions): Tensor;

  // Layers' natural units of work.
  rmsnorm(x: Tensor, w: Tensor, eps: number): { y: Tensor; rstd: Tensor };
  /**
   * rmsnorm with y handed over quantised, never stored in f32: quantize(y, q) bit for bit, and rstd
   * (the next GEMM's FP8 input, when that GEMM reads nothing else of y).
   */
  rmsnormQuantized(x: Tensor, w: Tensor, eps: number, q: QuantizeOptions): { y: Tensor; rstd: Tensor };
  /** dx and dw, or (accumulate) the given tensors with them added in. */
  rmsnormBackward(
    dy: Tensor,
    x: Tensor,
    w: Tensor,
    rstd: Tensor,
    accumulate?: RmsnormAccumulate,
  ): { dx: Tensor; dw: Tensor };
  rope(x: Tensor, opts: RopeOptions): Tensor;
  /**
   * rope's output handed to the next Linear's backward quantised, never stored in f32:
   * quantize(rope(x, opts), q.dgrad) and quantize(rope(x, opts), q.wgrad), bit for bit (MLA's q and
   * kv_a gradients after the inverse rotation).
   */
  ropeQuantized(x: Tensor, opts: RopeOptions, q: GradQuant): { dgrad: Tensor; wgrad: Tensor };
  headSlice(x: Tensor, opts: HeadSliceOptions): Tensor;
  /** dst[:, head h, start:start+len] += src (the backward of headSlice). */
  headScatterAdd(dst: Tensor, src: Tensor, opts: HeadSliceOptions): void;
  /**
   * Per head [a_h | b_h]; b has `bHeads` = heads or 1 (one head broadcast to all). storeBf16: a bf16
   * tensor of the same values rounded to BF16 (the attention core's operands). aPart: a's heads are
   * `width` wide and a_h is their columns start .. start + len (headSlice(a, aPart) without the copy).
   */
  /**
   * headConcat's f32 output quantised as q asks, never stored in f32 (see ropeQuantized; MLA's
   * kv_b gradient [d(k_nope) | d(v)]).
   */
  headConcatQuantized(
    a: Tensor,
    b: Tensor,
    heads: number,
    bHeads: number,
    aPart: HeadPart | undefined,
    q: GradQuant,
  ): { dgrad: Tensor; wgrad: Tensor };
  headConcat(
    a: Tensor,
    b: Tensor,
    heads: number,
    bHeads: number,
    storeBf16?: boolean,
    aPart?: HeadPart,
  ): Tensor;
  attention(q: Tensor, k: Tensor, v: Tensor, opts: AttentionOptions): { o: Tensor; lse: Tensor };
  attentionBackward(
    dO: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    opts: AttentionOptions,
  ): { dq: Tensor; dk: Tensor; dv: Tensor };
  /**
   * h = silu(g) * u, [rows, inter], for gu = [g | u] ([rows, 2 inter], f32 or bf16): the gate and up
   * projections' outputs side by side, as their one fused GEMM writes them.
   */
  swiglu(gu: Tensor): Tensor;
  /** swiglu handed over quantised, never stored in f32: quantize(swiglu(gu), q) bit for bit. */
  swigluQuantized(gu: Tensor, q: QuantizeOptions): Tensor;
  /** d[g | u] (f32, gu's packed layout) of swiglu from dh [rows, inter]. */
  swigluBackward(dh: Tensor, gu: Tensor): Tensor;
  /**
   * swigluBackward handed over quantised, never stored in f32: quantize(d[g | u], q.dgrad) and
   * quantize(d[g | u], q.wgrad), bit for bit (the gate|up projection's Dgrad and Wgrad operands).
   */
  swigluBackwardQuantized(dh: Tensor, gu: Tensor, q: GradQuant): { dgrad: Tensor; wgrad: Tensor };
  embedding(w: Tensor, ids: Tensor): Tensor;
  /** dw[ids[n]] += dy[n]. */
  embeddingBackward(dw: Tensor, dy: Tensor, ids: Tensor): void;

  // Mixture of experts.
  router(logits: Tensor, bias: Tensor, k: number, scaling: number): RouterResult;
  /**
   * In place, x f32 [rows, cols]: x[r, c] += noise(o.seed, o.rowOffset + r, c) * o.scale, the noise
   * uniform in [-1, 1) from a counter hash (uniformNoise: the same bits on every backend, whatever
   * the rows' split over micro-batches or ranks). The router noise of training (docs/model.md).
   */
  addUniformNoise(x: Tensor, o: NoiseOptions): void;
  /** Gradient of the logits from d(weights) and an optional extra d(scores) (the balance loss). */
  routerBackward(dweights: Tensor, scores: Tensor, topIdx: Tensor, scaling: number, dscores?: Tensor): Tensor;
  /** Sequence-wise balance loss alpha * sum_i f_i P_i averaged over sequences, and d(loss)/d(scores). */
  balanceLoss(
    scores: Tensor,
    topIdx: Tensor,
    opts: { batch: number; seq: number; alpha: number },
  ): { loss: Tensor; dscores: Tensor };
  /**
   * x: f32 [N, d], or FP8 [N, d] of 1x128 tiles or rows (its rows' codes and scales are moved
   * together: permuting a quantised x is quantising the permuted x, bit for bit; on cuda d % 4 == 0).
   */
  moePermute(x: Tensor, topIdx: Tensor, experts: number): PermuteResult;
  moePermuteBackward(dxs: Tensor, slot: Tensor, tokens: number): Tensor;
  /**
   * y[n] = sum_j weights[n, j] ys[the row of token n's j-th choice], in f32; then each tensor of
   * `add` (at most 2, f32 [N, d]) added in order with f32 additions: the same values as add() after
   * it, without the passes (the MoE layer adds its shared experts' output and the residual).
   */
  moeCombine(ys: Tensor, slot: Tensor, weights: Tensor, add?: readonly Tensor[]): Tensor;
  /** ys (the expert outputs the forward combined) may be a bf16 tensor. */
  moeCombineBackward(
    dy: Tensor,
    ys: Tensor,
    slot: Tensor,
    weights: Tensor,
  ): { dys: Tensor; dweights: Tensor };
  /**
   * moeCombineBackward with d(ys) handed over quantised, never stored in f32: dweights, and
   * quantize(dys, q.dgrad) and quantize(dys, q.wgrad), bit for bit (the experts' down projection's
   * Dgrad and Wgrad operands; see Linear.gradQuant).
   */
  moeCombineBackwardQuantized(
    dy: Tensor,
    ys: Tensor,
    slot: Tensor,
    weights: Tensor,
    q: GradQuant,
  ): { dweights: Tensor; dgrad: Tensor; wgrad: Tensor };
  /**
   * The correction bias update after a step, in place, from the loads in the permute offsets:
   * bias_i += gamma * sign(mean - load_i) or gamma * (mean - load_i) / mean (`opts.rule`).
   */
  biasUpdate(bias: Tensor, offsets: Tensor, opts: BiasUpdateOptions): void;

  // Loss and optimiser.
  /**
   * Mean token cross-entropy [1] and its gradient times `gradScale`, fused. logits may be a bf16
   * tensor (read as its values); storeBf16: dlogits as a bf16 tensor, the f32 gradient rounded to
   * BF16 (what cast gives), for an output head whose backward reads it in BF16.
   */
  crossEntropy(
    logits: Tensor,
    targets: Tensor,
    gradScale: number,
    storeBf16?: boolean,
  ): { loss: Tensor; dlogits: Tensor };
  /** Global L2 norm of all gradients [1] and the clip factor min(1, maxNorm / (norm + 1e-6)) [1]. */
  clipScale(grads: Tensor[], maxNorm: number): { norm: Tensor; scale: Tensor };
  /** clipScale over the same gradients, step after step. */
  prepareClipScale(grads: Tensor[]): PreparedClipScale;
  /** In-place AdamW on f32 master weights, step after step; moments in f32 or bf16 storage. */
  prepareAdamW(slots: AdamWSlot[]): PreparedAdamW;
}

/** What every backend's prepareAdamW checks: f32 weights and gradients, moments of f32 or bf16, one size. */
export function checkAdamWSlots(slots: readonly AdamWSlot[]): void {
  for (const { p, g, m, v } of slots) {
    for (const t of [p, g, m, v])
      if (t.disposed) throw new Error(`prepareAdamW: use of a disposed tensor ${t}`);
    if (p.dtype !== "f32" || g.dtype !== "f32")
      throw new Error(`prepareAdamW: weights and gradients must be f32, got ${p} and ${g}`);
    for (const t of [m, v])
      if (t.dtype !== "f32" && t.dtype !== "bf16")
        throw new Error(`prepareAdamW: moments must be f32 or bf16, got ${t}`);
    if (g.size !== p.size || m.size !== p.size || v.size !== p.size)
      throw new Error(`prepareAdamW: p ${p}, g ${g}, m ${m} and v ${v} differ in size`);
  }
}

/** Backend.addUniformNoise's stream: a seed, the first row's index in it, and the width. */
export interface NoiseOptions {
  /** Any 32-bit integer (its low 32 bits are used). */
  seed: number;
  /** Index of x's row 0 among the rows the seed covers (a micro-batch's or a rank's first row). */
  rowOffset: number;
  scale: number;
  /**
   * Where the seed and the scale are read instead, when the op runs: row `row` of `table` (i32
   * [rows, 2]: the seed, the scale's f32 bits), which the host rewrites between replays of a
   * recorded step (StepRunner); `seed` and `scale` are then ignored.
   */
  params?: { table: Tensor; row: number };
}

/** The seed and scale NoiseOptions stand for, given its table's values when it names one. */
export function noiseSeedScale(o: NoiseOptions, table: Int32Array | null): { seed: number; scale: number } {
  if (!o.params) return { seed: o.seed, scale: o.scale };
  if (!table || table.length < 2 * (o.params.row + 1))
    throw new Error(`addUniformNoise: no row ${o.params.row} in the noise table`);
  const bits = new Int32Array([table[2 * o.params.row + 1]]);
  return { seed: table[2 * o.params.row], scale: new Float32Array(bits.buffer)[0] };
}

/**
 * The noise of (seed, row, col), uniform in [-1, 1) with 24 bits: a 32-bit mix (lowbias32) of the
 * seed and the position, its top 24 bits u as 2 u / 2^24 - 1 (exact in f32). Every backend computes
 * these bits; the CUDA kernel mirrors this function.
 */
export function uniformNoise(seed: number, row: number, col: number): number {
  let h = (seed + Math.imul(row, 0x9e3779b1) + Math.imul(col, 0x85ebca77)) >>> 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d) >>> 0;
  h ^= h >>> 15;
  h = Math.imul(h, 0x846ca68b) >>> 0;
  h ^= h >>> 16;
  return (h >>> 8) / 8388608 - 1;
}

/** addUniformNoise on host f32 values [rows, cols] (the ts and cpu backends). */
export function addUniformNoiseHost(
  x: Float32Array,
  rows: number,
  cols: number,
  o: NoiseOptions,
  table: Int32Array | null = null,
): void {
  const { seed, scale: s } = noiseSeedScale(o, table);
  const scale = Math.fround(s);
  for (let r = 0; r < rows; r++)
    for (let c = 0; c < cols; c++) {
      const i = r * cols + c;
      x[i] = Math.fround(x[i] + Math.fround(uniformNoise(seed, o.rowOffset + r, c) * scale));
    }
}

/** How a Linear's backward quantises its output gradient for Dgrad and for Wgrad (Linear.gradQuant). */
export interface GradQuant {
  dgrad: QuantizeOptions;
  wgrad: QuantizeOptions;
}

/** moeCombineBackwardQuantized as its definition: d(ys) in f32, quantised twice, released. */
export function combineBackwardQuantizedVia(
  b: Backend,
  dy: Tensor,
  ys: Tensor,
  slot: Tensor,
  weights: Tensor,
  q: GradQuant,
): { dweights: Tensor; dgrad: Tensor; wgrad: Tensor } {
  const { dys, dweights } = b.moeCombineBackward(dy, ys, slot, weights);
  return { dweights, ...quantizedVia(b, dys, q) };
}

/** A producer's f32 output quantised twice as q asks and released: the fused ops' definition. */
export function quantizedVia(b: Backend, y: Tensor, q: GradQuant): { dgrad: Tensor; wgrad: Tensor } {
  const dgrad = b.quantize(y, q.dgrad);
  const wgrad = b.quantize(y, q.wgrad);
  b.release(y);
  return { dgrad, wgrad };
}

/** rmsnormQuantized as its definition: y in f32, quantised, released. */
export function rmsnormQuantizedVia(
  b: Backend,
  x: Tensor,
  w: Tensor,
  eps: number,
  q: QuantizeOptions,
): { y: Tensor; rstd: Tensor } {
  const { y, rstd } = b.rmsnorm(x, w, eps);
  const yq = b.quantize(y, q);
  b.release(y);
  return { y: yq, rstd };
}

/** swigluQuantized as its definition: h in f32, quantised, released. */
export function swigluQuantizedVia(b: Backend, gu: Tensor, q: QuantizeOptions): Tensor {
  const h = b.swiglu(gu);
  const hq = b.quantize(h, q);
  b.release(h);
  return hq;
}

/** swigluBackwardQuantized as its definition: d[g | u] in f32, quantised twice, released. */
export function swigluBackwardQuantizedVia(
  b: Backend,
  dh: Tensor,
  gu: Tensor,
  q: GradQuant,
): { dgrad: Tensor; wgrad: Tensor } {
  return quantizedVia(b, b.swigluBackward(dh, gu), q);
}

/** rmsnormBackward's accumulate as its definition: each result added into its target and released. */
export function accumulateNorm(
  b: Backend,
  r: { dx: Tensor; dw: Tensor },
  acc: RmsnormAccumulate | undefined,
): { dx: Tensor; dw: Tensor } {
  const into = (t: Tensor | undefined, v: Tensor) => {
    if (!t) return v;
    b.addInto(t, v);
    b.release(v);
    return t;
  };
  return { dx: into(acc?.dx, r.dx), dw: into(acc?.dw, r.dw) };
}

/** Backend.requantize as its definition: dequantise to f32, quantise again, release the f32 copy. */
export function requantizeViaF32(b: Backend, q: Tensor, opts: QuantizeOptions): Tensor {
  const x = b.dequantize(q);
  const out = b.quantize(x, opts);
  b.release(x);
  return out;
}

/**
 * t in BF16 storage, releasing the f32 original: how layers keep for backward a tensor whose values
 * are BF16 anyway (a BF16-rounded GEMM output, an input the consuming op rounds), exactly, at half
 * the bytes.
 */
/** matmul with storeQuantized as its definition: the product with the other options, quantised, released. */
export function matmulQuantizedVia(b: Backend, a: Tensor, w: Tensor, o: MatmulOptions): Tensor {
  return quantizedAndReleased(b, b.matmul(a, w, { ...o, storeQuantized: undefined }), o.storeQuantized!);
}

/** groupedMatmul with storeQuantized as its definition (see matmulQuantizedVia). */
export function groupedMatmulQuantizedVia(
  b: Backend,
  a: Tensor,
  w: Tensor,
  offsets: Tensor,
  o: GroupedMatmulOptions,
): Tensor {
  const y = b.groupedMatmul(a, w, offsets, { ...o, storeQuantized: undefined });
  return quantizedAndReleased(b, y, o.storeQuantized!);
}

function quantizedAndReleased(b: Backend, y: Tensor, q: QuantizeOptions): Tensor {
  const yq = b.quantize(y, q);
  b.release(y);
  return yq;
}

/** t itself, or (bf16) its BF16 copy with t released: the storeBf16 options of the host backends. */
export function storedAs(b: Backend, t: Tensor, bf16: boolean | undefined): Tensor {
  return bf16 ? intoBf16(b, t) : t;
}

export function intoBf16(b: Backend, t: Tensor): Tensor {
  const t16 = b.cast(t, "bf16");
  b.release(t);
  return t16;
}
