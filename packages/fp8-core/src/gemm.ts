// Reference GEMMs: C[M,N] = sum_k A[m,k] B[k,n], the FP8 one with DeepSeek-V3's promotion scheme
// (docs/numerics.md, "Scaled GEMMs and promotion") and plain f32/BF16/f64 ones to compare with.
// Written for clarity and exact, reproducible rounding, not speed: every f32 operation is an
// explicit Math.fround.

import { decodeFp8, type Fp8Format, roundBf16 } from "./formats.ts";
import { GROUP_SIZE, groupIndexer, type QuantGroup, scaleShape } from "./quantize.ts";

/**
 * A quantised matrix as stored: `rows` x `cols`, row-major, with its group scales. As operand A it
 * is [M, K], or with `trans` [K, M]; as operand B it is [K, N], or with `trans` [N, K].
 */
export interface QuantizedOperand {
  data: Uint8Array;
  scales: Float32Array;
  rows: number;
  cols: number;
  group: QuantGroup;
  format: Fp8Format;
  trans?: boolean;
}

export type Accumulator = "f32" | "tc14";

export interface ScaledMatmulOptions {
  /**
   * Promotion interval N_C: every `promotion` elements of K (chunks aligned at k = 0) the partial sum
   * is scaled and added into the f32 accumulator. Default 128 with the f32 accumulator and
   * Infinity (never: one chunk spanning all of K) with `tc14`.
   */
  promotion?: number;
  /**
   * How a chunk's partial sum is kept. `f32`: rounded to f32 after each add. `tc14`: emulates the
   * H800 tensor core the DeepSeek-V3 report measured, keeping 14 significant bits after each add,
   * truncated toward zero.
   */
  accumulator?: Accumulator;
}

/** Significant bits the emulated tensor-core accumulator keeps. */
export const TC_ACCUMULATOR_BITS = 14;

// Scratch for truncating a double's significand through its bits (high word index by endianness).
const scratchF64 = new Float64Array(1);
const scratchWords = new Uint32Array(scratchF64.buffer);
const HIGH_WORD = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1 ? 1 : 0;

/** `x` with only its top `bits` significant bits (1 <= bits <= 21), truncated toward zero. */
export function truncateSignificand(x: number, bits: number = TC_ACCUMULATOR_BITS): number {
  scratchF64[0] = x;
  scratchWords[1 - HIGH_WORD] = 0; // the low 32 of the 52 mantissa bits
  const dropHigh = 21 - bits; // the high word holds 20 mantissa bits + the implicit one = 21
  scratchWords[HIGH_WORD] &= ~((1 << dropHigh) - 1);
  return scratchF64[0];
}

/**
 * How an operand's scales vary along K. `whole`: constant over all of K (row/tensor groups seen
 * along their rows' length); `aligned`: constant over each 128-long stretch of K starting at k = 0.
 * Anything else cannot be a GEMM operand: its scale would change inside a promotion chunk.
 */
type KScaling = "whole" | "aligned";

const ALONG_COLS: Record<QuantGroup, KScaling | null> = {
  tile: "aligned",
  block: "aligned",
  row: "whole",
  tensor: "whole",
  "column-tile": null,
};
const ALONG_ROWS: Record<QuantGroup, KScaling | null> = {
  "column-tile": "aligned",
  block: "aligned",
  tensor: "whole",
  tile: null,
  row: null,
};

/** An operand in the logical layout the loop wants: values[i * K + k], scales per (i, k / 128). */
interface PreparedOperand {
  /** Decoded FP8 values (unscaled), [I, K] row-major where I is M (for A) or N (for B). */
  values: Float32Array;
  /** scales[i * kGroups + floor(k / 128)]. */
  scales: Float32Array;
  kScaling: KScaling;
}

