// The Hopper grouped FP8 GEMM (gemm_sm90.cu: TMA loads, mbarrier ring, wgmma, persistent CTAs over
// the experts' tiles) for the experts' Fprop, Dgrad and Wgrad on a compute-capability-9.0 GPU. It
// takes E4M3 x E4M3, promotion 128: 1x128 activation tiles with 128x128 weight blocks, both operands
// K-contiguous (Fprop, Dgrad), or 128x1 column tiles restarted at each expert on both operands
// (Wgrad, on the K-major chunks the quantisers write). gemm.ts asks it first and falls back to the
// mma.sync kernels of gemm.cu for anything else (E5M2 operands, other GPUs, MOE8_SM90_GEMM=0).
// Numerics: wgmma keeps ~14 bits while it sums FP8 products inside one instruction, so results
// differ from the reference's exact chunked sums by ~2.5e-4 relative (packages/kernels/notes/sm90-gemm.md).
import type { Fp8Format, QuantGroup } from "@moe8/fp8-core";
import type { MatmulOptions, Tensor } from "@moe8/tensor";
import type { DeviceBuffer } from "../../native.d.cts";
import { DEFINES, KERNELS } from "../cuda/kernels.generated.ts";
import { type CudaContext, cdiv } from "./context.ts";
import { transposedOf } from "./quant.ts";

const SM90 = DEFINES.gemm_sm90;

/** Which kernels run the grouped FP8 GEMMs (Fprop, Dgrad) of the experts, and why. */
export interface GroupedGemmPath {
  kernel: "sm90-wgmma" | "mma.sync";
  reason: string;
}

/**
 * The grouped-GEMM path on a GPU of this compute capability (e.g. "9.0") under the environment:
 * the wgmma kernels on sm_90 unless MOE8_SM90_GEMM=0, the mma.sync kernels elsewhere.
 */
export function groupedGemmPath(
  computeCapability: string | null | undefined,
  env: Record<string, string | undefined> = process.env,
): GroupedGemmPath {
  if (computeCapability !== "9.0")
    return {
      kernel: "mma.sync",
      reason: `compute capability ${computeCapability ?? "unknown"}: wgmma needs 9.0 (sm_90a)`,
    };
  if (env.MOE8_SM90_GEMM === "0") return { kernel: "mma.sync", reason: "MOE8_SM90_GEMM=0" };
  const mode = sm90DenseMode(env.MOE8_SM90_DENSE);
  const dense = mode === "auto" ? SM90_DENSE_AUTO : mode === "all" ? "all roles" : "none (cuBLASLt)";
  return {
    kernel: "sm90-wgmma",
    reason: `sm_90a: TMA + wgmma for E4M3 Fprop/Dgrad (1x128 x 128x128) and Wgrad (128x1 x 128x1), E5M2 on mma.sync; dense FP8 GEMMs on it: ${dense} (MOE8_SM90_DENSE=${mode})`,
  };
}

/** The operands of a grouped GEMM with segments along M, both K-contiguous (after gemm.ts's Dgrad transpose). */
export interface Sm90Operands {
  a: number;
  aScales: number;
  aFormat: Fp8Format;
  aGroup: QuantGroup;
  /** [E, N, K] codes and [E, ceil(N/128), ceil(K/128)] scales. */
  b: number;
  bScales: number;
  bFormat: Fp8Format;
  bGroup: QuantGroup;
  c: number;
  offsets: number;
  /** Rows of A and C (all experts). */
  M: number;
  N: number;
  K: number;
  E: number;
  promotion: number;
  accumulate: boolean;
  outBf16: boolean;
  /** C is a bf16 tensor (values rounded to BF16, half the bytes); never with accumulate. */
  storeBf16?: boolean;
  /** C holds FP8 codes, quantised in 1x128 tiles by the kernel (SM90_OUT_FP8); never with accumulate. */
  storeQuantized?: Sm90QuantOut;
}

/** An FP8 output of the sm90 kernel: its 1x128 scales, and quant.cu's fmt, mode and eps for them. */
export interface Sm90QuantOut {
  scales: number;
  fmt: number;
  mode: number;
  eps: number;
}

/** gemm_sm90.cu's outMode for these options. */
function outMode(o: { outBf16: boolean; storeBf16?: boolean }): number {
  if (o.storeBf16) return SM90.SM90_OUT_BF16;
  return o.outBf16 ? SM90.SM90_OUT_ROUND : SM90.SM90_OUT_F32;
}

