// The `cuda` backend: tensors live in device memory (a `DeviceBuffer` from the addon's caching
// allocator, freed explicitly when the tensor is released, never by the garbage collector) and
// every op is a kernel (src/cuda/kernels/*.cu, compiled at run time with NVRTC) or a cuBLASLt GEMM
// enqueued on one CUDA stream. Nothing here waits for the device except `read()` (and `item()`,
// which reads): ops return tensors immediately (RUNTIME.md rule 1), routing stays on the device
// (rule 2) and every reduction has a fixed order (rule 7). The semantics are those of the `ts`
// reference backend, which the shared op suite checks.
//
// Device layouts are the Tensor's logical layouts, with one exception: the scales of a column-tile
// quantisation with expert `segments` have a count that depends on the (device-resident) segment
// sizes, so the scales tensor is allocated with the upper bound (ceil(rows/128) + E) * cols; its
// first entries hold the reference's compact layout, and `read()` returns exactly those.
import {
  type AdamWOptions,
  type AttentionOptions,
  type Backend,
  BYTES_PER_ELEMENT,
  batchDims,
  type DType,
  type Fp8Format,
  type GroupedMatmulOptions,
  gemmDims,
  type HeadSliceOptions,
  type HostArray,
  HostLifetimes,
  hostArray,
  isFp8,
  type MatmulOptions,
  numel,
  type PermuteResult,
  type QuantGroup,
  type QuantInfo,
  type QuantizeOptions,
  type RopeOptions,
  type RouterResult,
  requantizeViaF32,
  rowSpan,
  sameShape,
  scaleCount,
  Tensor,
} from "@moe8/tensor";
import type { DeviceBuffer } from "../native.d.cts";
import { loadNative, type NativeAddon } from "./index.ts";

/** Device memory a kernel reads: a tensor's own, or a scratch copy that free() gives back. */
type Operand = { ptr: number; free(): void };

const GROUP: Record<QuantGroup, number> = { tile: 0, block: 1, "column-tile": 2, row: 3, tensor: 4 };
const FMT: Record<Fp8Format, number> = { e4m3: 0, e5m2: 1 };
const cdiv = (a: number, b: number) => Math.ceil(a / b);

/** Kernel arguments: one 8-byte little-endian slot per parameter, as cuLaunchKernel reads them. */
class Args {
  private readonly buf = new ArrayBuffer(8 * 64);
  private readonly view = new DataView(this.buf);
  private n = 0;
  reset(): this {
    this.n = 0;
    return this;
  }
  private slot(): number {
    const o = this.n * 8;
    this.n++;
    this.view.setBigUint64(o, 0n, true);
    return o;
  }
  /** A device address or a 64-bit integer (exact below 2^53). */
  u64(x: number): this {
    const o = this.slot();
    this.view.setUint32(o, x % 4294967296, true);
    this.view.setUint32(o + 4, Math.floor(x / 4294967296), true);
    return this;
  }
  i32(x: number): this {
    this.view.setInt32(this.slot(), x, true);
    return this;
  }
  f32(x: number): this {
    this.view.setFloat32(this.slot(), x, true);
    return this;
  }
  f64(x: number): this {
    this.view.setFloat64(this.slot(), x, true);
    return this;
  }
  bytes(): Uint8Array {
    return new Uint8Array(this.buf, 0, this.n * 8);
  }
}

function usageError(msg: string): Error {
  const e = new Error(msg);
  e.name = "UsageError";
  return e;
}

function u8view(a: HostArray): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/**
 * The cuBLASLt FP8 GEMM an operand pair makes, or null (the tiled kernel): Fprop = 1x128 tiles x
 * 128x128 blocks as [M,K] x [N,K]; Dgrad = the same scalings as [M,K] x [K,N]; Wgrad = 128x1 column
 * tiles along the tokens as [K,M] x [K,N] (whole matrices, not expert segments); tensor-wise.
 */
function ltFp8Form(qa: QuantInfo, qb: QuantInfo, transA: boolean, transB: boolean) {
  const whole = !qa.segments && !qb.segments;
  if (!transA && transB && qa.group === "tile" && qb.group === "block") return "fprop";
  if (!transA && transB && qa.group === "tensor" && qb.group === "tensor") return "tensor";
  if (!transA && !transB && qa.group === "tile" && qb.group === "block") return "dgrad";
  if (transA && !transB && qa.group === "column-tile" && qb.group === "column-tile" && whole) return "wgrad";
  return null;
}

/** Why an FP8 operand cannot be used as stored (the reference's rule: no scale change inside a K chunk). */
function checkFp8Operand(t: Tensor, what: string, kAlongCols: boolean): void {
  if (!isFp8(t.dtype) || !t.quant)
    throw new Error(`matmul fp8: ${what} must be a quantised FP8 tensor, got ${t}`);
  const g = t.quant.group;
  const ok = kAlongCols ? g !== "column-tile" : g === "column-tile" || g === "block" || g === "tensor";
  if (!ok) {
    const stored = kAlongCols ? "with K along its columns" : "with K along its rows";
    const allowed = kAlongCols ? "tile, block, row, tensor" : "column-tile, block, tensor";
    throw new Error(
      `scaledMatmul: operand ${what} stored ${stored} cannot use group "${g}": its scale would vary inside a K chunk (allowed: ${allowed})`,
    );
  }
}

/** Dynamic shared memory of gemm16.cu's kernels: 3 stages x 2 operands x 128 x 72 BF16. */
const GEMM16_SMEM = 3 * 2 * 128 * 72 * 2;

/** Head shapes (dqk_dv) with tensor-core attention kernels in flash.cu (FLASH_SHAPE lines). */
const FLASH_SHAPES = new Set(["32_32", "48_32", "64_64", "96_64", "128_128"]);

export class CudaBackend extends HostLifetimes implements Backend {
  readonly name = "cuda" as const;
  private readonly n: NativeAddon;
  private readonly ids = new Map<string, number>();
  private readonly args = new Args();
  /** Scales of segment-quantised tensors: read() returns their compact prefix. */
  private readonly segScales = new WeakMap<Tensor, { segments: Tensor; cols: number }>();
  /** GEMM configurations cuBLASLt refused (they use the tiled kernel from then on). */
  private readonly ltRefused = new Set<string>();
  readonly useLt = process.env.MOE8_CUBLASLT !== "0";
  readonly useLtFp8 = process.env.MOE8_CUBLASLT_FP8 !== "0";
  /**
   * cuBLASLt's block-scaled FP8 (VEC128 x BLK128x128) for Fprop; MOE8_CUBLASLT_FP8_BLOCK=0 falls back to
   * the tiled kernel. Verified on the H200 against it (test/lt-fp8-diag.ts: relative error 3-4e-4,
   * the same as per-tensor scaling) once the weight-scale rows are padded to a multiple of 4.
   */
  readonly useLtFp8Block = process.env.MOE8_CUBLASLT_FP8_BLOCK !== "0";
  /** Tensor-core kernels (flash.cu, gemm_fp8_mma); MOE8_TENSOR_CORES=0 keeps the simple reference kernels. */
  readonly useTensorCores = process.env.MOE8_TENSOR_CORES !== "0";

  constructor() {
    super();
    const s = loadNative();
    if (!s.addon)
      throw usageError(`backend "cuda" is not available: the native addon is not loaded (${s.reason})`);
    if (typeof s.addon.cudaInfo !== "function")
      throw usageError('backend "cuda" is not available: this build of @moe8/kernels has no CUDA support');
    const info = s.addon.cudaInfo();
    if (!info.available) throw usageError(`backend "cuda" is not available: ${info.reason}`);
    this.n = s.addon;
  }

  /** Peak bytes of device memory held by tensors since the start (or `resetPeakMemory()`). */
  peakMemory(): number {
    return this.n.cudaMemStats().peak;
  }

  resetPeakMemory(): void {
    this.n.cudaResetPeak();
  }

  memoryStats() {
    return this.n.cudaMemStats();
  }

  /** Waits for all enqueued work (benchmarks; ops never need it). */
  synchronize(): void {
    this.n.cudaSynchronize();
  }

