// The `cuda` backend: tensors live in device memory (a `DeviceBuffer` from the addon's caching
// allocator, freed explicitly when the tensor is released, never by the garbage collector) and
// every op is a kernel (src/cuda/kernels/*.cu, compiled at run time with NVRTC) or a cuBLASLt GEMM
// enqueued on one CUDA stream. Nothing here waits for the device except `read()` (and `item()`,
// which reads): ops return tensors immediately (docs/runtime.md rule 1), routing stays on the
// device (rule 2) and every reduction has a fixed order (rule 7). The semantics are those of the
// `ts` reference backend, which the shared op suite checks.
//
// This class is a table: each op is a function of cuda-backend/<module>.ts, one module per kernel
// file (elementwise, quant, gemm, nn, attention, moe, optim), over the CudaContext that holds the
// addon, the launch and the memory helpers. Launches are typed from the kernels' .cu declarations
// (cuda-backend/launch.ts).
//
// Device layouts are the Tensor's logical layouts, with two exceptions: the scales of a column-tile
// quantisation with expert `segments` have a count that depends on the (device-resident) segment
// sizes, so the scales tensor is allocated with the upper bound (ceil(rows/128) + E) * cols; its
// first entries hold the reference's compact layout, and `read()` returns exactly those. And on
// sm_90 the codes of a column-tile quantisation are stored K-major for the Wgrad (quant.ts,
// CudaContext.kMajor); `read()` and every other consumer see them row-major.
import { UsageError } from "@moe8/fp8-core";
import {
  type AdamWSlot,
  type AttentionOptions,
  type Backend,
  type BiasUpdateOptions,
  BYTES_PER_ELEMENT,
  type CapturedGraph,
  type Collectives,
  combineAddError,
  combineBackwardQuantizedVia,
  type DType,
  type GradQuant,
  type GroupedMatmulOptions,
  type HeadPart,
  type HeadSliceOptions,
  type HostArray,
  HostLifetimes,
  hostArray,
  type MatmulOptions,
  type NoiseOptions,
  numel,
  type PermuteResult,
  type PreparedAdamW,
  type PreparedClipScale,
  type QuantizeOptions,
  quantizedVia,
  type ReplayedKernelTimes,
  type RmsnormAccumulate,
  type RopeOptions,
  type RouterResult,
  rmsnormQuantizedVia,
  swigluBackwardQuantizedVia,
  swigluQuantizedVia,
  Tensor,
  type Words,
  type WordsKind,
} from "@moe8/tensor";
import type { DeviceBuffer, NcclComm } from "../native.d.cts";
import * as attn from "./cuda-backend/attention.ts";
import { CudaContext, cdiv, u8view } from "./cuda-backend/context.ts";
import * as ew from "./cuda-backend/elementwise.ts";
import * as gemm from "./cuda-backend/gemm.ts";
import type { Sm90DenseMode } from "./cuda-backend/gemm-sm90.ts";
import * as moe from "./cuda-backend/moe.ts";
import { ncclCollectives } from "./cuda-backend/nccl.ts";
import * as nn from "./cuda-backend/nn.ts";
import * as optim from "./cuda-backend/optim.ts";
import * as quant from "./cuda-backend/quant.ts";
import { loadNative } from "./index.ts";

export class CudaBackend extends HostLifetimes implements Backend {
  readonly name = "cuda" as const;
  private readonly cx: CudaContext;

  constructor() {
    super();
    const s = loadNative();
    if (!s.addon)
      throw new UsageError(`backend "cuda" is not available: the native addon is not loaded (${s.reason})`);
    if (typeof s.addon.cudaInfo !== "function")
      throw new UsageError(
        'backend "cuda" is not available: this build of @moe8/kernels has no CUDA support',
      );
    const info = s.addon.cudaInfo();
    if (!info.available) throw new UsageError(`backend "cuda" is not available: ${info.reason}`);
    this.cx = new CudaContext(s.addon, this as unknown as Backend, (t) => this.register(t));
  }

  /**
   * This rank's collectives over NCCL (issue 22), for a communicator made with
   * `new NcclComm(uniqueId, size, rank)` on this process's GPU: gradients, weights and rows move
   * between the GPUs on the backend's stream (cuda-backend/nccl.ts). The communicators its `split`
   * makes go into `made`, for the caller to dispose with `comm`.
   */
  ncclCollectives(comm: NcclComm, made: NcclComm[] = []): Collectives {
    return ncclCollectives(this.cx, comm, made);
  }