/** Why these operands cannot take the sm90 kernels, or null when they can. */
export function sm90Refusal(o: Sm90Operands): string | null {
  if (o.aFormat !== "e4m3" || o.bFormat !== "e4m3") return "operands not E4M3 x E4M3";
  if (o.aGroup !== "tile" || o.bGroup !== "block") return "not 1x128 tiles x 128x128 blocks";
  if (o.promotion !== 128) return "promotion is not 128";
  if (o.K % 16 !== 0) return "K % 16 != 0 (TMA row pitch)";
  if (o.N % 8 !== 0) return "N % 8 != 0";
  if (o.E < 1 || o.E > SM90.SM90_MAX_E) return `E outside 1..${SM90.SM90_MAX_E}`;
  if (o.a % 16 !== 0 || o.b % 16 !== 0 || o.c % 16 !== 0) return "an operand is not 16-byte aligned";
  return null;
}

/**
 * Enqueues C (+)= A B_e^T over the experts' row segments with gemm_sm90.cu when the GPU and the
 * operands allow it (without accumulate, C needs no clearing: the kernel writes 0 to the rows
 * outside every segment); returns false (nothing enqueued) otherwise.
 */
export function sm90Grouped(cx: CudaContext, o: Sm90Operands): boolean {
  if (!cx.sm90Gemm || sm90Refusal(o) !== null) return false;
  if (o.storeQuantized) return sm90GroupedQuantized(cx, o, o.storeQuantized);
  // 128 x 128 tiles with two accumulator sets and deferred epilogues (the next tile's first wgmmas
  // run while this one is stored): at small's expert shapes as fast as 128 x 256 or faster (gate_up
  // Fprop 689 against 622 TFLOP/s, down Dgrad 416 against 380; notes/sm90-gemm.md); MOE8_SM90_BN=256
  // takes the 128 x 256 entry (one buffer, epilogue not deferred; the two consumer warpgroups taking
  // turns unless MOE8_SM90_PINGPONG=0).
  const wide = cx.sm90Bn === 256;
  // Up to SM90_MAX_E_DEEP groups the deeper rings: BF16 stores without accumulate (the experts'
  // Fprop and Dgrad) take the 6-stage entry with BF16 staging, the rest (f32 stores, accumulate-into:
  // the dense roles) the 5-stage entry. MOE8_SM90_RING=4 keeps the 4-stage entry (for measuring).
  const deep = !wide && cx.sm90Ring === "deep" && o.E <= SM90.SM90_MAX_E_DEEP;
  const bf16Ring = deep && !!o.storeBf16 && !o.accumulate;
  const [kernel, smem] = wide
    ? [
        cx.sm90Pingpong
          ? KERNELS.gemm_sm90.gemm_sm90_fp8_grouped_128x256_pingpong
          : KERNELS.gemm_sm90.gemm_sm90_fp8_grouped_128x256,
        SM90.SM90_SMEM_128x256,
      ]
    : bf16Ring
      ? [
          cx.sm90Fprop === "early"
            ? KERNELS.gemm_sm90.gemm_sm90_fp8_grouped_128x128_bf16_early
            : KERNELS.gemm_sm90.gemm_sm90_fp8_grouped_128x128_bf16,
          SM90.SM90_SMEM_128x128_BF16,
        ]
      : deep
        ? [
            cx.sm90Fprop === "early"
              ? KERNELS.gemm_sm90.gemm_sm90_fp8_grouped_128x128_e128_early
              : KERNELS.gemm_sm90.gemm_sm90_fp8_grouped_128x128_e128,
            SM90.SM90_SMEM_128x128_E128,
          ]
        : [KERNELS.gemm_sm90.gemm_sm90_fp8_grouped_128x128, SM90.SM90_SMEM_128x128];
  const bn = wide ? 256 : 128;
  const map = cx.n.cudaTensorMap2D;
  let maps: { tA: Uint8Array; tB: Uint8Array; tC: Uint8Array };
  try {
    maps = {
      tA: map(o.a, "u8", o.K, o.M, 128, SM90.SM90_BM),
      tB: map(o.b, "u8", o.K, o.E * o.N, 128, bn),
      tC: o.storeBf16 ? map(o.c, "bf16", o.N, o.M, 64, 64) : map(o.c, "f32", o.N, o.M, 32, 64),
    };
  } catch {
    // The driver refused a tensor map (its rules are the last word on them): the mma.sync kernels
    // take any GEMM of this layout. The op suite checks that the model's shapes do run here.
    return false;
  }
  cx.launch(
    kernel,
    [cx.sm90Ctas],
    SM90.SM90_THREADS,
    {
      ...maps,
      As: o.aScales,
      Bs: o.bScales,
      C: o.c,
      off: o.offsets,
      E: o.E,
      N: o.N,
      K: o.K,
      accumulate: o.accumulate ? 1 : 0,
      outMode: outMode(o),
      rows: o.M,
    },
    smem,
  );
  return true;
}