  /**
   * GPU time of every kernel `run` launches (CUDA events around each launch; the run itself is not
   * synchronised, so the host issues work as it does in training). `busyMs` is the sum of kernel
   * times, `spanMs` the GPU time from the first launch to the end of the last: busy / span is how
   * much of the step the GPU computes, the rest it waits for the host. The events add a few
   * microseconds of host time per launch.
   */
  async timeKernels(run: () => Promise<unknown>) {
    this.n.cudaSynchronize();
    this.n.cudaKernelTiming(true);
    try {
      const t0 = performance.now();
      await run();
      const issuedMs = performance.now() - t0;
      const { kernels, spanMs } = this.n.cudaKernelTimes();
      const wallMs = performance.now() - t0;
      kernels.sort((a, b) => b.ms - a.ms);
      const busyMs = kernels.reduce((s, k) => s + k.ms, 0);
      return { wallMs, issuedMs, spanMs, busyMs, kernels };
    } finally {
      this.n.cudaKernelTiming(false);
    }
  }

  // --- storage ---------------------------------------------------------------------------------
  private make(shape: readonly number[], dtype: DType, quant: Tensor["quant"] = null): Tensor {
    const buf = new this.n.DeviceBuffer(numel(shape) * BYTES_PER_ELEMENT[dtype]);
    return this.register(new Tensor(this as unknown as Backend, shape, dtype, buf, quant));
  }

  protected override freeStorage(t: Tensor): void {
    (t.storage as DeviceBuffer | null)?.free();
  }

  private buf(t: Tensor): DeviceBuffer {
    if (t.disposed || t.storage == null) throw new Error(`use of a disposed tensor ${t}`);
    return t.storage as DeviceBuffer;
  }

  /** The device address of a tensor's data. */
  private p(t: Tensor): number {
    return this.buf(t).ptr;
  }

  private f32p(t: Tensor, op: string): number {
    this.buf(t); // a disposed tensor is reported as such, whatever its dtype
    if (t.dtype !== "f32") throw new Error(`${op}: expected an f32 tensor, got ${t}`);
    return this.p(t);
  }

  private i32p(t: Tensor, op: string): number {
    this.buf(t);
    if (t.dtype !== "i32") throw new Error(`${op}: expected an i32 tensor, got ${t}`);
    return this.p(t);
  }

  /** Scratch device memory for one op; freed (stream-ordered) right after the op is enqueued. */
  private scratch(bytes: number): DeviceBuffer {
    return new this.n.DeviceBuffer(Math.max(bytes, 8));
  }

  override upload(data: HostArray, shape: readonly number[], dtype: DType = "f32"): Tensor {
    if (data.length !== numel(shape)) throw new Error(`data of ${data.length} elements for shape [${shape}]`);
    const want = hostArray(dtype, 0);
    if (data.constructor !== want.constructor)
      throw new Error(
        `upload: ${data.constructor.name} for a ${dtype} tensor (want ${want.constructor.name})`,
      );
    const t = this.make(shape, dtype);
    this.n.cudaHtod(this.buf(t), 0, u8view(data));
    return t;
  }

  override zeros(shape: readonly number[], dtype: DType = "f32"): Tensor {
    const t = this.make(shape, dtype);
    this.n.cudaMemset8(this.buf(t), 0, 0, t.size * BYTES_PER_ELEMENT[dtype]);
    return t;
  }

  override async read(t: Tensor): Promise<HostArray> {
    const seg = this.segScales.get(t);
    let n = t.size;
    if (seg) {
      const off = (await this.read(seg.segments)) as Int32Array;
      n = 0;
      for (let e = 0; e + 1 < off.length; e++) n += cdiv(off[e + 1] - off[e], 128) * seg.cols;
    }
    const out = hostArray(t.dtype, n);
    this.n.cudaDtoh(this.buf(t), 0, u8view(out));
    return out;
  }

  override write(t: Tensor, data: HostArray): void {
    const want = hostArray(t.dtype, 0);
    if (t.size !== data.length || data.constructor !== want.constructor)
      throw new Error(`write: ${data.constructor.name}(${data.length}) into ${t}`);
    this.n.cudaHtod(this.buf(t), 0, u8view(data));
  }

  // --- launching -------------------------------------------------------------------------------
  private kernel(module: string, name: string): number {
    const key = `${module}.${name}`;
    let id = this.ids.get(key);
    if (id === undefined) {
      id = this.n.cudaKernel(module, name);
      this.ids.set(key, id);
    }
    return id;
  }

  private launch(
    module: string,
    name: string,
    grid: [number, number?, number?],
    block: number,
    fill: (a: Args) => void,
    shared = 0,
  ): void {
    const id = this.kernel(module, name);
    fill(this.args.reset());
    const [gx, gy = 1, gz = 1] = grid;
    this.n.cudaLaunch(id, gx, gy, gz, block, 1, 1, shared, this.args.bytes());
  }

  /** Blocks for a grid-stride loop over n elements. */
  private g1(n: number, block = 256): [number] {
    return [Math.max(1, Math.min(cdiv(n, block), 16384))];
  }

  /** Grid for one block per row (rows beyond 65535 go to the second dimension). */
  private rowsGrid(R: number): [number, number] {
    return [Math.min(R, 65535), cdiv(R, 65535)];
  }

  // --- elementwise -----------------------------------------------------------------------------
  add(a: Tensor, b: Tensor): Tensor {
    sameShape(a, b, "add");
    const out = this.make(a.shape, "f32");
    this.launch("elementwise", "add_f32", this.g1(a.size), 256, (x) =>
      x.u64(this.f32p(a, "add")).u64(this.f32p(b, "add")).u64(this.p(out)).u64(a.size),
    );
    return out;
  }

  addInto(dst: Tensor, src: Tensor, alpha = 1): void {
    sameShape(dst, src, "addInto");
    this.launch("elementwise", "add_into_f32", this.g1(dst.size), 256, (x) =>
      x.u64(this.f32p(dst, "addInto")).u64(this.f32p(src, "addInto")).f64(alpha).u64(dst.size),
    );
  }

  scale(a: Tensor, s: number): Tensor {
    const out = this.make(a.shape, "f32");
    this.launch("elementwise", "scale_f32", this.g1(a.size), 256, (x) =>
      x.u64(this.f32p(a, "scale")).u64(this.p(out)).f64(s).u64(a.size),
    );
    return out;
  }

  fill(t: Tensor, value: number): void {
    const b = this.buf(t);
    if (t.dtype === "f32") {
      const v = new DataView(new ArrayBuffer(4));
      v.setFloat32(0, value, true);
      this.n.cudaMemset32(b, 0, v.getUint32(0, true), t.size);
    } else if (t.dtype === "i32") {
      this.n.cudaMemset32(b, 0, value >>> 0, t.size);
    } else if (t.dtype === "e4m3" || t.dtype === "e5m2") {
      this.n.cudaMemset8(b, 0, value & 0xff, t.size);
    } else {
      // bf16 storage holds raw bits, as a Uint16Array fill would set them.
      const h = value & 0xffff;
      const host = new Uint16Array(t.size).fill(h);
      this.n.cudaHtod(b, 0, u8view(host));
    }
  }

  copy(t: Tensor): Tensor {
    const out = this.make(t.shape, t.dtype);
    this.n.cudaDtod(this.buf(out), 0, this.buf(t), 0, t.size * BYTES_PER_ELEMENT[t.dtype]);
    return out;
  }

  override rows(t: Tensor, start: number, count: number): Tensor {
    const w = rowSpan(t, start, count, "rows");
    const out = this.make([count, ...t.shape.slice(1)], t.dtype);
    const e = BYTES_PER_ELEMENT[t.dtype];
    if (count > 0 && w > 0) this.n.cudaDtod(this.buf(out), 0, this.buf(t), start * w * e, count * w * e);
    return out;
  }

  override setRows(dst: Tensor, start: number, src: Tensor): void {
    const w = rowSpan(dst, start, src.shape[0] ?? 0, "setRows");
    if (src.dtype !== dst.dtype || src.size !== (src.shape[0] ?? 0) * w)
      throw new Error(`setRows: ${src} does not fit rows of ${dst}`);
    const e = BYTES_PER_ELEMENT[dst.dtype];
    if (src.size > 0) this.n.cudaDtod(this.buf(dst), start * w * e, this.buf(src), 0, src.size * e);
  }

  cast(t: Tensor, dtype: "f32" | "bf16"): Tensor {
    if (t.dtype === dtype) return this.copy(t);
    if (t.dtype === "f32" && dtype === "bf16") {
      const out = this.make(t.shape, "bf16");
      this.toBf16(this.p(t), this.p(out), t.size);
      return out;
    }
    if (t.dtype === "bf16" && dtype === "f32") {
      const out = this.make(t.shape, "f32");
      this.launch("elementwise", "bf16_to_f32", this.g1(t.size), 256, (x) =>
        x.u64(this.p(t)).u64(this.p(out)).u64(t.size),
      );
      return out;
    }
    throw new Error(`cast: ${t.dtype} to ${dtype} is not supported (use quantize/dequantize for FP8)`);
  }

