// What every op module of the cuda backend works through: device memory (tensors in buffers of the
// addon's caching allocator, scratch, host copies), kernel launches and the settings read from the
// environment. Nothing here waits for the device except the host reads (docs/runtime.md rule 1).
import { type Backend, BYTES_PER_ELEMENT, type DType, type HostArray, numel, Tensor } from "@moe8/tensor";
import type { DeviceBuffer } from "../../native.d.cts";
import { DEFINES } from "../cuda/kernels.generated.ts";
import type { NativeAddon } from "../index.ts";
import { attentionPath } from "./attention.ts";
import { groupedGemmPath, type Sm90DenseMode, sm90DenseMode } from "./gemm-sm90.ts";
import { ArgEncoder, type KernelArgs, type KernelSignature } from "./launch.ts";

export { KERNELS } from "../cuda/kernels.generated.ts";

/** Device memory a kernel reads: a tensor's own, or a scratch copy that free() gives back. */
export type Operand = { ptr: number; free(): void };

export const cdiv = (a: number, b: number) => Math.ceil(a / b);

/** The largest second and third grid dimension (common.cuh). */
const GRID_YZ_MAX = DEFINES.common.GRID_YZ_MAX;

export function u8view(a: HostArray): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/** A tile-width override from the environment: unset 0 (by shape), else 128 or 256. */
function tileWidth(name: string): 0 | 128 | 256 {
  return Number(envChoice(name, ["128", "256"], "0")) as 0 | 128 | 256;
}

/** A measuring switch: the variable's value, one of `choices`, or `unset` without it; else an error. */
function envChoice<T extends string>(name: string, choices: readonly T[], unset: T): T {
  const v = process.env[name] ?? "";
  if (v === "") return unset;
  if (!(choices as readonly string[]).includes(v))
    throw new Error(`${name}="${v}": expected ${choices.slice(0, -1).join(", ")} or ${choices.at(-1)}`);
  return v as T;
}

