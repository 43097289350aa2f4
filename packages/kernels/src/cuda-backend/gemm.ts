// GEMMs, plain and grouped over expert segments: cuBLASLt where it has the case (gemm-lt.ts), the
// Hopper wgmma kernels for the experts' FP8 Fprop, Dgrad and Wgrad on sm_90 (gemm-sm90.ts), otherwise the
// tiled kernels of gemm.cu (any layout; FP8 on tensor cores or in the reference kernel) and
// gemm16.cu (BF16 on tensor cores). Expert offsets stay on the device (docs/runtime.md rule 2).
import {
  BYTES_PER_ELEMENT,
  batchDims,
  type GroupedMatmulOptions,
  gemmDims,
  groupedMatmulQuantizedVia,
  isFp8,
  type MatmulOptions,
  matmulQuantizedVia,
  type QuantizeOptions,
  storeBf16Error,
  type Tensor,
} from "@moe8/tensor";
import { DEFINES } from "../cuda/kernels.generated.ts";
import { type CudaContext, cdiv, KERNELS } from "./context.ts";
import { bf16Operand, f32Operand, lowpInput } from "./elementwise.ts";
import { matmulLt } from "./gemm-lt.ts";
import { type Sm90QuantOut, sm90Grouped, sm90Matmul, sm90Wgrad } from "./gemm-sm90.ts";
import { FMT, GROUP, quantOutput, rowMajorCodes, transposedOf } from "./quant.ts";

const { GEMM_PLAIN, GEMM_SEGMENT_M, GEMM_SEGMENT_K } = DEFINES.common;

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

function output(cx: CudaContext, M: number, N: number, o: MatmulOptions, shape: number[] = [M, N]): Tensor {
  if (o.accumulate) {
    if (o.accumulate.size !== M * N || o.accumulate.dtype !== "f32")
      throw new Error(`matmul: accumulate has shape [${o.accumulate.shape}], want [${shape}]`);
    return o.accumulate;
  }
  return cx.make(shape, "f32");
}

export function matmul(cx: CudaContext, a: Tensor, b: Tensor, opts: MatmulOptions): Tensor {
  const bad = storeBf16Error(opts);
  if (bad) throw new Error(bad);
  if (opts.storeQuantized) return matmulQuantizedOut(cx, a, b, opts, opts.storeQuantized);
  if (opts.storeBf16) return matmulBf16Out(cx, a, b, opts);
  const o = opts;
  const { M, N, K } = gemmDims(a, b, o);
  const transA = !!o.transA;
  const transB = !!o.transB;
  if (o.precision === "fp8") {
    checkFp8Operand(a, "A", !transA);
    checkFp8Operand(b, "B", transB);
  } else if (o.precision === "bf16") {
    lowpInput(cx, a, "matmul");
    lowpInput(cx, b, "matmul");
  } else {
    cx.f32p(a, "matmul");
    cx.f32p(b, "matmul");
  }
  const out = output(cx, M, N, o);
  if (M === 0 || N === 0) return out;
  if (K > 0 && o.precision === "fp8" && sm90Matmul(cx, a, b, out, { M, N, K }, o)) return out;
  if (K > 0 && matmulLt(cx, a, b, out, M, N, K, o)) return out;
  gemmKernel(cx, a, b, out, { M, N, K }, o, { mode: GEMM_PLAIN, offsets: null, E: 0, bRows: 0, bCols: 0 });
  return out;
}

/**
 * matmul with storeBf16: cuBLASLt writes the BF16 output itself (f32 and BF16 products: its epilogue
 * rounds to nearest even, as round_bf16 does), and so does the sm90 kernel for an FP8 Fprop (the
 * shared experts' gate|up); any other path computes the BF16-rounded f32 product and converts it.
 */
