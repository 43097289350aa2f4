// Fine-grained FP8 quantisation (docs/numerics.md, "Scaling groups" and "Online scaling"): one
// scale per group of values, computed online from the group's absolute maximum, in f32 arithmetic:
//   amax  = max(max|x|, eps)      inv = f32(FMAX / amax)
//   q     = encode(f32(x * inv))  scale = f32(amax / FMAX)
// `Math.fround` of a double quotient or product of two f32 values is the correctly rounded f32
// result (a double holds more than twice the bits), so these lines are bit-exact f32 arithmetic.

import { encodeFp8, FP8_MAX, type Fp8Format, f32Bits, f32FromBits, fp8Table } from "./formats.ts";

/**
 * Group shapes. `tile`: 1x128 along the columns (activations, output gradients, reduction along
 * columns); `block`: 128x128 (weights); `column-tile`: 128x1, 128 consecutive rows of one column (the
 * Wgrad operands, reduction along rows = tokens); `row`: one per row; `tensor`: one for everything.
 */
export type QuantGroup = "tile" | "block" | "column-tile" | "row" | "tensor";

export const QUANT_GROUPS: readonly QuantGroup[] = ["tile", "block", "column-tile", "row", "tensor"];

/** Length of a tile/block edge. */
export const GROUP_SIZE = 128;

/** The default eps floor on a group's amax. */
export const DEFAULT_EPS = 1e-12;

/**
 * How a matrix is quantised. `S` is the type of `segments`, which only a backend takes (its tensor
 * type; @moe8/tensor exports `QuantizeOptions<Tensor>` under this name); the reference quantize()
 * here quantises one matrix and takes none.
 */
export interface QuantizeOptions<S = never> {
  group: QuantGroup;
  /** Default e4m3. */
  format?: Fp8Format;
  /** Scales are powers of two: 2^ceil(log2(f32(amax / FMAX))), and q = encode(x / scale). */
  pow2Scales?: boolean;
  /** Floor on each group's amax (default 1e-12, taken as f32). */
  eps?: number;
  /** Scale fixed at 1: values are encoded as they are, saturating (the `fp8-unscaled` control). */
  unit?: boolean;
  /** For `column-tile`: E+1 row offsets; the 128-row groups restart at each segment (an expert's rows). */
  segments?: S;
}

export interface Quantized {
  /** FP8 codes, row-major like the input. */
  data: Uint8Array;
  /** Row-major in the shape `scaleShape(rows, cols, group)` gives. */
  scales: Float32Array;
}

const ceilDiv = (a: number, b: number): number => Math.ceil(a / b);

function checkGroup(group: QuantGroup): void {
  if (!QUANT_GROUPS.includes(group))
    throw new Error(`unknown quantisation group "${group}" (allowed: ${QUANT_GROUPS.join(", ")})`);
}

/** Shape [rows, cols] of the scales of a rows x cols matrix. */
export function scaleShape(rows: number, cols: number, group: QuantGroup): [number, number] {
  checkGroup(group);
  switch (group) {
    case "tile":
      return [rows, ceilDiv(cols, GROUP_SIZE)];
    case "block":
      return [ceilDiv(rows, GROUP_SIZE), ceilDiv(cols, GROUP_SIZE)];
    case "column-tile":
      return [ceilDiv(rows, GROUP_SIZE), cols];
    case "row":
      return [rows, 1];
    case "tensor":
      return [1, 1];
  }
}

/**
 * The scale index of element (r, c) splits into a row part plus a column part, so it is stored as two
 * small tables: index = rowPart[r] + colPart[c].
 */
export interface GroupIndexer {
  rowPart: Int32Array;
  colPart: Int32Array;
}

export function groupIndexer(group: QuantGroup, rows: number, cols: number): GroupIndexer {
  const [, scaleCols] = scaleShape(rows, cols, group);
  const rowPart = new Int32Array(rows);
  const colPart = new Int32Array(cols);
  for (let r = 0; r < rows; r++) {
    if (group === "tile" || group === "row") rowPart[r] = r * scaleCols;
    else if (group === "block" || group === "column-tile")
      rowPart[r] = Math.floor(r / GROUP_SIZE) * scaleCols;
  }
  for (let c = 0; c < cols; c++) {
    if (group === "tile" || group === "block") colPart[c] = Math.floor(c / GROUP_SIZE);
    else if (group === "column-tile") colPart[c] = c;
  }
  return { rowPart, colPart };
}