export class CudaContext {
  private readonly ids = new Map<KernelSignature, number>();
  private readonly args = new ArgEncoder();
  /** Scales of segment-quantised tensors: read() returns their compact prefix. */
  readonly segScales = new WeakMap<Tensor, { segments: Tensor; cols: number }>();
  /** GEMM configurations cuBLASLt refused (they use the tiled kernel from then on). */
  readonly ltRefused = new Set<string>();
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
  /**
   * The Hopper grouped FP8 GEMMs (gemm_sm90.cu) for the experts' Fprop, Dgrad and Wgrad (and the
   * dense ones MOE8_SM90_DENSE picks): on a compute-capability-9.0 GPU with the tensor cores on,
   * unless MOE8_SM90_GEMM=0.
   */
  readonly sm90Gemm: boolean;
  /**
   * The Hopper attention kernels (flash_sm90.cu) for BF16 attention of their head shapes: on a
   * compute-capability-9.0 GPU with the tensor cores on, unless MOE8_SM90_ATTENTION=0.
   */
  readonly sm90Attention: boolean;
  /** Streaming multiprocessors: the persistent kernels' grid. */
  readonly multiprocessors: number;
  /**
   * Which dense FP8 GEMMs run on the sm90 grouped kernels as one group instead of cuBLASLt
   * (MOE8_SM90_DENSE: `auto`, the measured per-role choice of gemm-sm90.ts; `all`; `none`).
   * Mutable so that `bench gemm` can time both paths in one run.
   */
  sm90Dense: Sm90DenseMode;
  /**
   * FP8 column-tile matrices stored K-major ([cols, pitch] chunks of 128 tokens: the Hopper Wgrad's
   * operand layout, written so by the quantisers; quant.ts). Their storage is not the logical
   * layout: `buf`/`p` refuse them, and a consumer either reads them as they are (`kMajorBuf`) or
   * takes the row-major codes from quant.ts's `rowMajorCodes`.
   */
  readonly kMajor = new WeakMap<Tensor, { pitch: number }>();
  /**
   * Block-quantised FP8 matrices (weights) whose buffers also hold their transpose, written by the
   * same quant_block launch: the codes [batch][cols][rows] right after the tensor's own codes, the
   * block scales [batch][cb][rb] right after its scales. The Dgrad reads its weight so (W^T with both
   * operands K-contiguous; quant.ts transposedOf) instead of transposing it first.
   */
  readonly blockTransposed = new WeakSet<Tensor>();
  /**
   * Whether column-tile quantisations are written K-major (on sm_90 with the sm90 GEMMs, unless
   * MOE8_SM90_KMAJOR=0).
   */
  readonly kMajorColTiles: boolean;
  /**
   * Tile widths of the sm90 kernels: 0 picks by shape (gemm-sm90.ts), 128 or 256 force one entry
   * (MOE8_SM90_BN for Fprop and Dgrad, MOE8_SM90_WGRAD_BN for Wgrad; for measuring the two).
   */
  readonly sm90Bn: 0 | 128 | 256;
  readonly sm90WgradBn: 0 | 128 | 256;
  /**
   * The ring of the 128 x 128 Fprop and Dgrad storing BF16 for up to 128 groups: "deep" (6 stages,
   * BF16 staging) or 4 stages (MOE8_SM90_RING=4; for measuring the two).
   */
  readonly sm90Ring: "deep" | "4";
  /**
   * The 6-stage BF16 and 5-stage f32 Fprop/Dgrad entries: "early" (the default: output staged by
   * stmatrix, warp-uniform control and descriptors, the next tile's first two chunks issued before
   * the last tile's epilogue) or "plain", the entries before it (MOE8_SM90_FPROP; for measuring the
   * two; notes/sm90-gemm.md, twenty-ninth session).
   */
  readonly sm90Fprop: "early" | "plain";
  /**
   * Whether the 128 x 256 entries' two consumer warpgroups take turns on the tensor cores (the
   * default; MOE8_SM90_PINGPONG=0 issues both together, for measuring the two).
   */
  readonly sm90Pingpong: boolean;
  /**
   * Where the 128 x 256 Wgrad takes each chunk's scale vectors from: "staged"
   * (MOE8_SM90_WGRAD_STAGED=1, the default before "lean"), its ring stage, copied there by the
   * producer with the codes;
   * "checked", its racecheck twin: every order spelled in named barriers and the scales written by
   * the producer warp's stores instead of bulk copies, so that compute-sanitizer's racecheck can
   * follow each one (=checked; slower); "halves", staged with the epilogue by 128-column halves
   * rather than strip by strip (=halves, the default before); "turns", staged with the two consumer
   * warpgroups taking turns instead of warpgroup 1 lagging a chunk behind (=turns, the default
   * before); "lean", the default: staged with the warp index, tile fields and wgmma descriptors
   * warp-uniform (gate_up Wgrad +2-3%, down even: "staged" without them); "loaded",
   * the consumers loading and staging them (=0, the entry before the staged one;
   * notes/sm90-gemm.md has the numbers).
   */
  readonly sm90WgradScales: "loaded" | "staged" | "checked" | "halves" | "turns" | "lean";
  /**
   * The order in which the Wgrad's persistent CTAs take the experts' tiles: "sorted" (the default),
   * the experts with the most tokens first, dealt in a snake (gemm_sm90.cu, sm90_tile), or
   * "experts" (MOE8_SM90_WGRAD_ORDER=experts), round robin in expert order, the order before.
   */
  readonly sm90WgradOrder: "sorted" | "experts";
  /**
   * CTAs of the persistent sm90 GEMMs: one per SM, or MOE8_SM90_CTAS (the tests use a few, so that
   * every CTA walks several tiles: the ring's phases and the deferred epilogues across tiles).
   */
  readonly sm90Ctas: number;
  /** Device int32 offsets by (rows, part size): see segmentsOf. */
  private readonly segments = new Map<string, DeviceBuffer>();
  /** Device tables made once by a kernel and kept for the backend's life: see kept. */
  private readonly tables = new Map<string, DeviceBuffer>();