/**
 * sm90Grouped with an FP8 output (codes at o.c, scales at q.scales): the 5-stage entry's loop with
 * the quantising epilogue, for at most SM90_MAX_E_DEEP experts, N % 16 == 0 (the codes' TMA row
 * pitch), stored f32 values (not outBf16) and no accumulate; false (nothing enqueued) otherwise.
 */
function sm90GroupedQuantized(cx: CudaContext, o: Sm90Operands, q: Sm90QuantOut): boolean {
  if (o.accumulate || o.outBf16 || o.storeBf16 || o.N % 16 !== 0 || o.E > SM90.SM90_MAX_E_DEEP) return false;
  const map = cx.n.cudaTensorMap2D;
  let maps: { tA: Uint8Array; tB: Uint8Array; tC: Uint8Array };
  try {
    maps = {
      tA: map(o.a, "u8", o.K, o.M, 128, SM90.SM90_BM),
      tB: map(o.b, "u8", o.K, o.E * o.N, 128, 128),
      tC: map(o.c, "u8", o.N, o.M, 128, 64),
    };
  } catch {
    return false;
  }
  cx.launch(
    KERNELS.gemm_sm90.gemm_sm90_fp8_grouped_128x128_fp8out,
    [cx.sm90Ctas],
    SM90.SM90_THREADS,
    {
      ...maps,
      As: o.aScales,
      Bs: o.bScales,
      Q: o.c,
      Qs: q.scales,
      off: o.offsets,
      E: o.E,
      N: o.N,
      K: o.K,
      rows: o.M,
      qfmt: q.fmt,
      qmode: q.mode,
      qeps: q.eps,
    },
    SM90.SM90_SMEM_128x128_E128,
  );
  return true;
}

/** The experts' Wgrad: C[e] (+)= A_e^T B_e over each expert's rows (segments along K). */
export interface Sm90WgradOperands {
  /** dY [rows, M] and X [rows, N]: FP8 128x1 column tiles. */
  a: Tensor;
  b: Tensor;
  /**
   * The experts' offsets, equal to both operands' quant.segments (tiles restarted at each expert);
   * or, for unsegmented column tiles (a dense Wgrad), the device address of E + 1 offsets that are
   * multiples of 128 but the last (so each part is whole chunks of the dense tiling).
   */
  offsets: Tensor | number;
  /** [E, M, N] f32 (device address). */
  out: number;
  M: number;
  N: number;
  E: number;
  promotion: number;
  accumulate: boolean;
  outBf16: boolean;
}

/** Why these operands cannot take the sm90 Wgrad, or null when they can. */
export function sm90WgradRefusal(cx: CudaContext, o: Sm90WgradOperands): string | null {
  const qa = o.a.quant;
  const qb = o.b.quant;
  if (!qa || !qb) return "operands not quantised";
  if (qa.format !== "e4m3" || qb.format !== "e4m3") return "operands not E4M3 x E4M3";
  if (qa.group !== "column-tile" || qb.group !== "column-tile")
    return "not 128x1 column tiles on both operands";
  // The chunks of the transposed layout are quant_coltile's only when its tiles restart at each expert
  // (or, dense, run over all rows from row 0).
  if (typeof o.offsets === "number") {
    if (qa.segments || qb.segments) return "split offsets are for unsegmented column tiles";
  } else {
    const off = cx.p(o.offsets);
    if (!qa.segments || !qb.segments || cx.p(qa.segments) !== off || cx.p(qb.segments) !== off)
      return "column tiles not restarted at the experts' offsets";
  }
  if (o.promotion !== 128) return "promotion is not 128";
  if (o.M % 16 !== 0 || o.N % 16 !== 0) return "M or N % 16 != 0 (16-byte transposes)";
  if (o.E < 1 || o.E > SM90.SM90_MAX_E) return `E outside 1..${SM90.SM90_MAX_E}`;
  if (cdiv(o.a.rows, 128) + o.E > DEFINES.common.GRID_YZ_MAX) return "too many 128-row chunks";
  // 16-byte loads of the codes, bulk copies of the scale vectors, TMA stores of C.
  const ptr = (t: Tensor) => cx.kMajorBuf(t).ptr; // either layout
  if ([o.a, o.b, qa.scales, qb.scales].some((t) => ptr(t) % 16 !== 0) || o.out % 16 !== 0)
    return "an operand is not 16-byte aligned";
  return null;
}