  /** n f32 values at x rounded to BF16 at out (four per thread when both are aligned for it). */
  private toBf16(x: number, out: number, n: number): void {
    const x4 = x % 16 === 0 && out % 8 === 0;
    this.launch(
      "elementwise",
      x4 ? "f32_to_bf16_x4" : "f32_to_bf16",
      this.g1(x4 ? cdiv(n, 4) : n),
      256,
      (a) => a.u64(x).u64(out).u64(n),
    );
  }

  /**
   * BF16 values of an f32 or bf16 tensor for a kernel that reads BF16: a bf16 tensor itself, or a
   * copy in scratch memory. The caller calls free() once its kernels are enqueued.
   */
  private bf16Operand(t: Tensor, op: string): Operand {
    if (t.dtype === "bf16") return { ptr: this.p(t), free: () => {} };
    const buf = this.scratch(t.size * 2);
    this.toBf16(this.f32p(t, op), buf.ptr, t.size);
    return buf;
  }

  /** f32 values of an f32 tensor, or of a bf16 one (a copy in scratch), for the f32-reading fallbacks. */
  private f32Operand(t: Tensor, op: string): Operand {
    if (t.dtype !== "bf16") return { ptr: this.f32p(t, op), free: () => {} };
    const buf = this.scratch(t.size * 4);
    this.launch("elementwise", "bf16_to_f32", this.g1(t.size), 256, (x) =>
      x.u64(this.p(t)).u64(buf.ptr).u64(t.size),
    );
    return buf;
  }

  /** Checks a bf16-precision GEMM or attention input: f32, or bf16 (already rounded). */
  private lowpInput(t: Tensor, op: string): void {
    if (t.dtype !== "bf16") this.f32p(t, op);
    else this.buf(t);
  }

  sum(t: Tensor): Tensor {
    const n = t.size;
    const out = this.make([1], "f32");
    const parts = Math.max(1, Math.min(cdiv(n, 256 * 16), 1024));
    const chunk = Math.max(1, cdiv(n, parts));
    const tmp = this.scratch(parts * 8);
    this.launch("elementwise", "sum_partial", [parts], 256, (x) =>
      x.u64(this.f32p(t, "sum")).u64(tmp.ptr).u64(n).u64(chunk),
    );
    this.launch("elementwise", "sum_final", [1], 256, (x) => x.u64(tmp.ptr).i32(parts).u64(this.p(out)));
    tmp.free();
    return out;
  }

  // --- quantisation ----------------------------------------------------------------------------
  /** The FP8 tensor (codes and scales, zeroed where segments leave gaps) quantize(x, opts) fills. */
  private quantOutput(x: Tensor, opts: QuantizeOptions) {
    const { batch, rows, cols } = batchDims(x);
    const format: Fp8Format = opts.format ?? "e4m3";
    if (!(format in FMT)) throw new Error(`unknown FP8 format "${format}" (allowed: e4m3, e5m2)`);
    if (!(opts.group in GROUP)) throw new Error(`unknown quantisation group "${opts.group}"`);
    const fmt = FMT[format];
    const mode = opts.unit ? 2 : opts.pow2Scales ? 1 : 0;
    const eps = Math.fround(opts.eps ?? 1e-12);
    if (!opts.unit && !(eps > 0 && Number.isFinite(eps)))
      throw new Error(`quantize: eps must be a positive finite f32 (got ${opts.eps})`);
    const seg = opts.segments;
    let nScales: number;
    if (seg) {
      if (opts.group !== "column-tile" || batch !== 1)
        throw new Error("quantize: segments need a 2-D column-tile");
      const E = seg.size - 1;
      nScales = (cdiv(rows, 128) + E) * cols; // capacity: the exact count depends on device data
    } else {
      nScales = batch * scaleCount(opts.group, rows, cols);
    }
    const scales = this.make([nScales], "f32");
    const q = this.make(x.shape, format, { group: opts.group, format, scales, segments: seg });
    if (seg) {
      this.segScales.set(scales, { segments: seg, cols });
      this.n.cudaMemset8(this.buf(scales), 0, 0, nScales * 4);
      this.n.cudaMemset8(this.buf(q), 0, 0, q.size);
    }
    return { q, batch, rows, cols, fmt, mode, eps };
  }

  quantize(x: Tensor, opts: QuantizeOptions): Tensor {
    const xp = this.f32p(x, "quantize");
    const { q, batch, rows, cols, fmt, mode, eps } = this.quantOutput(x, opts);
    if (x.size === 0) return q;
    const scales = q.quant!.scales;
    const R = batch * rows;
    const sp = this.p(scales);
    const qp = this.p(q);
    switch (opts.group) {
      case "tile":
      case "row": {
        const gw = opts.group === "tile" ? 128 : cols;
        if (gw === 128) {
          const warps = cdiv(R * cdiv(cols, 128), 4); // TILES_PER_WARP in quant.cu
          this.launch("quant", "quant_tile128", [cdiv(warps, 8)], 256, (a) =>
            a.u64(xp).u64(qp).u64(sp).i32(R).i32(cols).i32(fmt).i32(mode).f32(eps),
          );
          break;
        }
        this.launch(
          "quant",
          "quant_rowgroups",
          [cdiv(cols, gw), Math.min(R, 65535), cdiv(R, 65535)],
          128,
          (a) => a.u64(xp).u64(qp).u64(sp).i32(R).i32(cols).i32(gw).i32(fmt).i32(mode).f32(eps),
        );
        break;
      }
      case "block":
        this.launch("quant", "quant_block", [cdiv(cols, 128), cdiv(rows, 128), batch], 256, (a) =>
          a.u64(xp).u64(qp).u64(sp).i32(rows).i32(cols).i32(fmt).i32(mode).f32(eps),
        );
        break;
      case "column-tile":
        this.colTiles(q, batch, "quant_coltile", (a) => a.u64(xp), { fmt, mode, eps });
        break;
      case "tensor": {
        const per = rows * cols;
        const amax = this.scratch(batch * 4);
        this.n.cudaMemset32(amax, 0, 0, batch);
        const gx = Math.max(1, Math.min(cdiv(per, 256), 1024));
        this.launch("quant", "quant_tensor_amax", [gx, batch], 256, (a) => a.u64(xp).u64(amax.ptr).u64(per));
        this.launch("quant", "quant_tensor_encode", [gx, batch], 256, (a) =>
          a.u64(xp).u64(qp).u64(amax.ptr).u64(sp).u64(per).i32(fmt).i32(mode).f32(eps),
        );
        amax.free();
        break;
      }
    }
    return q;
  }

  /**
   * Column tiles of q's source values (quant_coltile: an f32 matrix; requant_coltile: an FP8 one),
   * restarted at each matrix of the batch or each segment of q.quant.segments.
   */
  private colTiles(
    q: Tensor,
    batch: number,
    kernel: "quant_coltile" | "requant_coltile",
    source: (a: Args) => Args,
    o: { fmt: number; mode: number; eps: number },
  ): void {
    const { rows, cols } = batchDims(q);
    const seg = q.quant!.segments;
    const pieces = seg ? seg.size - 1 : batch;
    const segp = seg ? this.i32p(seg, "quantize segments") : 0;
    if (pieces === 0) return;
    // 64 columns of one 128-row group per block (CT_COLS in quant.cu).
    const grid: [number, number, number] = seg
      ? [cdiv(cols, 64), cdiv(batch * rows, 128) + pieces, 1]
      : [cdiv(cols, 64), cdiv(rows, 128), pieces];
    this.launch("quant", kernel, grid, 256, (a) =>
      source(a)
        .u64(this.p(q))
        .u64(this.p(q.quant!.scales))
        .u64(segp)
        .i32(pieces)
        .i32(rows)
        .i32(cols)
        .i32(o.fmt)
        .i32(o.mode)
        .f32(o.eps),
    );
  }