  /**
   * @param n the addon (with CUDA)
   * @param backend the Backend whose tensors these are; ops that use other ops call them through it,
   *   as the backend's own methods did (so a wrapper around the backend sees those calls)
   * @param register makes a new tensor live in the backend's current arena
   */
  constructor(
    readonly n: NativeAddon,
    readonly backend: Backend,
    private readonly register: (t: Tensor) => Tensor,
  ) {
    const info = n.cudaInfo();
    this.multiprocessors = info.multiprocessors ?? 0;
    this.sm90Gemm =
      this.useTensorCores &&
      this.multiprocessors > 0 &&
      groupedGemmPath(info.computeCapability).kernel === "sm90-wgmma";
    this.sm90Attention = this.useTensorCores && attentionPath(info.computeCapability).kernel === "sm90-wgmma";
    this.sm90Dense = sm90DenseMode(process.env.MOE8_SM90_DENSE);
    this.kMajorColTiles = this.sm90Gemm && process.env.MOE8_SM90_KMAJOR !== "0";
    this.sm90Bn = tileWidth("MOE8_SM90_BN");
    this.sm90WgradBn = tileWidth("MOE8_SM90_WGRAD_BN");
    this.sm90Ring = envChoice("MOE8_SM90_RING", ["deep", "4"], "deep");
    this.sm90Pingpong = envChoice("MOE8_SM90_PINGPONG", ["0", "1"], "1") === "1";
    this.sm90Fprop = envChoice("MOE8_SM90_FPROP", ["early", "plain"], "early");
    const scales = envChoice(
      "MOE8_SM90_WGRAD_STAGED",
      ["0", "1", "checked", "halves", "turns", "lean"],
      "lean",
    );
    this.sm90WgradScales = scales === "0" ? "loaded" : scales === "1" ? "staged" : scales;
    this.sm90WgradOrder = envChoice("MOE8_SM90_WGRAD_ORDER", ["sorted", "experts"], "sorted");
    const ctas = process.env.MOE8_SM90_CTAS ?? "";
    if (ctas !== "" && !(Number.isInteger(Number(ctas)) && Number(ctas) >= 1))
      throw new Error(`MOE8_SM90_CTAS="${ctas}": expected a positive integer`);
    this.sm90Ctas = ctas === "" ? this.multiprocessors : Number(ctas);
  }

  /**
   * The device address of int32 offsets [0, per, 2 per, ..., rows]: `rows` cut into parts of `per`
   * (the last shorter). per = rows: a dense GEMM as the one segment of the grouped kernels; per a
   * multiple of 128: a dense Wgrad split along K. Made once per (rows, per) and kept for the
   * backend's life (a few bytes each, and no upload per call).
   */
  segmentsOf(rows: number, per: number): number {
    const key = `${rows}/${per}`;
    let buf = this.segments.get(key);
    if (!buf) {
      const off = [0];
      while (off[off.length - 1] < rows) off.push(Math.min(rows, off[off.length - 1] + per));
      if (off.length === 1) off.push(0);
      buf = new this.n.DeviceBuffer(off.length * 4);
      this.n.cudaHtod(buf, 0, u8view(Int32Array.from(off)));
      this.segments.set(key, buf);
    }
    return buf.ptr;
  }

  /**
   * The device address of a table that depends only on `key` (RoPE's cosines and sines of a
   * sequence length): `bytes` filled by `fill(ptr)` on first use and kept for the backend's life
   * (a few hundred KB each), instead of a kernel and a scratch buffer per call.
   */
  kept(key: string, bytes: number, fill: (ptr: number) => void): number {
    let buf = this.tables.get(key);
    if (!buf) {
      buf = new this.n.DeviceBuffer(Math.max(1, bytes));
      fill(buf.ptr);
      this.tables.set(key, buf);
    }
    return buf.ptr;
  }

  // --- memory ----------------------------------------------------------------------------------
  /** A new tensor in device memory (contents undefined). */
  make(shape: readonly number[], dtype: DType, quant: Tensor["quant"] = null): Tensor {
    const buf = new this.n.DeviceBuffer(numel(shape) * BYTES_PER_ELEMENT[dtype]);
    return this.register(new Tensor(this.backend, shape, dtype, buf, quant));
  }