/**
 * Enqueues the experts' Wgrad with gemm_sm90.cu when the GPU and the operands allow it: operands the
 * quantisers stored K-major (CudaContext.kMajor) as they are, others first transposed into K-major
 * chunks (sm90_coltile_transpose), then the wgmma kernel; returns false (nothing enqueued) otherwise.
 */
export function sm90Wgrad(cx: CudaContext, o: Sm90WgradOperands): boolean {
  if (!cx.sm90Gemm || sm90WgradRefusal(cx, o) !== null) return false;
  const { M, N, E } = o;
  const rows = o.a.rows;
  // Each expert's rows padded to whole chunks: at most ceil(rows / 128) + E chunks in all.
  const chunks = cdiv(rows, 128) + E;
  const off = typeof o.offsets === "number" ? o.offsets : cx.p(o.offsets);
  const scratch: DeviceBuffer[] = [];
  /** An operand's K-major codes and their pitch: as stored, or transposed into scratch. */
  const kMajor = (t: Tensor, cols: number): { ptr: number; pitch: number } | null => {
    const km = cx.kMajor.get(t);
    if (km) return { ptr: cx.kMajorBuf(t).ptr, pitch: km.pitch };
    const pitch = chunks * 128;
    const out = cx.scratch(cols * pitch);
    scratch.push(out);
    if (out.ptr % 16 !== 0) return null;
    cx.launch(KERNELS.gemm_sm90.sm90_coltile_transpose, [cdiv(cols, SM90.SM90_TP_COLS), chunks], 256, {
      q: cx.p(t),
      out: out.ptr,
      off,
      E,
      rows,
      cols,
      pitch,
    });
    return { ptr: out.ptr, pitch };
  };
  try {
    const entry = wgradEntry(cx, N);
    const map = cx.n.cudaTensorMap2D;
    let maps: { tA: Uint8Array; tB: Uint8Array; tC: Uint8Array };
    try {
      // (A refusal after a transpose was enqueued leaves nothing wrong: it wrote only scratch.)
      // C's box: 32 columns by 64 rows, a warpgroup's strip.
      const tC = map(o.out, "f32", N, E * M, 32, 64);
      const [at, bt] = [kMajor(o.a, M), kMajor(o.b, N)];
      if (!at || !bt) return false;
      maps = {
        tA: map(at.ptr, "u8", at.pitch, M, 128, SM90.SM90_BM),
        tB: map(bt.ptr, "u8", bt.pitch, N, 128, entry.bn),
        tC,
      };
    } catch {
      return false; // the driver refused a map: the mma.sync kernel takes it (see sm90Grouped)
    }
    cx.launch(
      entry.kernel,
      [cx.sm90Ctas],
      SM90.SM90_THREADS,
      {
        ...maps,
        As: cx.p(o.a.quant!.scales),
        Bs: cx.p(o.b.quant!.scales),
        C: o.out,
        off,
        E,
        M,
        N,
        accumulate: o.accumulate ? 1 : 0,
        outMode: outMode(o),
        sorted: cx.sm90WgradOrder === "sorted" ? 1 : 0,
      },
      entry.smem,
    );
    return true;
  } finally {
    for (const b of scratch) b.free();
  }
}

/**
 * The Wgrad entry (kernel, tile width, dynamic shared memory): 128 x 256 tiles (one buffer) for
 * N >= 256, else 128 x 128 (two buffers), unless MOE8_SM90_WGRAD_BN forces one; the 128 x 256 entry
 * by where it takes the scales from and how it stores (CudaContext.sm90WgradScales).
 */