function matmulBf16Out(cx: CudaContext, a: Tensor, b: Tensor, opts: MatmulOptions): Tensor {
  const o = { ...opts, outBf16: true, storeBf16: false };
  const { M, N, K } = gemmDims(a, b, o);
  if (o.precision === "fp8" && M > 0 && N > 0 && K > 0) {
    checkFp8Operand(a, "A", !o.transA);
    checkFp8Operand(b, "B", !!o.transB);
    const out = cx.make([M, N], "bf16");
    if (sm90Matmul(cx, a, b, out, { M, N, K }, o)) return out;
    cx.release(out);
  }
  if (o.precision !== "fp8" && M > 0 && N > 0 && K > 0) {
    for (const t of [a, b]) {
      if (o.precision === "bf16") lowpInput(cx, t, "matmul");
      else cx.f32p(t, "matmul");
    }
    const out = cx.make([M, N], "bf16");
    if (matmulLt(cx, a, b, out, M, N, K, o)) return out;
    cx.release(out);
  }
  const y = matmul(cx, a, b, o);
  const y16 = cx.backend.cast(y, "bf16");
  cx.release(y);
  return y16;
}

/**
 * The output of a GEMM with storeQuantized: made by quantOutput, with the kernel's fmt / mode / eps
 * codes, when the sm90 epilogue can write it (an FP8 GEMM storing f32 values, 1x128 tiles on a
 * Hopper GPU); null when the GEMM must run in f32 and be quantised after.
 */
function quantizedTarget(
  cx: CudaContext,
  o: MatmulOptions,
  q: QuantizeOptions,
  M: number,
  N: number,
): { y: Tensor; out: Sm90QuantOut } | null {
  // (Power-of-two scales divide each value: quantised after the product, as the fused producers do.)
  if (!cx.sm90Gemm || o.precision !== "fp8" || o.outBf16 || q.group !== "tile" || q.segments || q.pow2Scales)
    return null;
  if (M === 0 || N === 0 || N % 16 !== 0) return null;
  const { q: y, fmt, mode, eps } = quantOutput(cx, [M, N], q);
  return { y, out: { scales: cx.p(y.quant!.scales), fmt, mode, eps } };
}

/**
 * matmul with storeQuantized: on sm_90 the wgmma kernel quantises an FP8 Fprop's or Dgrad's product
 * in its epilogue (the same f32 values as its f32 output, the same qscale / quant_value as
 * quant_tile128: quantize(product) bit for bit); any other GEMM computes the product, then quantises.
 */
function matmulQuantizedOut(
  cx: CudaContext,
  a: Tensor,
  b: Tensor,
  opts: MatmulOptions,
  q: QuantizeOptions,
): Tensor {
  const o = { ...opts, storeQuantized: undefined };
  const { M, N, K } = gemmDims(a, b, o);
  const target = K > 0 ? quantizedTarget(cx, o, q, M, N) : null;
  if (target) {
    checkFp8Operand(a, "A", !o.transA);
    checkFp8Operand(b, "B", !!o.transB);
    if (sm90Matmul(cx, a, b, target.y, { M, N, K }, o, target.out)) return target.y;
    cx.release(target.y);
  }
  return matmulQuantizedVia(cx.backend, a, b, opts);
}

/**
 * groupedMatmul (segments along M) with storeQuantized: the experts' Fprop (B [E, N, K]) or Dgrad
 * (B [E, K, N], its codes transposed first) quantised in the sm90 epilogue, as matmulQuantizedOut;
 * otherwise the product, then quantize.
 */
function groupedQuantizedOut(
  cx: CudaContext,
  a: Tensor,
  b: Tensor,
  offsets: Tensor,
  opts: GroupedMatmulOptions,
  q: QuantizeOptions,
  { M, N, K, E }: { M: number; N: number; K: number; E: number },
): Tensor {
  const o = { ...opts, storeQuantized: undefined };
  const target = K > 0 && E > 0 ? quantizedTarget(cx, o, q, M, N) : null;
  const [qa, qb] = [a.quant, b.quant];
  // (The kernel's operands, as sm90Refusal asks; the transpose below only for those.)
  if (target && qa?.group === "tile" && qb?.group === "block" && K % 16 === 0) {
    const bd = batchDims(b);
    const t = o.transB ? null : transposedOf(cx, b, cx.p(b), cx.p(qb.scales), bd.rows, bd.cols, E);
    const done = sm90Grouped(cx, {
      a: cx.p(a),
      aScales: cx.p(qa.scales),
      aFormat: qa.format,
      aGroup: qa.group,
      b: t ? t.codes : cx.p(b),
      bScales: t ? t.scales : cx.p(qb.scales),
      bFormat: qb.format,
      bGroup: qb.group,
      c: cx.p(target.y),
      offsets: cx.i32p(offsets, "groupedMatmul offsets"),
      M,
      N,
      K,
      E,
      promotion: o.promotion ?? 128,
      accumulate: false,
      outBf16: false,
      storeQuantized: target.out,
    });
    t?.free();
    if (done) return target.y;
  }
  if (target) cx.release(target.y);
  return groupedMatmulQuantizedVia(cx.backend, a, b, offsets, opts);
}