  /** cuBLASLt for the GEMMs it has (MOE8_CUBLASLT=0: never). */
  get useLt(): boolean {
    return this.cx.useLt;
  }
  /** cuBLASLt for FP8 GEMMs (MOE8_CUBLASLT_FP8=0: never). */
  get useLtFp8(): boolean {
    return this.cx.useLtFp8;
  }
  /** cuBLASLt's block-scaled FP8 for Fprop (MOE8_CUBLASLT_FP8_BLOCK=0: never). */
  get useLtFp8Block(): boolean {
    return this.cx.useLtFp8Block;
  }
  /**
   * Which kernels run the experts' grouped FP8 Fprop and Dgrad: the Hopper wgmma kernels
   * (gemm_sm90.cu) on a compute-capability-9.0 GPU unless MOE8_SM90_GEMM=0, else mma.sync (gemm.cu).
   */
  get groupedGemmKernel(): "sm90-wgmma" | "mma.sync" {
    return this.cx.sm90Gemm ? "sm90-wgmma" : "mma.sync";
  }
  /**
   * Which dense FP8 GEMMs run on the sm90 kernels instead of cuBLASLt (MOE8_SM90_DENSE; settable
   * so that `bench gemm` and the tests can run both paths on one backend).
   */
  get sm90Dense(): Sm90DenseMode {
    return this.cx.sm90Dense;
  }
  set sm90Dense(mode: Sm90DenseMode) {
    this.cx.sm90Dense = mode;
  }
  /** The tensor-core kernels (MOE8_TENSOR_CORES=0: the simple reference kernels). */
  get useTensorCores(): boolean {
    return this.cx.useTensorCores;
  }

  /** Peak bytes of device memory held by tensors since the start (or `resetPeakMemory()`). */
  peakMemory(): number {
    return this.cx.n.cudaMemStats().peak;
  }

  resetPeakMemory(): void {
    this.cx.n.cudaResetPeak();
  }

  memoryStats() {
    return this.cx.n.cudaMemStats();
  }

  /** Waits for all enqueued work (benchmarks; ops never need it). */
  synchronize(): void {
    this.cx.n.cudaSynchronize();
  }

  /**
   * GPU time of every kernel `run` launches (CUDA events around each launch; the run itself is not
   * synchronised, so the host issues work as it does in training). `busyMs` is the sum of kernel
   * times, `spanMs` the GPU time from the first launch to the end of the last: busy / span is how
   * much of the step the GPU computes, the rest it waits for the host. `hostMs` is the host's time
   * from the start to its last kernel launch (before the final read waits for the GPU): above
   * `busyMs`, the step is bound by the host. The events add a few microseconds of host time per launch.
   */
  async timeKernels(run: () => Promise<unknown>) {
    const n = this.cx.n;
    n.cudaSynchronize();
    n.cudaKernelTiming(true);
    this.cx.timingLaunches = true;
    try {
      const t0 = performance.now();
      await run();
      const issuedMs = performance.now() - t0;
      const hostMs = this.cx.lastLaunchMs - t0;
      const { kernels, spanMs } = n.cudaKernelTimes();
      const wallMs = performance.now() - t0;
      kernels.sort((a, b) => b.ms - a.ms);
      const busyMs = kernels.reduce((s, k) => s + k.ms, 0);
      return { wallMs, issuedMs, hostMs, spanMs, busyMs, kernels };
    } finally {
      n.cudaKernelTiming(false);
      this.cx.timingLaunches = false;
    }
  }

  /**
   * GPU time of every kernel of the work `record` enqueues, recorded as a CUDA graph and replayed
   * `replays` times: each launch is bracketed by events the graph holds (timer.rs, graph mode), so
   * these are the times of the replayed work, launched back to back as training replays its step,
   * where timeKernels times an uncaptured run whose launches the host issues one by one. Per kernel,
   * the mean over the replays of its time and launches a replay; `spanMs`, the slowest replay's first
   * start to last end. The events cost a little in the replay too (two event nodes a launch). The
   * graph is freed before the timing ends (its events go with it).
   */
  async timeReplayedKernels<T>(record: () => T, replays = 3): Promise<ReplayedKernelTimes> {
    const n = this.cx.n;
    if (!(replays >= 1)) throw new Error(`timeReplayedKernels: ${replays} replays`);
    n.cudaSynchronize();
    n.cudaKernelTiming(true, true);
    try {
      const g = this.captureGraph(record);
      try {
        const sums = new Map<string, { ms: number; launches: number }>();
        let spanMs = 0;
        for (let i = 0; i < replays; i++) {
          g.replay();
          const times = n.cudaKernelTimes(true);
          spanMs = Math.max(spanMs, times.spanMs);
          for (const k of times.kernels) {
            const s = sums.get(k.name) ?? { ms: 0, launches: 0 };
            s.ms += k.ms;
            s.launches += k.launches;
            sums.set(k.name, s);
          }
        }
        const kernels = [...sums]
          .map(([name, s]) => ({ name, ms: s.ms / replays, launches: Math.round(s.launches / replays) }))
          .sort((a, b) => b.ms - a.ms);
        const busyMs = kernels.reduce((s, k) => s + k.ms, 0);
        return { replays, nodes: g.nodes, spanMs, busyMs, kernels };
      } finally {
        g.dispose();
      }
    } finally {
      n.cudaKernelTiming(false);
    }
  }