function wgradEntry(cx: CudaContext, N: number) {
  const k = KERNELS.gemm_sm90;
  const scales = cx.sm90WgradScales;
  const wide = cx.sm90WgradBn ? cx.sm90WgradBn === 256 : N >= 256;
  if (!wide) return { kernel: k.gemm_sm90_fp8_wgrad_128x128, bn: 128, smem: SM90.SM90_SMEM_WGRAD_128x128 };
  const kernel = {
    staged: k.gemm_sm90_fp8_wgrad_128x256_staged,
    checked: k.gemm_sm90_fp8_wgrad_128x256_staged_checked,
    halves: k.gemm_sm90_fp8_wgrad_128x256_halves,
    turns: k.gemm_sm90_fp8_wgrad_128x256_turns,
    lean: k.gemm_sm90_fp8_wgrad_128x256_lean,
    loaded: cx.sm90Pingpong ? k.gemm_sm90_fp8_wgrad_128x256_pingpong : k.gemm_sm90_fp8_wgrad_128x256,
  }[scales];
  const smem = scales === "loaded" ? SM90.SM90_SMEM_WGRAD_128x256 : SM90.SM90_SMEM_WGRAD_128x256_STAGED;
  return { kernel, bn: 256, smem };
}

// --- Dense FP8 GEMMs on the grouped kernels ------------------------------------------------------

/** MOE8_SM90_DENSE: which dense FP8 GEMMs take the sm90 kernels (see CudaContext.sm90Dense). */
export type Sm90DenseMode = "auto" | "all" | "none";

export function sm90DenseMode(value: string | undefined): Sm90DenseMode {
  if (value === undefined || value === "" || value === "auto") return "auto";
  if (value === "all" || value === "none") return value;
  throw new Error(`MOE8_SM90_DENSE="${value}": expected auto, all or none`);
}

export type DenseRole = "fprop" | "dgrad" | "wgrad";

/** The role a dense FP8 operand pair plays, in the layouts the sm90 kernels take, or null. */
function denseRole(a: Tensor, b: Tensor, transA: boolean, transB: boolean): DenseRole | null {
  const [qa, qb] = [a.quant, b.quant];
  if (!qa || !qb) return null;
  if (!transA && qa.group === "tile" && qb.group === "block") return transB ? "fprop" : "dgrad";
  if (transA && !transB && qa.group === "column-tile" && qb.group === "column-tile") return "wgrad";
  return null;
}

/**
 * `auto`: where the sm90 kernels beat cuBLASLt's block-scaled FP8 at small's dense shapes, from
 * `bun run bench gemm --backend cuda` on the H200 (packages/kernels/notes/sm90-gemm.md, "Dense FP8
 * roles" and "K-major column tiles"): Fprop 1.0-1.7x and Dgrad 1.1-4.2x cuBLASLt's TFLOP/s at every
 * shape, so always. Wgrad: since the quantisers write the column tiles K-major, cuBLASLt reads them
 * without transposes and beat the split sm90 Wgrad (wgradSplit) at every shape but those in
 * SM90_WGRAD (1.2-1.7x); it needs the tokens (`tokens`, the Wgrad's K) a multiple of 128, else the
 * sm90 Wgrad runs. M x N: the role's output.
 */
export function sm90DenseChosen(role: DenseRole, M: number, N: number, tokens: number): boolean {
  if (role !== "wgrad") return true;
  return tokens % 128 !== 0 || SM90_WGRAD.some(([m, n]) => m === M && n === N);
}

/**
 * Wgrad outputs [M, N] (the weight's [out, in]) where the split sm90 Wgrad beat cuBLASLt's FP8 one
 * with K-major operands: the dense MLP's down_proj of small, 1024 x 2816 (638 against 534 TFLOP/s).
 */
const SM90_WGRAD: readonly (readonly [number, number])[] = [[1024, 2816]];

/** What `auto` picks, in words (doctor). */
const SM90_DENSE_AUTO =
  "Fprop, Dgrad, and the Wgrads it measured faster at (split along K; cuBLASLt for the others)";

/**
 * A dense FP8 GEMM (Fprop x W^T, Dgrad dy W, Wgrad dy^T x) on the grouped kernels as one group of
 * all M rows, when the GPU, the mode and the operands allow it; false (nothing enqueued) otherwise,
 * and the caller goes on to cuBLASLt or the tiled kernels.
 */
