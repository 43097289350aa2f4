// FP8 (E4M3 OCP `e4m3fn`, E5M2) and BF16 codecs, bit for bit as CUDA converts.
//
// Every encoder works on the bits of the f32 input, never on float arithmetic: rounding an f32
// value through a double (or through a multiply by a power of two) can round twice and land on the
// wrong side of a tie. The encoders follow the host path of CUDA's `__nv_cvt_float_to_fp8(x,
// __NV_SATFINITE, fmt)` and `__float2bfloat16_rn`, which the device instructions agree with:
//   - round to nearest, ties to even, subnormals kept;
//   - FP8 saturates: anything beyond the largest finite value (infinities too) becomes +-max;
//   - a NaN of either sign encodes to 0x7f in both FP8 formats (CUDA canonicalises NaN first, so the
//     sign is dropped) and to 0x7fff in BF16;
//   - +-0 and values that round to zero keep their sign (0x80 is -0).

export type Fp8Format = "e4m3" | "e5m2";

/** The largest finite value of each FP8 format. */
export const FP8_MAX: { readonly e4m3: 448; readonly e5m2: 57344 } = Object.freeze({
  e4m3: 448,
  e5m2: 57344,
});

/** The code every NaN encodes to (both formats), as CUDA returns it. */
export const FP8_NAN_CODE = 0x7f;

interface Fp8Layout {
  /** Explicit mantissa bits. */
  readonly man: number;
  readonly bias: number;
  /** Code of the largest finite positive value: saturation target. */
  readonly maxCode: number;
  /** Whether the all-ones exponent encodes inf/NaN (E5M2) or ordinary values (E4M3). */
  readonly ieeeSpecials: boolean;
}

const LAYOUT: Record<Fp8Format, Fp8Layout> = {
  e4m3: { man: 3, bias: 7, maxCode: 0x7e, ieeeSpecials: false },
  e5m2: { man: 2, bias: 15, maxCode: 0x7b, ieeeSpecials: true },
};

function layoutOf(format: Fp8Format): Fp8Layout {
  const layout = LAYOUT[format];
  if (!layout) throw new Error(`unknown FP8 format "${format}" (allowed: e4m3, e5m2)`);
  return layout;
}

/** Encodes the f32 whose bit pattern is `bits` (an unsigned 32-bit integer). */
function encodeBits(bits: number, layout: Fp8Layout): number {
  const sign = (bits >>> 24) & 0x80;
  const abs = bits & 0x7fffffff;
  if (abs > 0x7f800000) return FP8_NAN_CODE;
  const f32Exp = abs >>> 23;
  // f32 subnormals (< 2^-126) are far below half the smallest FP8 subnormal: they round to +-0.
  if (f32Exp === 0) return sign;
  const exp = f32Exp - 127; // unbiased; infinity lands at 128 and saturates below
  const minExp = 1 - layout.bias; // exponent of the smallest normal
  let code: number;
  let shift: number; // f32 significand bits dropped
  let significand: number;
  if (exp >= minExp) {
    // Normal: exponent and top mantissa bits in place; a carry out of the mantissa bumps the
    // exponent, which is exactly how the next binade's first value is encoded.
    shift = 23 - layout.man;
    significand = abs & 0x7fffff;
    code = ((exp + layout.bias) << layout.man) | (significand >>> shift);
  } else {
    // Subnormal: the implicit leading bit joins the mantissa and everything shifts further right.
    shift = 23 - layout.man + (minExp - exp);
    // With 25 or more bits dropped the value is below half the smallest subnormal: round to zero.
    if (shift >= 25) return sign;
    significand = (abs & 0x7fffff) | 0x800000;
    code = significand >>> shift;
  }
  const rest = significand & ((1 << shift) - 1);
  const half = 1 << (shift - 1);
  if (rest > half || (rest === half && (code & 1) === 1)) code += 1;
  if (code > layout.maxCode) code = layout.maxCode; // saturate (also E4M3's NaN slot and E5M2's inf)
  return code | sign;
}

// Scratch views for moving a single number between f32 and its bits.
const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

/** The bit pattern of `x` rounded to f32. */
export function f32Bits(x: number): number {
  scratchF32[0] = x;
  return scratchU32[0];
}

/** The f32 whose bit pattern is `bits`. */
export function f32FromBits(bits: number): number {
  scratchU32[0] = bits;
  return scratchF32[0];
}