function prepare(op: QuantizedOperand, kAlongCols: boolean, name: string): PreparedOperand {
  const { rows, cols, group } = op;
  if (op.data.length !== rows * cols)
    throw new Error(`scaledMatmul: operand ${name} has ${op.data.length} values, expected ${rows}x${cols}`);
  const [sr, sc] = scaleShape(rows, cols, group);
  if (op.scales.length !== sr * sc)
    throw new Error(
      `scaledMatmul: operand ${name} has ${op.scales.length} scales, expected ${sr * sc} for group ${group}`,
    );
  const kScaling = (kAlongCols ? ALONG_COLS : ALONG_ROWS)[group];
  if (!kScaling) {
    const stored = kAlongCols ? "with K along its columns" : "with K along its rows";
    const allowed = kAlongCols ? "tile, block, row, tensor" : "column-tile, block, tensor";
    throw new Error(
      `scaledMatmul: operand ${name} stored ${stored} cannot use group "${group}": its scale would vary inside a K chunk (allowed: ${allowed})`,
    );
  }
  const K = kAlongCols ? cols : rows;
  const I = kAlongCols ? rows : cols;
  const decoded = decodeFp8(op.data, op.format);
  const values = new Float32Array(I * K);
  for (let i = 0; i < I; i++)
    for (let k = 0; k < K; k++) values[i * K + k] = decoded[kAlongCols ? i * cols + k : k * cols + i];
  const kGroups = Math.ceil(K / GROUP_SIZE);
  const { rowPart, colPart } = groupIndexer(group, rows, cols);
  const scales = new Float32Array(I * kGroups);
  for (let i = 0; i < I; i++)
    for (let g = 0; g < kGroups; g++) {
      const k = g * GROUP_SIZE;
      scales[i * kGroups + g] = op.scales[kAlongCols ? rowPart[i] + colPart[k] : rowPart[k] + colPart[i]];
    }
  return { values, scales, kScaling };
}

/**
 * C = A B over quantised operands, returned as f32 [M, N].
 *
 * Per output element, K is cut into chunks of `promotion` elements. Within a chunk the products of
 * decoded FP8 values (exact in f32) are summed in the chosen accumulator; at the chunk's end the
 * partial sum is promoted: acc = f32(acc + f32(f32(partial * scaleA) * scaleB)).
 *
 * Scales can be factored out of a chunk only when neither operand's scale changes inside it (always
 * so for chunks of at most 128 that divide 128, the recipe). When a chunk spans several 128-groups
 * (promotion > 128, or no promotion with tile/block scales), each product is scaled before it is
 * accumulated instead, f32(f32(a * b * scaleA) * scaleB), since there is no single scale to apply.
 */
export function scaledMatmul(
  a: QuantizedOperand,
  b: QuantizedOperand,
  opts: ScaledMatmulOptions = {},
): Float32Array {
  const accumulator = opts.accumulator ?? "f32";
  if (accumulator !== "f32" && accumulator !== "tc14")
    throw new Error(`scaledMatmul: unknown accumulator "${accumulator}" (allowed: f32, tc14)`);
  const promotion = opts.promotion ?? (accumulator === "tc14" ? Number.POSITIVE_INFINITY : GROUP_SIZE);
  if (!(promotion === Number.POSITIVE_INFINITY || (Number.isInteger(promotion) && promotion > 0)))
    throw new Error(`scaledMatmul: promotion must be a positive integer or Infinity (got ${promotion})`);

  const M = a.trans ? a.cols : a.rows;
  const K = a.trans ? a.rows : a.cols;
  const kB = b.trans ? b.cols : b.rows;
  const N = b.trans ? b.rows : b.cols;
  if (K !== kB)
    throw new Error(`scaledMatmul: inner dimensions differ (A gives K = ${K}, B gives K = ${kB})`);
  const A = prepare(a, !a.trans, "A");
  const B = prepare(b, !!b.trans, "B");
  const kGroups = Math.ceil(K / GROUP_SIZE);
  const chunk = Math.min(promotion, Math.max(K, 1));
  const round = accumulator === "f32" ? Math.fround : truncateSignificand;

  const out = new Float32Array(M * N);
  for (let m = 0; m < M; m++) {
    for (let n = 0; n < N; n++) {
      const aRow = m * K;
      const bRow = n * K;
      let acc = 0;
      for (let k0 = 0; k0 < K; k0 += chunk) {
        const k1 = Math.min(k0 + chunk, K);
        const g0 = Math.floor(k0 / GROUP_SIZE);
        const oneGroup = g0 === Math.floor((k1 - 1) / GROUP_SIZE);
        const factored = oneGroup || (A.kScaling === "whole" && B.kScaling === "whole");
        let partial = 0;
        if (factored) {
          for (let k = k0; k < k1; k++) partial = round(partial + A.values[aRow + k] * B.values[bRow + k]);
          const sa = A.scales[m * kGroups + g0];
          const sb = B.scales[n * kGroups + g0];
          acc = Math.fround(acc + Math.fround(Math.fround(partial * sa) * sb));
        } else {
          for (let k = k0; k < k1; k++) {
            const g = Math.floor(k / GROUP_SIZE);
            const sa = A.scales[m * kGroups + g];
            const sb = B.scales[n * kGroups + g];
            const p = Math.fround(Math.fround(A.values[aRow + k] * B.values[bRow + k] * sa) * sb);
            partial = round(partial + p);
          }
          acc = Math.fround(acc + partial);
        }
      }
      out[m * N + n] = acc;
    }
  }
  return out;
}