  /**
   * Records the work `fn` enqueues as a CUDA graph (graph.rs): nothing runs while it records, and
   * each `replay()` then enqueues all of it as one launch. The blocks the recorded work uses belong
   * to the graph until `dispose()` (the allocator lends its free ones to other work between replays;
   * `borrowed()` says how many are out). Reads, uploads and writes inside `fn` are refused: they would
   * synchronise or copy from host memory the replay cannot see.
   */
  captureGraph<T>(fn: () => T): CapturedGraph<T> {
    const n = this.cx.n;
    if (this.cx.timingLaunches) throw new Error("captureGraph: kernel timing is on (profile uncaptured)");
    n.cudaCaptureBegin();
    this.capturing = true;
    let result: T;
    try {
      result = fn();
    } catch (e) {
      this.capturing = false;
      n.cudaCaptureAbort();
      throw e;
    }
    this.capturing = false;
    const outputs = collectTensors(result);
    let g: ReturnType<typeof n.cudaCaptureEnd>;
    try {
      g = n.cudaCaptureEnd();
    } catch (e) {
      for (const t of outputs) this.release(t);
      throw e;
    }
    let disposed = false;
    return {
      result,
      nodes: g.nodes,
      borrowed: () => (disposed ? 0 : g.borrowed),
      replay: () => g.launch(),
      dispose: () => {
        if (disposed) return;
        disposed = true;
        g.free();
        for (const t of outputs) this.release(t);
      },
    };
  }

  /** True while captureGraph records (host copies would not be part of the graph). */
  private capturing = false;

  private refuseWhileCapturing(op: string): void {
    if (this.capturing)
      throw new Error(`${op} while a CUDA graph is recording: the step must not copy to or from the host`);
  }

  // --- storage ---------------------------------------------------------------------------------
  protected override freeStorage(t: Tensor): void {
    (t.storage as DeviceBuffer | null)?.free();
  }

  override upload(data: HostArray, shape: readonly number[], dtype: DType = "f32"): Tensor {
    this.refuseWhileCapturing("upload");
    if (data.length !== numel(shape)) throw new Error(`data of ${data.length} elements for shape [${shape}]`);
    const want = hostArray(dtype, 0);
    if (data.constructor !== want.constructor)
      throw new Error(
        `upload: ${data.constructor.name} for a ${dtype} tensor (want ${want.constructor.name})`,
      );
    const t = this.cx.make(shape, dtype);
    this.cx.n.cudaHtod(this.cx.buf(t), 0, u8view(data));
    return t;
  }

  override zeros(shape: readonly number[], dtype: DType = "f32"): Tensor {
    const t = this.cx.make(shape, dtype);
    this.cx.n.cudaMemset8(this.cx.buf(t), 0, 0, t.size * BYTES_PER_ELEMENT[dtype]);
    return t;
  }

  override async read(t: Tensor): Promise<HostArray> {
    this.refuseWhileCapturing("read");
    const seg = this.cx.segScales.get(t);
    let n = t.size;
    if (seg) {
      const off = (await this.read(seg.segments)) as Int32Array;
      n = 0;
      for (let e = 0; e + 1 < off.length; e++) n += cdiv(off[e + 1] - off[e], 128) * seg.cols;
    }
    const out = hostArray(t.dtype, n);
    if (this.cx.kMajor.has(t)) {
      const rowMajor = quant.rowMajorBuffer(this.cx, t);
      this.cx.n.cudaDtoh(rowMajor, 0, u8view(out));
      rowMajor.free();
    } else {
      this.cx.n.cudaDtoh(this.cx.buf(t), 0, u8view(out));
    }
    return out;
  }

  override write(t: Tensor, data: HostArray): void {
    this.refuseWhileCapturing("write");
    const want = hostArray(t.dtype, 0);
    if (t.size !== data.length || data.constructor !== want.constructor)
      throw new Error(`write: ${data.constructor.name}(${data.length}) into ${t}`);
    this.cx.n.cudaHtod(this.cx.buf(t), 0, u8view(data));
  }