  /**
   * quantize(dequantize(q), opts) bit for bit. Column tiles of a 2-D FP8 matrix (the Wgrad operand
   * made from the forward's FP8 activation cache) take one kernel that never writes the f32 values.
   */
  requantize(q: Tensor, opts: QuantizeOptions): Tensor {
    if (!isFp8(q.dtype) || !q.quant) throw new Error(`requantize: ${q} is not an FP8 tensor`);
    const { batch } = batchDims(q);
    if (opts.group !== "column-tile" || batch !== 1 || q.quant.segments || q.size === 0)
      return requantizeViaF32(this, q, opts);
    const { q: out, fmt, mode, eps } = this.quantOutput(q, opts);
    const src = q.quant;
    this.colTiles(
      out,
      1,
      "requant_coltile",
      (a) => a.u64(this.p(q)).u64(this.p(src.scales)).i32(GROUP[src.group]).i32(FMT[src.format]),
      { fmt, mode, eps },
    );
    return out;
  }

  fp8Flow(x: Tensor, q: Tensor): Tensor {
    if (!isFp8(q.dtype) || !q.quant) throw new Error(`fp8Flow: ${q} is not an FP8 tensor`);
    const deq = this.dequantize(q);
    const out = this.zeros([2], "f32");
    const n = q.size;
    this.launch("quant", "fp8_flow", this.g1(n), 256, (a) =>
      a
        .u64(this.f32p(x, "fp8Flow"))
        .u64(this.p(q))
        .u64(this.p(deq))
        .u64(this.p(out))
        .i32(FMT[q.quant!.format])
        .u64(n),
    );
    this.release(deq);
    return out;
  }

  dequantize(q: Tensor): Tensor {
    if (!isFp8(q.dtype) || !q.quant) throw new Error(`dequantize: ${q} is not an FP8 tensor`);
    const { batch, rows, cols } = batchDims(q);
    const out = this.make(q.shape, "f32");
    const seg = q.quant.segments;
    this.launch("quant", "dequant_rows", [Math.max(1, Math.min(batch * rows, 65535))], 256, (a) =>
      a
        .u64(this.p(q))
        .u64(this.p(q.quant!.scales))
        .u64(this.p(out))
        .u64(seg ? this.p(seg) : 0)
        .i32(seg ? seg.size - 1 : 0)
        .i32(batch)
        .i32(rows)
        .i32(cols)
        .i32(GROUP[q.quant!.group])
        .i32(FMT[q.quant!.format]),
    );
    return out;
  }

  // --- GEMMs -----------------------------------------------------------------------------------
  /** Output rounding and accumulation after a cuBLASLt product written to `c`. */
  private finishLt(c: DeviceBuffer | Tensor, o: MatmulOptions, n: number): void {
    if (o.accumulate) {
      const cp = c instanceof Tensor ? this.p(c) : c.ptr;
      this.launch("elementwise", "acc_add_f32", this.g1(n), 256, (a) =>
        a
          .u64(this.p(o.accumulate!))
          .u64(cp)
          .i32(o.outBf16 ? 1 : 0)
          .u64(n),
      );
    } else if (o.outBf16) {
      const cp = this.p(c as Tensor);
      this.launch("elementwise", "round_bf16_f32", this.g1(n), 256, (a) => a.u64(cp).u64(cp).u64(n));
    }
  }

  /** Tries cuBLASLt; false when it has no kernel for the case (then remembered). */
  private tryLt(
    key: string,
    call: (c: number, accumulate: boolean) => void,
    out: Tensor,
    o: MatmulOptions,
    M: number,
    N: number,
  ): boolean {
    if (!this.useLt || this.ltRefused.has(key)) return false;
    // Accumulate with BF16 rounding of the product: the product goes to scratch first.
    const direct = !(o.accumulate && o.outBf16);
    const tmp = direct ? null : this.scratch(M * N * 4);
    try {
      call(direct ? this.p(out) : tmp!.ptr, direct && !!o.accumulate);
    } catch (e) {
      tmp?.free();
      const msg = e instanceof Error ? e.message : String(e);
      if (/NOT_SUPPORTED|INVALID_VALUE|no algorithm/.test(msg)) {
        this.ltRefused.add(key);
        return false;
      }
      throw e;
    }
    if (tmp) {
      this.finishLt(tmp, o, M * N);
      tmp.free();
    } else if (o.outBf16) {
      this.finishLt(out, o, M * N);
    }
    return true;
  }

  private output(M: number, N: number, o: MatmulOptions, shape: number[] = [M, N]): Tensor {
    if (o.accumulate) {
      if (o.accumulate.size !== M * N || o.accumulate.dtype !== "f32")
        throw new Error(`matmul: accumulate has shape [${o.accumulate.shape}], want [${shape}]`);
      return o.accumulate;
    }
    return this.make(shape, "f32");
  }

  matmul(a: Tensor, b: Tensor, o: MatmulOptions): Tensor {
    const { M, N, K } = gemmDims(a, b, o);
    const transA = !!o.transA;
    const transB = !!o.transB;
    if (o.precision === "fp8") {
      checkFp8Operand(a, "A", !transA);
      checkFp8Operand(b, "B", transB);
    } else if (o.precision === "bf16") {
      this.lowpInput(a, "matmul");
      this.lowpInput(b, "matmul");
    } else {
      this.f32p(a, "matmul");
      this.f32p(b, "matmul");
    }
    const out = this.output(M, N, o);
    if (M === 0 || N === 0) return out;
    if (K > 0 && this.matmulLt(a, b, out, M, N, K, o)) return out;
    this.gemmKernel(a, b, out, M, N, K, o, 0, null, 0, 0, 0);
    return out;
  }

  /** The cuBLASLt cases: f32, BF16 and FP8 Fprop (1x128 tiles x 128x128 blocks, or tensor-wise). */
  private matmulLt(
    a: Tensor,
    b: Tensor,
    out: Tensor,
    M: number,
    N: number,
    K: number,
    o: MatmulOptions,
  ): boolean {
    const transA = !!o.transA;
    const transB = !!o.transB;
    if (o.precision === "f32" || o.precision === "bf16") {
      const key = `${o.precision},${M},${N},${K},${transA},${transB}`;
      if (!this.useLt || this.ltRefused.has(key)) return false;
      let A = a;
      let B = b;
      const tmps: Tensor[] = [];
      if (o.precision === "bf16") {
        // cuBLASLt reads BF16: bf16 tensors as they are, f32 ones through a rounded copy.
        [A, B] = [a, b].map((t) => (t.dtype === "bf16" ? t : this.cast(t, "bf16")));
        tmps.push(...[A, B].filter((t) => t !== a && t !== b));
      }
      const t = o.precision === "bf16" ? "bf16" : "f32";
      const ok = this.tryLt(
        key,
        (c, acc) =>
          this.n.cudaGemmLt(
            this.p(A),
            t,
            transA,
            0,
            "none",
            this.p(B),
            t,
            transB,
            0,
            "none",
            c,
            M,
            N,
            K,
            acc,
          ),
        out,
        o,
        M,
        N,
      );
      for (const x of tmps) this.release(x);
      return ok;
    }
    if (!this.useLtFp8 || (o.promotion ?? 128) !== 128) return false;
    const qa = a.quant!;
    const qb = b.quant!;
    if (qa.format === "e5m2" && qb.format === "e5m2") return false;
    if (K % 128 !== 0 || M % 16 !== 0 || N % 16 !== 0) return false;
    const form = ltFp8Form(qa, qb, transA, transB);
    if (!form || (form !== "tensor" && !this.useLtFp8Block)) return false;
    const key = `fp8,${form},${qa.format},${qb.format},${M},${N},${K}`;
    if (this.ltRefused.has(key)) return false;
    // cuBLASLt takes FP8 only as TN: A [M,K] and B [N,K], both K-contiguous. Other layouts are
    // transposed into scratch first (exact: codes and scales move together).
    const tmps: DeviceBuffer[] = [];
    const scratch = (bytes: number) => {
      const t = this.scratch(bytes);
      tmps.push(t);
      return t.ptr;
    };
    let aPtr = this.p(a);
    let bPtr = this.p(b);
    let aScale = this.p(qa.scales);
    let bScale = this.p(qb.scales);
    if (form === "dgrad") bPtr = this.transposeCodes(bPtr, K, N, scratch(K * N));
    if (form === "wgrad") {
      // Column tiles along the tokens: codes [K, M] and [K, N] to [M, K] and [N, K]; their scales
      // [K/128][M] and [K/128][N] are already the layout cuBLASLt reads for VEC128.
      aPtr = this.transposeCodes(aPtr, K, M, scratch(M * K));
      bPtr = this.transposeCodes(bPtr, K, N, scratch(N * K));
    }
    if (form === "fprop" || form === "dgrad") {
      // cuBLASLt reads 128x128 weight scales [N/128][K/128] with each row padded to a multiple of 4
      // (unpadded, every block row after the first read the wrong scales on the H200).
      const nb = Math.ceil(N / 128);
      const kb = K / 128;
      if (form === "dgrad") {
        // Ours are [K/128][N/128] (the weight is stored [K, N]): transpose them first.
        const src = bScale;
        const dst = scratch(nb * kb * 4);
        this.launch("elementwise", "transpose_f32", this.g1(nb * kb), 256, (x) =>
          x.u64(src).u64(dst).i32(kb).i32(nb),
        );
        bScale = dst;
      }
      const ld = Math.ceil(kb / 4) * 4;
      if (ld !== kb) {
        const src = bScale;
        const dst = scratch(nb * ld * 4);
        this.launch("elementwise", "pad_rows_f32", this.g1(nb * ld), 256, (x) =>
          x.u64(src).u64(dst).i32(nb).i32(kb).i32(ld),
        );
        bScale = dst;
      }
      // cuBLASLt reads 1x128 activation scales as [K/128][M] (M contiguous): transpose ours.
      const src = aScale;
      const dst = scratch(M * kb * 4);
      this.launch("elementwise", "transpose_f32", this.g1(M * kb), 256, (x) =>
        x.u64(src).u64(dst).i32(M).i32(kb),
      );
      aScale = dst;
    }
    const mode =
      form === "tensor" ? ["scalar", "scalar"] : ["vec128", form === "wgrad" ? "vec128" : "blk128"];
    const ok = this.tryLt(
      key,
      (c, acc) =>
        this.n.cudaGemmLt(
          aPtr,
          qa.format,
          false,
          aScale,
          mode[0],
          bPtr,
          qb.format,
          true,
          bScale,
          mode[1],
          c,
          M,
          N,
          K,
          acc,
        ),
      out,
      o,
      M,
      N,
    );
    for (const t of tmps) t.free();
    return ok;
  }