/** Bit view of a Float32Array (same memory, no copy). */
function bitsView(x: Float32Array): Uint32Array {
  return new Uint32Array(x.buffer, x.byteOffset, x.length);
}

/** Encodes one value. `x` is first rounded to f32, as storing it in a Float32Array would. */
export function encodeFp8Scalar(x: number, format: Fp8Format): number {
  return encodeBits(f32Bits(x), layoutOf(format));
}

/** Encodes every element of `x` (RNE, saturating, NaN to 0x7f). */
export function encodeFp8(x: Float32Array, format: Fp8Format): Uint8Array {
  const layout = layoutOf(format);
  const bits = bitsView(x);
  const out = new Uint8Array(x.length);
  for (let i = 0; i < bits.length; i++) out[i] = encodeBits(bits[i], layout);
  return out;
}

/** Builds the 256-entry decode table from the format's bit layout (exact: every value is an f32). */
function buildTable(format: Fp8Format): Float32Array {
  const { man, bias, ieeeSpecials } = LAYOUT[format];
  const expMax = format === "e4m3" ? 15 : 31;
  const table = new Float32Array(256);
  for (let code = 0; code < 256; code++) {
    const negative = (code & 0x80) !== 0;
    const e = (code >>> man) & expMax;
    const m = code & ((1 << man) - 1);
    let value: number;
    if (ieeeSpecials && e === expMax) value = m === 0 ? Number.POSITIVE_INFINITY : Number.NaN;
    else if (!ieeeSpecials && e === expMax && m === (1 << man) - 1) value = Number.NaN;
    else if (e === 0) value = m * 2 ** (1 - bias - man);
    else value = f32FromBits(((e - bias + 127) << 23) | (m << (23 - man)));
    table[code] = negative ? -value : value;
  }
  return table;
}

/** Decoded value of each E4M3 code (0x7f and 0xff are NaN). */
export const E4M3_TABLE: Float32Array = buildTable("e4m3");
/** Decoded value of each E5M2 code (0x7c/0xfc are +-inf, 0x7d-0x7f and 0xfd-0xff NaN). */
export const E5M2_TABLE: Float32Array = buildTable("e5m2");

/** The decode table of a format. */
export function fp8Table(format: Fp8Format): Float32Array {
  layoutOf(format);
  return format === "e4m3" ? E4M3_TABLE : E5M2_TABLE;
}

export function decodeFp8Scalar(code: number, format: Fp8Format): number {
  return fp8Table(format)[code & 0xff];
}

export function decodeFp8(q: Uint8Array, format: Fp8Format): Float32Array {
  const table = fp8Table(format);
  const out = new Float32Array(q.length);
  for (let i = 0; i < q.length; i++) out[i] = table[q[i]];
  return out;
}

// BF16 is the upper half of an f32. Rounding adds 0x7fff plus the lowest kept bit, so a tie rounds
// to the even neighbour; values above the largest BF16 round to infinity as RNE demands.
function bf16Bits(bits: number): number {
  if ((bits & 0x7fffffff) > 0x7f800000) return 0x7fff; // canonical NaN, as CUDA returns it
  return (bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16;
}

export function encodeBf16(x: Float32Array): Uint16Array {
  const bits = bitsView(x);
  const out = new Uint16Array(x.length);
  for (let i = 0; i < bits.length; i++) out[i] = bf16Bits(bits[i]);
  return out;
}

export function decodeBf16(h: Uint16Array): Float32Array {
  const out = new Float32Array(h.length);
  const bits = bitsView(out);
  for (let i = 0; i < h.length; i++) bits[i] = h[i] << 16;
  return out;
}

/** `decodeBf16(encodeBf16(x))` in one pass, into a new array. */
export function roundBf16(x: Float32Array): Float32Array {
  return roundBf16InPlace(x.slice());
}

/** Rounds every element of `x` to the nearest BF16 value, in place; returns `x`. */
export function roundBf16InPlace(x: Float32Array): Float32Array {
  const bits = bitsView(x);
  for (let i = 0; i < bits.length; i++) bits[i] = bf16Bits(bits[i]) << 16;
  return x;
}

/** One value rounded to BF16 (after rounding to f32). */
export function roundBf16Scalar(x: number): number {
  return f32FromBits(bf16Bits(f32Bits(x)) << 16);
}