  override rows(t: Tensor, start: number, count: number): Tensor {
    return ew.rows(this.cx, t, start, count);
  }

  override setRows(dst: Tensor, start: number, src: Tensor): void {
    ew.setRows(this.cx, dst, start, src);
  }

  override toWords(t: Tensor): Words {
    return ew.toWords(this.cx, t);
  }

  override fromWords(words: Tensor, scales: Tensor | null, kind: WordsKind): Tensor {
    return ew.fromWords(this.cx, words, scales, kind);
  }

  // --- elementwise -----------------------------------------------------------------------------
  add(a: Tensor, b: Tensor): Tensor {
    return ew.add(this.cx, a, b);
  }

  addInto(dst: Tensor, src: Tensor, alpha = 1): void {
    ew.addInto(this.cx, dst, src, alpha);
  }

  scale(a: Tensor, s: number): Tensor {
    return ew.scale(this.cx, a, s);
  }

  fill(t: Tensor, value: number): void {
    ew.fill(this.cx, t, value);
  }

  copy(t: Tensor): Tensor {
    return ew.copy(this.cx, t);
  }

  cast(t: Tensor, dtype: "f32" | "bf16"): Tensor {
    return ew.cast(this.cx, t, dtype);
  }

  sum(t: Tensor): Tensor {
    return ew.sum(this.cx, t);
  }

  // --- quantisation ----------------------------------------------------------------------------
  quantize(x: Tensor, opts: QuantizeOptions): Tensor {
    return quant.quantize(this.cx, x, opts);
  }

  requantize(q: Tensor, opts: QuantizeOptions): Tensor {
    return quant.requantize(this.cx, q, opts);
  }

  fp8Flow(x: Tensor, q: Tensor): Tensor {
    return quant.fp8Flow(this.cx, x, q);
  }

  dequantize(q: Tensor): Tensor {
    return quant.dequantize(this.cx, q);
  }

  // --- GEMMs -----------------------------------------------------------------------------------
  matmul(a: Tensor, b: Tensor, o: MatmulOptions): Tensor {
    return gemm.matmul(this.cx, a, b, o);
  }

  groupedMatmul(a: Tensor, b: Tensor, offsets: Tensor, o: GroupedMatmulOptions): Tensor {
    return gemm.groupedMatmul(this.cx, a, b, offsets, o);
  }

  // --- dense layers ----------------------------------------------------------------------------
  rmsnorm(x: Tensor, w: Tensor, eps: number) {
    return nn.rmsnorm(this.cx, x, w, eps);
  }

  rmsnormBackward(dy: Tensor, x: Tensor, w: Tensor, rstd: Tensor, accumulate?: RmsnormAccumulate) {
    return nn.rmsnormBackward(this.cx, dy, x, w, rstd, accumulate);
  }

  rope(x: Tensor, o: RopeOptions): Tensor {
    return nn.rope(this.cx, x, o);
  }

  headSlice(x: Tensor, o: HeadSliceOptions): Tensor {
    return nn.headSlice(this.cx, x, o);
  }

  headScatterAdd(dst: Tensor, src: Tensor, o: HeadSliceOptions): void {
    nn.headScatterAdd(this.cx, dst, src, o);
  }

  headConcat(
    a: Tensor,
    b: Tensor,
    heads: number,
    bHeads: number,
    storeBf16 = false,
    aPart?: HeadPart,
  ): Tensor {
    return nn.headConcat(this.cx, a, b, heads, bHeads, storeBf16, aPart);
  }

  swiglu(gu: Tensor): Tensor {
    return nn.swiglu(this.cx, gu);
  }

  swigluBackward(dh: Tensor, gu: Tensor): Tensor {
    return nn.swigluBackward(this.cx, dh, gu);
  }

  embedding(w: Tensor, ids: Tensor): Tensor {
    return nn.embedding(this.cx, w, ids);
  }

  embeddingBackward(dw: Tensor, dy: Tensor, ids: Tensor): void {
    nn.embeddingBackward(this.cx, dw, dy, ids);
  }

  // --- attention -------------------------------------------------------------------------------
  attention(q: Tensor, k: Tensor, v: Tensor, o: AttentionOptions) {
    return attn.attention(this.cx, q, k, v, o);
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
    return attn.attentionBackward(this.cx, dO, q, k, v, out, lse, o);
  }

  // --- mixture of experts ----------------------------------------------------------------------
  addUniformNoise(x: Tensor, o: NoiseOptions): void {
    ew.addUniformNoise(this.cx, x, o);
  }