  /** FP8 codes [rows, cols] -> [cols, rows] into dst (a scratch buffer); returns dst. */
  private transposeCodes(src: number, rows: number, cols: number, dst: number): number {
    this.launch("quant", "transpose_u8_tiled", [cdiv(cols, 32), cdiv(rows, 32), 1], 256, (x) =>
      x.u64(src).u64(dst).i32(rows).i32(cols),
    );
    return dst;
  }

  /** The tiled kernel (any layout, plain or grouped): gemm.cu. */
  private gemmKernel(
    a: Tensor,
    b: Tensor,
    out: Tensor,
    M: number,
    N: number,
    K: number,
    o: MatmulOptions,
    mode: 0 | 1 | 2,
    offsets: Tensor | null,
    E: number,
    bRows: number,
    bCols: number,
  ): void {
    const aKcols = o.transA ? 0 : 1;
    let bKcols = o.transB ? 1 : 0;
    // Tiles of C: mode 1 enumerates the row tiles of every expert (at most one partial each).
    const gridFor = (tile: number): [number, number, number] => [
      cdiv(N, tile),
      mode === 1 ? cdiv(M, tile) + E : cdiv(M, tile),
      mode === 2 ? E : 1,
    ];
    const grid = gridFor(64);
    const off = offsets ? this.i32p(offsets, "groupedMatmul offsets") : 0;
    // B's matrix shape per expert as the kernel reads it (swapped when B is transposed below).
    let [bR, bC] = [bRows, bCols];
    // The arguments every gemm.cu kernel ends with: C, sizes, expert segments, output mode.
    const tail = (x: Args) =>
      x
        .u64(this.p(out))
        .i32(M)
        .i32(N)
        .i32(K)
        .i32(mode)
        .u64(off)
        .i32(E)
        .i32(bR)
        .i32(bC)
        .i32(o.accumulate ? 1 : 0)
        .i32(o.outBf16 ? 1 : 0);
    if (o.precision === "fp8") {
      const qa = a.quant!;
      const qb = b.quant!;
      const promotion = o.promotion ?? 128;
      if (!(Number.isInteger(promotion) && promotion > 0))
        throw new Error(`scaledMatmul: promotion must be a positive integer (got ${promotion})`);
      const mma = this.useTensorCores && promotion === 128;
      let bPtr = this.p(b);
      let bScales = this.p(qb.scales);
      const tmps: DeviceBuffer[] = [];
      if (mma && mode === 1 && aKcols && !bKcols && qb.group === "block" && K % 16 === 0) {
        // Dgrad of the experts: transpose each expert's FP8 weight (codes and block scales, exact)
        // so that both operands are K-contiguous for the TN kernel.
        const kb = cdiv(bRows, 128);
        const nb = cdiv(bCols, 128);
        const codes = this.scratch(E * bRows * bCols);
        const scales = this.scratch(E * kb * nb * 4);
        tmps.push(codes, scales);
        const [src, ssrc] = [bPtr, bScales];
        this.launch("quant", "transpose_u8_tiled", [cdiv(bCols, 32), cdiv(bRows, 32), E], 256, (x) =>
          x.u64(src).u64(codes.ptr).i32(bRows).i32(bCols),
        );
        this.launch("elementwise", "transpose_f32_batched", this.g1(E * kb * nb), 256, (x) =>
          x.u64(ssrc).u64(scales.ptr).i32(kb).i32(nb).i32(E),
        );
        [bPtr, bScales, bKcols, bR, bC] = [codes.ptr, scales.ptr, 1, bCols, bRows];
      }
      // Both operands K-contiguous (Fprop, expert Dgrad), or both [K, rows] (Wgrad, tokens as K).
      const tn = aKcols && bKcols && K % 16 === 0;
      const tt = !aKcols && !bKcols && M % 16 === 0 && N % 16 === 0;
      if (mma && (tn || tt) && this.p(a) % 16 === 0 && bPtr % 16 === 0) {
        this.launch("gemm", `gemm_fp8_${tn ? "tn" : "tt"}_${qa.format}_${qb.format}`, grid, 128, (x) =>
          tail(
            x
              .u64(this.p(a))
              .u64(this.p(qa.scales))
              .i32(GROUP[qa.group])
              .u64(bPtr)
              .u64(bScales)
              .i32(GROUP[qb.group]),
          ),
        );
      } else {
        this.launch("gemm", mma ? "gemm_fp8_mma" : "gemm_fp8", grid, mma ? 128 : 256, (x) => {
          tail(
            x
              .u64(this.p(a))
              .u64(this.p(qa.scales))
              .i32(GROUP[qa.group])
              .i32(FMT[qa.format])
              .i32(aKcols)
              .u64(bPtr)
              .u64(bScales)
              .i32(GROUP[qb.group])
              .i32(FMT[qb.format])
              .i32(bKcols),
          );
          if (!mma) x.i32(promotion);
        });
      }
      for (const t of tmps) t.free();
      return;
    }
    const bf16 = o.precision === "bf16";
    // gemm16.cu: BF16 copies of both operands, 16-byte pieces along each operand's contiguous axis.
    const pieces = (kc: number, rows: number) => (kc ? K : rows) % 8 === 0;
    if (bf16 && this.useTensorCores && pieces(aKcols, M) && pieces(bKcols, N)) {
      const [ab, bb] = [a, b].map((t) => this.bf16Operand(t, "matmul bf16"));
      this.launch(
        "gemm16",
        `gemm_bf16_tc_${aKcols}${bKcols}`,
        gridFor(128),
        256,
        (x) => tail(x.u64(ab.ptr).u64(bb.ptr)),
        GEMM16_SMEM,
      );
      ab.free();
      bb.free();
      return;
    }
    const mma = bf16 && this.useTensorCores;
    const [af, bf] = [a, b].map((t) => this.f32Operand(t, "matmul"));
    this.launch("gemm", mma ? "gemm_bf16_mma" : "gemm_f32", grid, mma ? 128 : 256, (x) => {
      tail(x.u64(af.ptr).i32(aKcols).u64(bf.ptr).i32(bKcols));
      if (!mma) x.i32(bf16 ? 1 : 0);
    });
    af.free();
    bf.free();
  }