export function groupedMatmul(
  cx: CudaContext,
  a: Tensor,
  b: Tensor,
  offsets: Tensor,
  o: GroupedMatmulOptions,
): Tensor {
  const bad = storeBf16Error(o);
  if (bad) throw new Error(bad);
  const E = offsets.size - 1;
  const fp8 = o.precision === "fp8";
  for (const t of fp8 ? [] : [a, b]) {
    if (o.precision === "bf16") lowpInput(cx, t, "groupedMatmul");
    else cx.f32p(t, "groupedMatmul");
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
    if (o.storeQuantized)
      return groupedQuantizedOut(cx, a, b, offsets, o, o.storeQuantized, { M: Mt, N, K, E });
    // BF16 storage: the sm90 kernel writes it; the other kernels write f32 that is then converted.
    const out = o.storeBf16 ? cx.make([Mt, N], "bf16") : output(cx, Mt, N, o, [Mt, N]);
    // Rows outside the segments read 0: cleared here, or by the sm90 kernel itself (FP8 on Hopper).
    const zeroLater = fp8 && cx.sm90Gemm && !o.accumulate && Mt > 0 && N > 0 && E > 0;
    if (!o.accumulate && !zeroLater)
      cx.n.cudaMemset8(cx.buf(out), 0, 0, Mt * N * BYTES_PER_ELEMENT[out.dtype]);
    if (Mt === 0 || N === 0 || E <= 0) return out;
    gemmKernel(cx, a, b, out, { M: Mt, N, K }, o, {
      mode: GEMM_SEGMENT_M,
      offsets,
      E,
      bRows: bd.rows,
      bCols: bd.cols,
      zeroOutput: zeroLater,
    });
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
  const out = output(cx, E * M * N, 1, o, [E, M, N]);
  if (E <= 0 || M === 0 || N === 0) return out;
  const promotion = o.promotion ?? 128;
  // Into a gradient that holds zeros (accumulateZero) the sm90 Wgrad writes: it stores every tile
  // of [E, M, N], so nothing of the tensor is left unwritten.
  const [accumulate, outBf16] = [!!o.accumulate && !o.accumulateZero, !!o.outBf16];
  if (fp8 && sm90Wgrad(cx, { a, b, offsets, out: cx.p(out), M, N, E, promotion, accumulate, outBf16 }))
    return out;
  gemmKernel(cx, a, b, out, { M, N, K: a.rows }, o, { mode: GEMM_SEGMENT_K, offsets, E, bRows: 0, bCols: 0 });
  return out;
}

/**
 * A GEMM whose kernels write f32 into `out`, a bf16 tensor: `run` fills an f32 scratch tensor
 * (cleared first: rows outside the segments must read 0), then one conversion writes `out`.
 */
function viaF32(cx: CudaContext, out: Tensor, run: (tmp: Tensor) => void): void {
  const tmp = cx.make(out.shape, "f32");
  cx.n.cudaMemset8(cx.buf(tmp), 0, 0, tmp.size * 4);
  run(tmp);
  cx.launch(KERNELS.elementwise.f32_to_bf16, cx.g1(tmp.size), 256, {
    x: cx.p(tmp),
    out: cx.p(out),
    n: tmp.size,
  });
  cx.release(tmp);
}

/**
 * How a tiled GEMM is grouped (common.cuh's codes): GEMM_PLAIN one product; GEMM_SEGMENT_M rows of A
 * and C split by the experts' offsets, B holding E matrices of bRows x bCols; GEMM_SEGMENT_K
 * C[e] = A_e^T B_e.
 */
interface Grouping {
  mode: typeof GEMM_PLAIN | typeof GEMM_SEGMENT_M | typeof GEMM_SEGMENT_K;
  offsets: Tensor | null;
  E: number;
  bRows: number;
  bCols: number;
  /** C still needs clearing unless the sm90 kernel takes the GEMM (it zeroes the uncovered rows). */
  zeroOutput?: boolean;
}

/** The tiled kernels (any layout, plain or grouped): gemm.cu, and gemm16.cu for BF16. */
function gemmKernel(
  cx: CudaContext,
  a: Tensor,
  b: Tensor,
  out: Tensor,
  { M, N, K }: { M: number; N: number; K: number },
  o: MatmulOptions,
  grouping: Grouping,
): void {
  const { mode, offsets, E, bRows, bCols, zeroOutput } = grouping;
  if (out.dtype === "bf16" && !(o.precision === "fp8" && cx.sm90Gemm)) {
    viaF32(cx, out, (tmp) => gemmKernel(cx, a, b, tmp, { M, N, K }, { ...o, outBf16: true }, grouping));
    return;
  }
  const aKcols = o.transA ? 0 : 1;
  let bKcols: 0 | 1 = o.transB ? 1 : 0;
  // Tiles of C: segments along M enumerate the row tiles of every expert (at most one partial each).
  const gridFor = (bm: number, bn: number): [number, number, number] => [
    cdiv(N, bn),
    mode === GEMM_SEGMENT_M ? cdiv(M, bm) + E : cdiv(M, bm),
    mode === GEMM_SEGMENT_K ? E : 1,
  ];
  const grid = gridFor(DEFINES.gemm.BM, DEFINES.gemm.BN);
  const off = offsets ? cx.i32p(offsets, "groupedMatmul offsets") : 0;
  // B's matrix shape per expert as the kernel reads it (swapped when B is transposed below).
  let [bR, bC] = [bRows, bCols];
  // The arguments every gemm.cu and gemm16.cu kernel ends with: C, sizes, expert segments, output.
  const tail = () => ({
    C: cx.p(out),
    M,
    N,
    K,
    mode,
    off,
    E,
    bRows: bR,
    bCols: bC,
    accumulate: o.accumulate ? 1 : 0,
    outBf16: o.outBf16 ? 1 : 0,
  });
  if (o.precision === "fp8") {
    const qa = a.quant!;
    const qb = b.quant!;
    const promotion = o.promotion ?? 128;
    if (!(Number.isInteger(promotion) && promotion > 0))
      throw new Error(`scaledMatmul: promotion must be a positive integer (got ${promotion})`);
    const mma = cx.useTensorCores && promotion === 128;
    // Column tiles stored K-major for the sm90 Wgrad reach these kernels in their row-major form.
    const [ac, bc] = [rowMajorCodes(cx, a), rowMajorCodes(cx, b)];
    const aPtr = ac.ptr;
    let bPtr = bc.ptr;
    let bScales = cx.p(qb.scales);
    const tmps: { free: () => void }[] = [ac, bc];
    if (mma && mode === GEMM_SEGMENT_M && aKcols && !bKcols && qb.group === "block" && K % 16 === 0) {
      // Dgrad of the experts: transpose each expert's FP8 weight (codes and block scales, exact)
      // so that both operands are K-contiguous for the TN kernel.
      const t = transposedOf(cx, b, bPtr, bScales, bRows, bCols, E);
      tmps.push(t);
      [bPtr, bScales, bKcols, bR, bC] = [t.codes, t.scales, 1, bCols, bRows];
    }
    // Both operands K-contiguous (Fprop, expert Dgrad), or both [K, rows] (Wgrad, tokens as K).
    const tn = aKcols && bKcols && K % 16 === 0;
    const tt = !aKcols && !bKcols && M % 16 === 0 && N % 16 === 0;
    // The experts' Fprop and Dgrad on sm_90: the wgmma kernels when the operands fit them.
    const onSm90 =
      mma &&
      tn &&
      mode === GEMM_SEGMENT_M &&
      sm90Grouped(cx, {
        a: aPtr,
        aScales: cx.p(qa.scales),
        aFormat: qa.format,
        aGroup: qa.group,
        b: bPtr,
        bScales,
        bFormat: qb.format,
        bGroup: qb.group,
        c: cx.p(out),
        offsets: off,
        M,
        N,
        K,
        E,
        promotion,
        accumulate: !!o.accumulate,
        outBf16: !!o.outBf16,
        storeBf16: out.dtype === "bf16",
      });
    if (onSm90 || out.dtype === "bf16") for (const t of tmps) t.free();
    if (onSm90) return;
    if (out.dtype === "bf16") {
      // The sm90 kernel could not take it after all: f32 from the other kernels, then BF16.
      viaF32(cx, out, (tmp) => gemmKernel(cx, a, b, tmp, { M, N, K }, { ...o, outBf16: true }, grouping));
      return;
    }
    if (zeroOutput) cx.n.cudaMemset8(cx.buf(out), 0, 0, M * N * 4);
    if (mma && (tn || tt) && aPtr % 16 === 0 && bPtr % 16 === 0) {
      const layout = tn ? "tn" : "tt";
      cx.launch(KERNELS.gemm[`gemm_fp8_${layout}_${qa.format}_${qb.format}`], grid, 128, {
        A: aPtr,
        As: cx.p(qa.scales),
        ga: GROUP[qa.group],
        B: bPtr,
        Bs: bScales,
        gb: GROUP[qb.group],
        ...tail(),
      });
    } else {
      // Any layout: gemm_fp8_mma on tensor cores (promotion 128), gemm_fp8 for any promotion.
      const operands = {
        A: aPtr,
        As: cx.p(qa.scales),
        ga: GROUP[qa.group],
        fa: FMT[qa.format],
        aKcols,
        B: bPtr,
        Bs: bScales,
        gb: GROUP[qb.group],
        fb: FMT[qb.format],
        bKcols,
      };
      if (mma) cx.launch(KERNELS.gemm.gemm_fp8_mma, grid, 128, { ...operands, ...tail() });
      else cx.launch(KERNELS.gemm.gemm_fp8, grid, 256, { ...operands, ...tail(), promotion });
    }
    for (const t of tmps) t.free(); // after the kernels that read the transposed weight
    return;
  }
  const bf16 = o.precision === "bf16";
  // gemm16.cu: BF16 copies of both operands, 16-byte pieces along each operand's contiguous axis.
  const pieces = (kc: number, rows: number) => (kc ? K : rows) % 8 === 0;
  if (bf16 && cx.useTensorCores && pieces(aKcols, M) && pieces(bKcols, N)) {
    const [ab, bb] = [a, b].map((t) => bf16Operand(cx, t, "matmul bf16"));
    const g16 = DEFINES.gemm16;
    cx.launch(
      KERNELS.gemm16[`gemm_bf16_tc_${aKcols}${bKcols}`],
      gridFor(g16.G16_BM, g16.G16_BN),
      256,
      { A: ab.ptr, B: bb.ptr, ...tail() },
      g16.G16_SMEM_BYTES,
    );
    ab.free();
    bb.free();
    return;
  }
  // f32 copies of bf16 inputs; gemm_bf16_mma rounds the operands to BF16 on tensor cores, gemm_f32
  // rounds them when inBf16 = 1.
  const [af, bf] = [a, b].map((t) => f32Operand(cx, t, "matmul"));
  const operands = { A: af.ptr, aKcols, B: bf.ptr, bKcols };
  if (bf16 && cx.useTensorCores) cx.launch(KERNELS.gemm.gemm_bf16_mma, grid, 128, { ...operands, ...tail() });
  else cx.launch(KERNELS.gemm.gemm_f32, grid, 256, { ...operands, ...tail(), inBf16: bf16 ? 1 : 0 });
  af.free();
  bf.free();
}