  router(logits: Tensor, bias: Tensor, k: number, scaling: number): RouterResult {
    return moe.router(this.cx, logits, bias, k, scaling);
  }

  routerBackward(
    dweights: Tensor,
    scores: Tensor,
    topIdx: Tensor,
    scaling: number,
    dscores?: Tensor,
  ): Tensor {
    return moe.routerBackward(this.cx, dweights, scores, topIdx, scaling, dscores);
  }

  balanceLoss(scores: Tensor, topIdx: Tensor, o: { batch: number; seq: number; alpha: number }) {
    return moe.balanceLoss(this.cx, scores, topIdx, o);
  }

  moePermute(x: Tensor, topIdx: Tensor, experts: number): PermuteResult {
    return moe.moePermute(this.cx, x, topIdx, experts);
  }

  moePermuteBackward(dxs: Tensor, slot: Tensor, tokens: number): Tensor {
    return moe.moePermuteBackward(this.cx, dxs, slot, tokens);
  }

  moeCombine(ys: Tensor, slot: Tensor, weights: Tensor, add: readonly Tensor[] = []): Tensor {
    const bad = combineAddError(add, weights.rows, ys.cols);
    if (bad) throw new Error(bad);
    return moe.moeCombine(this.cx, ys, slot, weights, add);
  }

  moeCombineBackward(dy: Tensor, ys: Tensor, slot: Tensor, weights: Tensor) {
    return moe.moeCombineBackward(this.cx, dy, ys, slot, weights);
  }

  ropeQuantized(x: Tensor, opts: RopeOptions, q: GradQuant) {
    return quant.ropeQuantized(this.cx, x, opts, q) ?? quantizedVia(this, this.rope(x, opts), q);
  }

  headConcatQuantized(
    a: Tensor,
    b: Tensor,
    heads: number,
    bHeads: number,
    aPart: HeadPart | undefined,
    q: GradQuant,
  ) {
    return (
      quant.headConcatQuantized(this.cx, a, b, heads, bHeads, aPart, q) ??
      quantizedVia(this, this.headConcat(a, b, heads, bHeads, false, aPart), q)
    );
  }

  rmsnormQuantized(x: Tensor, w: Tensor, eps: number, q: QuantizeOptions) {
    return quant.rmsnormQuantized(this.cx, x, w, eps, q) ?? rmsnormQuantizedVia(this, x, w, eps, q);
  }

  swigluQuantized(gu: Tensor, q: QuantizeOptions) {
    return quant.swigluQuantized(this.cx, gu, q) ?? swigluQuantizedVia(this, gu, q);
  }

  swigluBackwardQuantized(dh: Tensor, gu: Tensor, q: GradQuant) {
    return quant.swigluGradQuantized(this.cx, dh, gu, q) ?? swigluBackwardQuantizedVia(this, dh, gu, q);
  }

  moeCombineBackwardQuantized(dy: Tensor, ys: Tensor, slot: Tensor, weights: Tensor, q: GradQuant) {
    return (
      quant.combineGradQuantized(this.cx, dy, ys, slot, weights, q) ??
      combineBackwardQuantizedVia(this, dy, ys, slot, weights, q)
    );
  }

  biasUpdate(bias: Tensor, offsets: Tensor, opts: BiasUpdateOptions): void {
    moe.biasUpdate(this.cx, bias, offsets, opts);
  }

  // --- loss and optimiser ----------------------------------------------------------------------
  crossEntropy(logits: Tensor, targets: Tensor, gradScale: number, storeBf16 = false) {
    return optim.crossEntropy(this.cx, logits, targets, gradScale, storeBf16);
  }

  clipScale(grads: Tensor[], maxNorm: number) {
    return optim.clipScale(this.cx, grads, maxNorm);
  }

  prepareClipScale(grads: Tensor[]): PreparedClipScale {
    return optim.prepareClipScale(this.cx, grads);
  }

  prepareAdamW(slots: AdamWSlot[]): PreparedAdamW {
    return optim.prepareAdamW(this.cx, slots);
  }
}

/** The tensors in a captured function's result (a tensor, or arrays and plain objects of them). */
function collectTensors(v: unknown, out: Tensor[] = []): Tensor[] {
  if (v instanceof Tensor) out.push(v);
  else if (Array.isArray(v)) for (const x of v) collectTensors(x, out);
  else if (v && typeof v === "object" && Object.getPrototypeOf(v) === Object.prototype)
    for (const x of Object.values(v)) collectTensors(x, out);
  return out;
}