  groupedMatmul(a: Tensor, b: Tensor, offsets: Tensor, o: GroupedMatmulOptions): Tensor {
    const E = offsets.size - 1;
    const fp8 = o.precision === "fp8";
    for (const t of fp8 ? [] : [a, b]) {
      if (o.precision === "bf16") this.lowpInput(t, "groupedMatmul");
      else this.f32p(t, "groupedMatmul");
    }
    if (o.segment === "m") {
      if (o.transA) throw new Error("groupedMatmul m: A must not be transposed");
      const bd = batchDims(b);
      if (bd.batch !== E) throw new Error(`groupedMatmul: B holds ${bd.batch} matrices for ${E} experts`);
      const N = o.transB ? bd.rows : bd.cols;
      const K = a.cols;
      gemmDims({ rows: a.rows, cols: K }, { rows: bd.rows, cols: bd.cols }, o);
      if (fp8) {
        checkFp8Operand(a, "A", true);
        checkFp8Operand(b, "B", !!o.transB);
      }
      const Mt = a.rows;
      const out = this.output(Mt, N, o, [Mt, N]);
      if (!o.accumulate) this.n.cudaMemset8(this.buf(out), 0, 0, Mt * N * 4);
      if (Mt === 0 || N === 0 || E <= 0) return out;
      this.gemmKernel(a, b, out, Mt, N, K, o, 1, offsets, E, bd.rows, bd.cols);
      return out;
    }
    if (!o.transA || o.transB) throw new Error("groupedMatmul k: A must be transposed and B not");
    if (a.rows !== b.rows) throw new Error(`matmul: inner dimensions ${a.rows} and ${b.rows} differ`);
    if (fp8) {
      checkFp8Operand(a, "A", false);
      checkFp8Operand(b, "B", false);
    }
    const M = a.cols;
    const N = b.cols;
    const out = this.output(E * M * N, 1, o, [E, M, N]);
    if (E <= 0 || M === 0 || N === 0) return out;
    this.gemmKernel(a, b, out, M, N, a.rows, o, 2, offsets, E, 0, 0);
    return out;
  }

  // --- dense layers ----------------------------------------------------------------------------
  rmsnorm(x: Tensor, w: Tensor, eps: number) {
    const R = x.rows;
    const C = x.cols;
    const y = this.make(x.shape, "f32");
    const rstd = this.make([R], "f32");
    if (R > 0)
      this.launch("nn", "rmsnorm_fwd", this.rowsGrid(R), 256, (a) =>
        a
          .u64(this.f32p(x, "rmsnorm"))
          .u64(this.f32p(w, "rmsnorm"))
          .u64(this.p(y))
          .u64(this.p(rstd))
          .i32(R)
          .i32(C)
          .f64(eps),
      );
    return { y, rstd };
  }

  rmsnormBackward(dy: Tensor, x: Tensor, w: Tensor, rstd: Tensor) {
    const R = x.rows;
    const C = x.cols;
    const dx = this.make(x.shape, "f32");
    const dw = this.make(w.shape, "f32");
    if (R > 0)
      this.launch("nn", "rmsnorm_bwd_dx", this.rowsGrid(R), 256, (a) =>
        a
          .u64(this.f32p(dy, "rmsnormBackward"))
          .u64(this.p(x))
          .u64(this.p(w))
          .u64(this.p(rstd))
          .u64(this.p(dx))
          .i32(R)
          .i32(C),
      );
    const rowsPer = 256;
    const chunks = Math.max(1, cdiv(R, rowsPer));
    const part = this.scratch(chunks * C * 8);
    this.launch("nn", "rmsnorm_bwd_dw_partial", [cdiv(C, 256), chunks], 256, (a) =>
      a.u64(this.p(dy)).u64(this.p(x)).u64(this.p(rstd)).u64(part.ptr).i32(R).i32(C).i32(rowsPer),
    );
    this.launch("nn", "colsum_final", [cdiv(C, 256)], 256, (a) =>
      a.u64(part.ptr).u64(this.p(dw)).i32(chunks).i32(C),
    );
    part.free();
    return { dx, dw };
  }

  rope(x: Tensor, o: RopeOptions): Tensor {
    const R = x.rows;
    const y = this.make(x.shape, "f32");
    const xp = this.f32p(x, "rope");
    this.launch("nn", "rope_passthrough", this.g1(R * o.heads * o.width), 256, (a) =>
      a.u64(xp).u64(this.p(y)).i32(R).i32(o.heads).i32(o.width).i32(o.offset).i32(o.dim),
    );
    this.launch("nn", "rope", this.g1((R * o.heads * o.dim) / 2), 256, (a) =>
      a
        .u64(xp)
        .u64(this.p(y))
        .i32(R)
        .i32(o.heads)
        .i32(o.width)
        .i32(o.offset)
        .i32(o.dim)
        .i32(o.seqLen)
        .f64(o.theta)
        .i32(o.inverse ? 1 : 0),
    );
    return y;
  }

  headSlice(x: Tensor, o: HeadSliceOptions): Tensor {
    const R = x.rows;
    const outHeads = o.sumHeads ? 1 : o.heads;
    const y = this.make([R, outHeads * o.len], "f32");
    this.launch("nn", "head_slice", this.g1(R * outHeads * o.len), 256, (a) =>
      a
        .u64(this.f32p(x, "headSlice"))
        .u64(this.p(y))
        .i32(R)
        .i32(o.heads)
        .i32(o.width)
        .i32(o.start)
        .i32(o.len)
        .i32(o.sumHeads ? 1 : 0),
    );
    return y;
  }

  headScatterAdd(dst: Tensor, src: Tensor, o: HeadSliceOptions): void {
    const R = dst.rows;
    this.launch("nn", "head_scatter_add", this.g1(R * o.heads * o.len), 256, (a) =>
      a
        .u64(this.f32p(dst, "headScatterAdd"))
        .u64(this.f32p(src, "headScatterAdd"))
        .i32(R)
        .i32(o.heads)
        .i32(o.width)
        .i32(o.start)
        .i32(o.len),
    );
  }

  headConcat(a: Tensor, b: Tensor, heads: number, bHeads: number): Tensor {
    const la = a.cols / heads;
    const lb = b.cols / bHeads;
    const R = a.rows;
    const y = this.make([R, heads * (la + lb)], "f32");
    this.launch("nn", "head_concat", this.g1(y.size), 256, (x) =>
      x
        .u64(this.f32p(a, "headConcat"))
        .u64(this.f32p(b, "headConcat"))
        .u64(this.p(y))
        .i32(R)
        .i32(heads)
        .i32(la)
        .i32(lb)
        .i32(bHeads),
    );
    return y;
  }

  private attnDims(q: Tensor, v: Tensor, o: AttentionOptions) {
    const dqk = q.cols / o.heads;
    const dv = v.cols / o.heads;
    if (dqk > 256 || dv > 256) throw new Error(`attention: head dimensions ${dqk}/${dv} above 256`);
    const rows = o.batch * o.heads * o.seq;
    return { dqk, dv, grid: [Math.max(1, cdiv(rows, 4))] as [number], lowp: o.precision === "bf16" ? 1 : 0 };
  }

  /** flash.cu's entry-point suffix for a BF16 attention of these head sizes, or null (attention.cu). */
  private flashShape(dqk: number, dv: number, lowp: number, ...ts: Tensor[]): string | null {
    if (!lowp || !this.useTensorCores || !FLASH_SHAPES.has(`${dqk}_${dv}`)) return null;
    // The kernels read BF16: bf16 inputs as they are, f32 ones as copies in fresh (aligned) scratch.
    return ts.every((t) => t.dtype === "f32" || (t.dtype === "bf16" && this.p(t) % 16 === 0))
      ? `${dqk}_${dv}`
      : null;
  }