  /**
   * A new tensor whose buffer holds `bytes` (more than its own elements: room for a second layout
   * after them, see blockTransposed), contents undefined.
   */
  makeWithRoom(shape: readonly number[], dtype: DType, bytes: number, quant: Tensor["quant"] = null): Tensor {
    const buf = new this.n.DeviceBuffer(Math.max(bytes, numel(shape) * BYTES_PER_ELEMENT[dtype]));
    return this.register(new Tensor(this.backend, shape, dtype, buf, quant));
  }

  /** A new FP8 column-tile matrix [rows, cols] stored K-major as [cols, pitch] (see kMajor). */
  makeKMajor(rows: number, cols: number, pitch: number, quant: NonNullable<Tensor["quant"]>): Tensor {
    const t = new Tensor(
      this.backend,
      [rows, cols],
      quant.format,
      new this.n.DeviceBuffer(cols * pitch),
      quant,
    );
    this.kMajor.set(t, { pitch });
    return this.register(t);
  }

  buf(t: Tensor): DeviceBuffer {
    if (this.kMajor.has(t))
      throw new Error(
        `${t} is stored K-major (the sm90 Wgrad's layout): read its codes through rowMajorCodes`,
      );
    return this.kMajorBuf(t);
  }

  /** A tensor's storage whatever its layout (for the consumers that know the K-major one). */
  kMajorBuf(t: Tensor): DeviceBuffer {
    if (t.disposed || t.storage == null) throw new Error(`use of a disposed tensor ${t}`);
    return t.storage as DeviceBuffer;
  }

  /** The device address of a tensor's data. */
  p(t: Tensor): number {
    return this.buf(t).ptr;
  }

  f32p(t: Tensor, op: string): number {
    this.buf(t); // a disposed tensor is reported as such, whatever its dtype
    if (t.dtype !== "f32") throw new Error(`${op}: expected an f32 tensor, got ${t}`);
    return this.p(t);
  }

  i32p(t: Tensor, op: string): number {
    this.buf(t);
    if (t.dtype !== "i32") throw new Error(`${op}: expected an i32 tensor, got ${t}`);
    return this.p(t);
  }

  /** Scratch device memory for one op; freed (stream-ordered) right after the op is enqueued. */
  scratch(bytes: number): DeviceBuffer {
    return new this.n.DeviceBuffer(Math.max(bytes, 8));
  }

  release(t: Tensor): void {
    this.backend.release(t);
  }

  // --- launching -------------------------------------------------------------------------------
  /**
   * Enqueues `kernel` (a row of KERNELS) on grid x block threads with its named arguments: the argument
   * object's type is the kernel's parameter list, so a launch that disagrees with the .cu
   * declaration does not compile.
   */
  launch<S extends KernelSignature>(
    kernel: S,
    grid: readonly [number, number?, number?],
    block: number,
    args: KernelArgs<S>,
    shared = 0,
  ): void {
    let id = this.ids.get(kernel);
    if (id === undefined) {
      id = this.n.cudaKernel(kernel.module, kernel.name);
      this.ids.set(kernel, id);
    }
    if (kernel.maxThreads !== null && block > kernel.maxThreads)
      throw new Error(
        `${kernel.module}.${kernel.name}: ${block} threads above its __launch_bounds__(${kernel.maxThreads})`,
      );
    const { bytes, offsets } = this.args.encode(kernel, args);
    if (this.timingLaunches) this.lastLaunchMs = performance.now();
    const [gx, gy = 1, gz = 1] = grid;
    if (offsets) this.n.cudaLaunch(id, gx, gy, gz, block, 1, 1, shared, bytes, offsets);
    else this.n.cudaLaunch(id, gx, gy, gz, block, 1, 1, shared, bytes);
  }

  /** While true (CudaBackend.timeKernels), lastLaunchMs is performance.now() at each launch. */
  timingLaunches = false;
  /** performance.now() at the last kernel launch while timing: when the host had issued a step. */
  lastLaunchMs = 0;

  /** Blocks for a grid-stride loop over n elements. */
  g1(n: number, block = 256): [number] {
    return [Math.max(1, Math.min(cdiv(n, block), 16384))];
  }

  /** Grid for one block per row (rows beyond GRID_YZ_MAX go to the second dimension). */
  rowsGrid(R: number): [number, number] {
    return [Math.min(R, GRID_YZ_MAX), cdiv(R, GRID_YZ_MAX)];
  }
}