/** A function giving the index into `scales` of element (r, c) of a rows x cols matrix. */
export function scaleIndex(group: QuantGroup, rows: number, cols: number): (r: number, c: number) => number {
  const { rowPart, colPart } = groupIndexer(group, rows, cols);
  return (r, c) => rowPart[r] + colPart[c];
}

/**
 * The smallest power of two >= q, for a positive f32 q, found from q's bits (exact, unlike log2).
 * A zero q gives the smallest positive f32 (2^-149) so that a scale is never zero.
 */
export function pow2Ceil(q: number): number {
  if (!(q > 0)) return 2 ** -149;
  if (q === Number.POSITIVE_INFINITY) return q;
  const bits = f32Bits(q);
  const exp = bits >>> 23;
  const man = bits & 0x7fffff;
  if (exp === 0) {
    // Subnormal: a power of two has a single mantissa bit; otherwise move one bit above the top one.
    const top = 31 - Math.clz32(man);
    return man === 1 << top ? q : f32FromBits(1 << (top + 1));
  }
  return man === 0 ? q : f32FromBits((exp + 1) << 23);
}

/** The f32 eps actually used (validated). */
function epsOf(eps: number | undefined): number {
  const e = Math.fround(eps ?? DEFAULT_EPS);
  if (!(e > 0) || !Number.isFinite(e))
    throw new Error(`quantize: eps must be a positive finite f32 (got ${eps})`);
  return e;
}

function checkShape(what: string, length: number, rows: number, cols: number): void {
  if (!Number.isInteger(rows) || !Number.isInteger(cols) || rows < 0 || cols < 0)
    throw new Error(`${what}: bad shape [${rows}, ${cols}]`);
  if (length !== rows * cols) throw new Error(`${what}: ${length} values do not fill [${rows}, ${cols}]`);
}

/**
 * Quantises the row-major rows x cols matrix `x` group by group. NaNs are ignored by the amax (they
 * encode to the NaN code themselves); an infinite amax gives an infinite scale.
 */
export function quantize(x: Float32Array, rows: number, cols: number, opts: QuantizeOptions): Quantized {
  checkShape("quantize", x.length, rows, cols);
  const format = opts.format ?? "e4m3";
  const fmax = FP8_MAX[format];
  const [sr, sc] = scaleShape(rows, cols, opts.group);
  const scales = new Float32Array(sr * sc);
  if (opts.unit) {
    scales.fill(1);
    return { data: encodeFp8(x, format), scales };
  }
  const eps = epsOf(opts.eps);
  const { rowPart, colPart } = groupIndexer(opts.group, rows, cols);

  // Pass 1: each group's amax (|x| of an f32 is an f32, so a Float32Array holds it exactly).
  const amax = new Float32Array(scales.length);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const v = Math.abs(x[r * cols + c]);
      const g = rowPart[r] + colPart[c];
      if (v > amax[g]) amax[g] = v;
    }
  }

  // Pass 2: each group's scale and the factor applied to its values before encoding.
  const factor = new Float32Array(scales.length);
  for (let g = 0; g < scales.length; g++) {
    const a = Math.max(amax[g], eps);
    if (opts.pow2Scales) {
      scales[g] = pow2Ceil(Math.fround(a / fmax));
      factor[g] = scales[g]; // divided by: exact, a power of two
    } else {
      factor[g] = Math.fround(fmax / a);
      scales[g] = Math.fround(a / fmax);
    }
  }

  // Pass 3: scale every value in f32, then encode them all.
  const scaled = new Float32Array(x.length);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const i = r * cols + c;
      const g = rowPart[r] + colPart[c];
      scaled[i] = opts.pow2Scales ? x[i] / factor[g] : x[i] * factor[g];
    }
  }
  return { data: encodeFp8(scaled, format), scales };
}

/** decode(q) * scale in f32, for every element. */
export function dequantize(
  q: Quantized,
  rows: number,
  cols: number,
  opts: { group: QuantGroup; format?: Fp8Format },
): Float32Array {
  checkShape("dequantize", q.data.length, rows, cols);
  const [sr, sc] = scaleShape(rows, cols, opts.group);
  if (q.scales.length !== sr * sc)
    throw new Error(`dequantize: ${q.scales.length} scales, expected ${sr * sc} for group ${opts.group}`);
  const table = fp8Table(opts.format ?? "e4m3");
  const { rowPart, colPart } = groupIndexer(opts.group, rows, cols);
  const out = new Float32Array(q.data.length);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const i = r * cols + c;
      out[i] = table[q.data[i]] * q.scales[rowPart[r] + colPart[c]];
    }
  }
  return out;
}