  attention(q: Tensor, k: Tensor, v: Tensor, o: AttentionOptions) {
    const { dqk, dv, grid, lowp } = this.attnDims(q, v, o);
    const out = this.make([q.rows, v.cols], "f32");
    const lse = this.make([o.batch * o.heads * o.seq], "f32");
    const flash = this.flashShape(dqk, dv, lowp, q, k, v);
    if (flash) {
      const [qb, kb, vb] = [q, k, v].map((t) => this.bf16Operand(t, "attention"));
      this.launch("flash", `flash_fwd_${flash}`, [cdiv(o.seq, 64), o.batch * o.heads], 128, (a) =>
        a
          .u64(qb.ptr)
          .u64(kb.ptr)
          .u64(vb.ptr)
          .u64(this.p(out))
          .u64(this.p(lse))
          .i32(o.seq)
          .i32(o.heads)
          .f32(o.scale),
      );
      for (const x of [qb, kb, vb]) x.free();
      return { o: out, lse };
    }
    const [qf, kf, vf] = [q, k, v].map((t) => this.f32Operand(t, "attention"));
    this.launch("attention", "attn_fwd", grid, 128, (a) =>
      a
        .u64(qf.ptr)
        .u64(kf.ptr)
        .u64(vf.ptr)
        .u64(this.p(out))
        .u64(this.p(lse))
        .i32(o.batch)
        .i32(o.seq)
        .i32(o.heads)
        .i32(dqk)
        .i32(dv)
        .f32(o.scale)
        .i32(lowp),
    );
    for (const x of [qf, kf, vf]) x.free();
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
    const { dqk, dv, grid, lowp } = this.attnDims(q, v, o);
    const { batch: B, seq: T, heads: H } = o;
    const D = this.scratch(B * H * T * 4);
    const dq = this.make(q.shape, "f32");
    const dk = this.make(k.shape, "f32");
    const dvv = this.make(v.shape, "f32");
    const [dOf, outf] = [dO, out].map((t) => this.f32Operand(t, "attentionBackward"));
    this.launch("attention", "attn_bwd_d", grid, 128, (a) =>
      a.u64(dOf.ptr).u64(outf.ptr).u64(D.ptr).i32(B).i32(T).i32(H).i32(dv).i32(lowp),
    );
    dOf.free();
    outf.free();
    const flash = this.flashShape(dqk, dv, lowp, dO, q, k, v);
    if (flash) {
      const bf = [dO, q, k, v].map((t) => this.bf16Operand(t, "attentionBackward"));
      const fl = (a: Args) =>
        a
          .u64(bf[0].ptr)
          .u64(bf[1].ptr)
          .u64(bf[2].ptr)
          .u64(bf[3].ptr)
          .u64(this.f32p(lse, "attentionBackward"))
          .u64(D.ptr);
      const fgrid: [number, number] = [cdiv(T, 64), B * H];
      this.launch("flash", `flash_dq_${flash}`, fgrid, 128, (a) =>
        fl(a).u64(this.p(dq)).i32(T).i32(H).f32(o.scale),
      );
      this.launch("flash", `flash_dkdv_${flash}`, fgrid, 128, (a) =>
        fl(a).u64(this.p(dk)).u64(this.p(dvv)).i32(T).i32(H).f32(o.scale),
      );
      for (const x of bf) x.free();
      D.free();
      return { dq, dk, dv: dvv };
    }
    const f = [dO, q, k, v].map((t) => this.f32Operand(t, "attentionBackward"));
    const common = (a: Args) =>
      a
        .u64(f[0].ptr)
        .u64(f[1].ptr)
        .u64(f[2].ptr)
        .u64(f[3].ptr)
        .u64(this.f32p(lse, "attentionBackward"))
        .u64(D.ptr);
    this.launch("attention", "attn_bwd_dq", grid, 128, (a) =>
      common(a).u64(this.p(dq)).i32(B).i32(T).i32(H).i32(dqk).i32(dv).f32(o.scale).i32(lowp),
    );
    this.launch("attention", "attn_bwd_dkdv", grid, 128, (a) =>
      common(a).u64(this.p(dk)).u64(this.p(dvv)).i32(B).i32(T).i32(H).i32(dqk).i32(dv).f32(o.scale).i32(lowp),
    );
    for (const x of f) x.free();
    D.free();
    return { dq, dk, dv: dvv };
  }

  swiglu(g: Tensor, u: Tensor): Tensor {
    sameShape(g, u, "swiglu");
    const h = this.make(g.shape, "f32");
    this.launch("nn", "swiglu_fwd", this.g1(g.size), 256, (a) =>
      a.u64(this.f32p(g, "swiglu")).u64(this.f32p(u, "swiglu")).u64(this.p(h)).u64(g.size),
    );
    return h;
  }

  swigluBackward(dh: Tensor, g: Tensor, u: Tensor) {
    const dg = this.make(g.shape, "f32");
    const du = this.make(u.shape, "f32");
    this.launch("nn", "swiglu_bwd", this.g1(g.size), 256, (a) =>
      a
        .u64(this.f32p(dh, "swigluBackward"))
        .u64(this.p(g))
        .u64(this.p(u))
        .u64(this.p(dg))
        .u64(this.p(du))
        .u64(g.size),
    );
    return { dg, du };
  }

  embedding(w: Tensor, ids: Tensor): Tensor {
    const N = ids.size;
    const d = w.cols;
    const out = this.make([N, d], "f32");
    this.launch("nn", "embedding_fwd", this.g1(N * d), 256, (a) =>
      a
        .u64(this.f32p(w, "embedding"))
        .u64(this.i32p(ids, "embedding"))
        .u64(this.p(out))
        .i32(N)
        .i32(w.rows)
        .i32(d)
        .u64(0),
    );
    return out;
  }

  embeddingBackward(dw: Tensor, dy: Tensor, ids: Tensor): void {
    const d = dw.cols;
    const V = dw.rows;
    const slices = Math.max(1, Math.min(64, V));
    this.launch("nn", "embedding_bwd", [cdiv(d, 128), slices], 128, (a) =>
      a
        .u64(this.f32p(dw, "embeddingBackward"))
        .u64(this.f32p(dy, "embeddingBackward"))
        .u64(this.i32p(ids, "embeddingBackward"))
        .i32(ids.size)
        .i32(V)
        .i32(d)
        .i32(slices),
    );
  }

  // --- mixture of experts ----------------------------------------------------------------------
  router(logits: Tensor, bias: Tensor, k: number, scaling: number): RouterResult {
    const N = logits.rows;
    const E = logits.cols;
    if (E > 256) throw new Error(`router: ${E} experts (at most 256 on cuda)`);
    if (k > E) throw new Error(`router: top-${k} of ${E} experts`);
    const scores = this.make([N, E], "f32");
    const topIdx = this.make([N, k], "i32");
    const weights = this.make([N, k], "f32");
    this.launch("moe", "router", [Math.max(1, cdiv(N, 128))], 128, (a) =>
      a
        .u64(this.f32p(logits, "router"))
        .u64(this.f32p(bias, "router"))
        .u64(this.p(scores))
        .u64(this.p(topIdx))
        .u64(this.p(weights))
        .i32(N)
        .i32(E)
        .i32(k)
        .f64(scaling),
    );
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
    const k = topIdx.cols;
    const out = this.make([N, E], "f32");
    this.launch("moe", "router_bwd", this.g1(N * E), 256, (a) =>
      a
        .u64(this.f32p(dweights, "routerBackward"))
        .u64(this.f32p(scores, "routerBackward"))
        .u64(this.i32p(topIdx, "routerBackward"))
        .u64(dscores ? this.f32p(dscores, "routerBackward") : 0)
        .u64(this.p(out))
        .i32(N)
        .i32(E)
        .i32(k)
        .f64(scaling),
    );
    return out;
  }

  balanceLoss(scores: Tensor, topIdx: Tensor, o: { batch: number; seq: number; alpha: number }) {
    const E = scores.cols;
    const k = topIdx.cols;
    const { batch: B, seq: T, alpha } = o;
    const f = this.scratch(B * E * 8);
    const P = this.scratch(B * E * 8);
    const part = this.scratch(B * 8);
    const loss = this.make([1], "f32");
    const dscores = this.make(scores.shape, "f32");
    const Z = this.scratch(Math.max(1, B * T) * 8);
    this.launch("moe", "balance_z", [Math.max(1, cdiv(B * T, 256))], 256, (a) =>
      a
        .u64(this.f32p(scores, "balanceLoss"))
        .u64(Z.ptr)
        .i32(B * T)
        .i32(E),
    );
    const term = this.scratch(Math.max(1, B * T * E) * 8);
    const cnt = this.scratch(Math.max(1, B * E) * 4);
    this.n.cudaMemset32(cnt, 0, 0, Math.max(1, B * E));
    this.launch("moe", "balance_terms", [Math.max(1, cdiv(B * T * Math.max(E, k), 256))], 256, (a) =>
      a
        .u64(this.p(scores))
        .u64(this.i32p(topIdx, "balanceLoss"))
        .u64(Z.ptr)
        .u64(term.ptr)
        .u64(cnt.ptr)
        .i32(B)
        .i32(T)
        .i32(E)
        .i32(k),
    );
    this.launch("moe", "balance_stats", [Math.max(1, B)], 128, (a) =>
      a.u64(term.ptr).u64(cnt.ptr).u64(f.ptr).u64(P.ptr).u64(part.ptr).i32(B).i32(T).i32(E).i32(k).f64(alpha),
    );
    this.launch("moe", "balance_loss", [1], 32, (a) => a.u64(part.ptr).i32(B).u64(this.p(loss)));
    this.launch("moe", "balance_grad", [Math.max(1, cdiv(B * T, 128))], 128, (a) =>
      a.u64(this.p(scores)).u64(f.ptr).u64(this.p(dscores)).i32(B).i32(T).i32(E).f64(alpha),
    );
    f.free();
    P.free();
    part.free();
    Z.free();
    term.free();
    cnt.free();
    return { loss, dscores };
  }