export function sm90Matmul(
  cx: CudaContext,
  a: Tensor,
  b: Tensor,
  out: Tensor,
  { M, N, K }: { M: number; N: number; K: number },
  o: MatmulOptions,
  quantized?: Sm90QuantOut,
): boolean {
  if (!cx.sm90Gemm || cx.sm90Dense === "none") return false;
  const role = denseRole(a, b, !!o.transA, !!o.transB);
  if (!role || (cx.sm90Dense === "auto" && !sm90DenseChosen(role, M, N, K))) return false;
  const promotion = o.promotion ?? 128;
  const [accumulate, outBf16] = [!!o.accumulate, !!o.outBf16];
  // BF16 storage (a bf16 `out`): Fprop only, where the Linear stores its output so.
  const storeBf16 = out.dtype === "bf16";
  if (storeBf16 && (role !== "fprop" || accumulate)) return false;
  // An FP8 output (`out` holds its codes): Fprop and Dgrad, quantised in the epilogue.
  if (quantized && (role === "wgrad" || accumulate || outBf16)) return false;
  if (role === "wgrad")
    return sm90DenseWgrad(cx, {
      a,
      b,
      offsets: 0,
      out: cx.p(out),
      M,
      N,
      E: 1,
      promotion,
      accumulate,
      outBf16,
    });
  const [qa, qb] = [a.quant!, b.quant!];
  const operands: Sm90Operands = {
    a: cx.p(a),
    aScales: cx.p(qa.scales),
    aFormat: qa.format,
    aGroup: qa.group,
    b: cx.p(b),
    bScales: cx.p(qb.scales),
    bFormat: qb.format,
    bGroup: qb.group,
    c: cx.p(out),
    offsets: cx.segmentsOf(M, M),
    M,
    N,
    K,
    E: 1,
    promotion,
    accumulate,
    outBf16,
    storeBf16,
    storeQuantized: quantized,
  };
  if (sm90Refusal(operands) !== null) return false;
  if (role === "fprop") return sm90Grouped(cx, operands);
  // Dgrad: W [K, N] (stored [out, in]) transposed to [N, K], so that both operands are K-contiguous.
  const t = transposedOf(cx, b, operands.b, operands.bScales, K, N);
  try {
    return sm90Grouped(cx, { ...operands, b: t.codes, bScales: t.scales });
  } finally {
    t.free();
  }
}

/**
 * How many parts a dense Wgrad over `rows` tokens is split into along K: its M x N output has few
 * tiles (e.g. 32 of 128 x 256 for 1024 x 1024) for 132 SMs, so each part of whole 128-token chunks
 * runs as one "expert" of the grouped Wgrad and the parts are summed after. About two tiles per SM
 * in all, at least 4 chunks per part.
 */
function wgradSplit(multiprocessors: number, rows: number, M: number, N: number): number {
  const tiles = cdiv(M, 128) * cdiv(N, N >= 256 ? 256 : 128);
  const chunks = cdiv(rows, 128);
  return Math.max(1, Math.min(Math.floor(chunks / 4), Math.round((2 * multiprocessors) / tiles)));
}

/**
 * A dense Wgrad, C (+)= A^T B over all rows, on the grouped Wgrad: split along K into parts of whole
 * chunks written to scratch [S, M, N], then summed in order into C (sum_slices_f32: deterministic).
 */
function sm90DenseWgrad(cx: CudaContext, o: Sm90WgradOperands): boolean {
  const rows = o.a.rows;
  const parts = wgradSplit(cx.multiprocessors, rows, o.M, o.N);
  const perPart = cdiv(cdiv(rows, 128), parts) * 128;
  const S = cdiv(rows, perPart);
  if (S <= 1) return sm90Wgrad(cx, { ...o, offsets: cx.segmentsOf(rows, rows) });
  const n = o.M * o.N;
  const scratch = cx.scratch(S * n * 4);
  try {
    const offsets = cx.segmentsOf(rows, perPart);
    const ok = sm90Wgrad(cx, { ...o, offsets, out: scratch.ptr, E: S, accumulate: false, outBf16: false });
    if (ok)
      cx.launch(KERNELS.elementwise.sum_slices_f32, cx.g1(n), 256, {
        parts: scratch.ptr,
        S,
        out: o.out,
        accumulate: o.accumulate ? 1 : 0,
        roundBf16: o.outBf16 ? 1 : 0,
        n,
      });
    return ok;
  } finally {
    scratch.free();
  }
}