/** How C = op(A) op(B) reads its stored operands: all that the reference GEMMs below take. */
export interface GemmLayout {
  /** A is stored [K, M] instead of [M, K]. */
  transA?: boolean;
  /** B is stored [N, K] instead of [K, N]. */
  transB?: boolean;
}

/**
 * What a GEMM kernel computes in: f32; bf16 (operands rounded to BF16, f32 accumulation); fp8
 * (operands are quantised tensors, f32 promotion every `promotion` elements of K). The three fp8
 * policy precisions (fp8, fp8-tensorwise, fp8-unscaled) all run the fp8 kernel: they differ only
 * in how the operands were quantised.
 */
export type MatmulPrecision = "f32" | "bf16" | "fp8";

/**
 * A GEMM as a backend runs it (Backend.matmul in @moe8/tensor). `T` is the backend's tensor type,
 * which this package does not know; @moe8/tensor exports `MatmulOptions<Tensor>` under this name.
 */
export interface MatmulOptions<T = never> extends GemmLayout {
  /**
   * f32; bf16 (operands rounded to BF16, f32 accumulation; an operand may also be a bf16 tensor,
   * which saves the rounding pass when it feeds several GEMMs); fp8 (operands are quantised tensors).
   */
  precision: MatmulPrecision;
  /** Round the output to BF16 (the GEMM writes BF16 activations). */
  outBf16?: boolean;
  /** Add the product into this f32 tensor instead of allocating a new one (returned). */
  accumulate?: T;
  /**
   * `accumulate` holds zeros (a gradient just cleared): a backend may write the product there
   * instead of adding it, which gives the same values without reading the tensor. A hint only:
   * wrong when the tensor is not all zeros, ignored by backends that do not use it.
   */
  accumulateZero?: boolean;
  /** FP8 promotion interval along K (default 128). */
  promotion?: number;
}

function checkMatmul(
  name: string,
  a: ArrayLike<number>,
  b: ArrayLike<number>,
  M: number,
  K: number,
  N: number,
): void {
  if (a.length !== M * K) throw new Error(`${name}: A has ${a.length} values, expected ${M}x${K}`);
  if (b.length !== K * N) throw new Error(`${name}: B has ${b.length} values, expected ${K}x${N}`);
}

/**
 * op(A) op(B) summed in order of k, into `out`. With `f32` each product and each partial sum is
 * rounded to f32 (no FMA); without it the sum is kept in f64.
 */
function gemmLoop(
  a: ArrayLike<number>,
  b: ArrayLike<number>,
  M: number,
  K: number,
  N: number,
  opts: GemmLayout,
  out: Float32Array | Float64Array,
  f32: boolean,
): void {
  for (let m = 0; m < M; m++)
    for (let n = 0; n < N; n++) {
      let acc = 0;
      for (let k = 0; k < K; k++) {
        const av = opts.transA ? a[k * M + m] : a[m * K + k];
        const bv = opts.transB ? b[n * K + k] : b[k * N + n];
        acc = f32 ? Math.fround(acc + Math.fround(av * bv)) : acc + av * bv;
      }
      out[m * N + n] = acc;
    }
}

/** Plain f32 GEMM: each product rounded to f32, then added in order of k into an f32 sum (no FMA). */
export function matmulF32(
  a: Float32Array,
  b: Float32Array,
  M: number,
  K: number,
  N: number,
  opts: GemmLayout = {},
): Float32Array {
  checkMatmul("matmulF32", a, b, M, K, N);
  const out = new Float32Array(M * N);
  gemmLoop(a, b, M, K, N, opts, out, true);
  return out;
}

/** BF16-input GEMM: A and B rounded to BF16 (RNE), then as matmulF32 (the products are exact). */
export function matmulBf16(
  a: Float32Array,
  b: Float32Array,
  M: number,
  K: number,
  N: number,
  opts: GemmLayout = {},
): Float32Array {
  checkMatmul("matmulBf16", a, b, M, K, N);
  return matmulF32(roundBf16(a), roundBf16(b), M, K, N, opts);
}

/** f64 GEMM of the given values (for tests: the products of f32 inputs are exact in f64). */
export function matmulF64(
  a: ArrayLike<number>,
  b: ArrayLike<number>,
  M: number,
  K: number,
  N: number,
  opts: GemmLayout = {},
): Float64Array {
  checkMatmul("matmulF64", a, b, M, K, N);
  const out = new Float64Array(M * N);
  gemmLoop(a, b, M, K, N, opts, out, false);
  return out;
}