  /** pos[selection] = row of xs (the inverse permutation), in scratch memory. */
  private positions(slot: Tensor): DeviceBuffer {
    const rows = slot.size;
    const pos = this.scratch(rows * 4);
    this.launch("moe", "invert_slots", [Math.max(1, cdiv(rows, 256))], 256, (a) =>
      a.u64(this.i32p(slot, "moe")).u64(pos.ptr).i32(rows),
    );
    return pos;
  }

  moePermute(x: Tensor, topIdx: Tensor, experts: number): PermuteResult {
    const N = topIdx.rows;
    const k = topIdx.cols;
    const E = experts;
    if (E > 1024) throw new Error(`moePermute: ${E} experts (at most 1024 on cuda)`);
    const total = N * k;
    const d = x.cols;
    const chunks = cdiv(total, 256);
    const counts = this.scratch(chunks * E * 4);
    const base = this.scratch(chunks * E * 4);
    const slot = this.make([total], "i32");
    const offsets = this.make([E + 1], "i32");
    const xs = this.make([total, d], "f32");
    const tp = this.i32p(topIdx, "moePermute");
    this.launch(
      "moe",
      "permute_count",
      [chunks],
      256,
      (a) => a.u64(tp).u64(counts.ptr).i32(total).i32(E),
      E * 4,
    );
    this.launch("moe", "permute_scan", [1], 256, (a) =>
      a.u64(counts.ptr).u64(base.ptr).u64(this.p(offsets)).i32(chunks).i32(E),
    );
    this.launch("moe", "permute_scatter", [chunks], 256, (a) =>
      a.u64(tp).u64(base.ptr).u64(this.p(slot)).u64(0).i32(total).i32(E),
    );
    this.launch("moe", "gather_rows", this.g1(total * d), 256, (a) =>
      a.u64(this.f32p(x, "moePermute")).u64(this.p(slot)).u64(this.p(xs)).i32(total).i32(d).i32(k),
    );
    counts.free();
    base.free();
    return { xs, slot, offsets };
  }

  moePermuteBackward(dxs: Tensor, slot: Tensor, tokens: number): Tensor {
    const d = dxs.cols;
    const k = slot.size / tokens;
    const dx = this.make([tokens, d], "f32");
    const pos = this.positions(slot);
    this.launch("moe", "permute_bwd", this.g1(tokens * d), 256, (a) =>
      a.u64(this.f32p(dxs, "moePermuteBackward")).u64(pos.ptr).u64(this.p(dx)).i32(tokens).i32(k).i32(d),
    );
    pos.free();
    return dx;
  }

  moeCombine(ys: Tensor, slot: Tensor, weights: Tensor): Tensor {
    const N = weights.rows;
    const k = weights.cols;
    const d = ys.cols;
    const y = this.make([N, d], "f32");
    const pos = this.positions(slot);
    this.launch("moe", "combine", this.g1(N * d), 256, (a) =>
      a
        .u64(this.f32p(ys, "moeCombine"))
        .u64(pos.ptr)
        .u64(this.f32p(weights, "moeCombine"))
        .u64(this.p(y))
        .i32(N)
        .i32(k)
        .i32(d),
    );
    pos.free();
    return y;
  }

  moeCombineBackward(dy: Tensor, ys: Tensor, slot: Tensor, weights: Tensor) {
    const rows = slot.size;
    const k = weights.cols;
    const d = ys.cols;
    const dys = this.make(ys.shape, "f32");
    const dweights = this.make(weights.shape, "f32");
    const ys16 = ys.dtype === "bf16";
    this.launch("moe", ys16 ? "combine_bwd_ys16" : "combine_bwd", [Math.max(1, cdiv(rows, 8))], 256, (a) =>
      a
        .u64(this.f32p(dy, "moeCombineBackward"))
        .u64(ys16 ? this.p(ys) : this.f32p(ys, "moeCombineBackward"))
        .u64(this.i32p(slot, "moeCombineBackward"))
        .u64(this.f32p(weights, "moeCombineBackward"))
        .u64(this.p(dys))
        .u64(this.p(dweights))
        .i32(rows)
        .i32(k)
        .i32(d),
    );
    return { dys, dweights };
  }

  biasUpdate(bias: Tensor, offsets: Tensor, gamma: number): void {
    const E = bias.size;
    this.launch("moe", "bias_update", [Math.max(1, cdiv(E, 256))], 256, (a) =>
      a.u64(this.f32p(bias, "biasUpdate")).u64(this.i32p(offsets, "biasUpdate")).i32(E).f64(gamma),
    );
  }

  // --- loss and optimiser ----------------------------------------------------------------------
  crossEntropy(logits: Tensor, targets: Tensor, gradScale: number) {
    const N = logits.rows;
    const V = logits.cols;
    const dlogits = this.make(logits.shape, "f32");
    const loss = this.make([1], "f32");
    const rows = this.scratch(N * 8);
    if (N > 0)
      this.launch("optim", "cross_entropy_rows", this.rowsGrid(N), 256, (a) =>
        a
          .u64(this.f32p(logits, "crossEntropy"))
          .u64(this.i32p(targets, "crossEntropy"))
          .u64(this.p(dlogits))
          .u64(rows.ptr)
          .i32(N)
          .i32(V)
          .f64(gradScale)
          .u64(0),
      );
    this.launch("optim", "cross_entropy_final", [1], 256, (a) => a.u64(rows.ptr).i32(N).u64(this.p(loss)));
    rows.free();
    return { loss, dlogits };
  }

  clipScale(grads: Tensor[], maxNorm: number) {
    const plan = grads.map((g) => {
      const n = g.size;
      const parts = Math.max(1, Math.min(cdiv(n, 256 * 8), 256));
      return { g, n, parts, chunk: Math.max(1, cdiv(n, parts)) };
    });
    const total = plan.reduce((s, p) => s + p.parts, 0);
    const part = this.scratch(Math.max(1, total) * 8);
    let at = 0;
    for (const { g, n, parts, chunk } of plan) {
      const dst = part.ptr + at * 8;
      this.launch("elementwise", "sumsq_partial", [parts], 256, (a) =>
        a.u64(this.f32p(g, "clipScale")).u64(dst).u64(n).u64(chunk),
      );
      at += parts;
    }
    const norm = this.make([1], "f32");
    const scale = this.make([1], "f32");
    this.launch("elementwise", "clip_final", [1], 256, (a) =>
      a.u64(part.ptr).i32(total).f64(maxNorm).u64(this.p(norm)).u64(this.p(scale)),
    );
    part.free();
    return { norm, scale };
  }

  adamw(p: Tensor, g: Tensor, m: Tensor, v: Tensor, o: AdamWOptions): void {
    const n = p.size;
    const bc1 = 1 - o.beta1 ** o.step;
    const bc2 = 1 - o.beta2 ** o.step;
    const decay = 1 - o.lr * o.weightDecay;
    for (const t of [m, v])
      if (t.dtype !== "f32" && t.dtype !== "bf16")
        throw new Error(`adamw: moments must be f32 or bf16, got ${t}`);
    this.launch("optim", "adamw", this.g1(n), 256, (a) =>
      a
        .u64(this.f32p(p, "adamw"))
        .u64(this.f32p(g, "adamw"))
        .u64(this.p(m))
        .u64(this.p(v))
        .i32(m.dtype === "bf16" ? 1 : 0)
        .i32(v.dtype === "bf16" ? 1 : 0)
        .u64(this.f32p(o.gradScale, "adamw"))
        .u64(n)
        .f64(o.lr)
        .f64(o.beta1)
        .f64(o.beta2)
        .f64(o.eps)
        .f64(decay)
        .f64(bc1)
        .f64(bc2),
    );
  }
}
