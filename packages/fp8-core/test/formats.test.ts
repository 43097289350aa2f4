import { describe, expect, it } from "vitest";
import {
  decodeBf16,
  decodeFp8,
  decodeFp8Scalar,
  E4M3_TABLE,
  E5M2_TABLE,
  encodeBf16,
  encodeFp8,
  encodeFp8Scalar,
  FP8_MAX,
  type Fp8Format,
  roundBf16,
  roundBf16InPlace,
} from "../src/index.ts";
import { bitsOf, fromBits, nextDown, nextUp, rng } from "./helpers.ts";

const FORMATS: Fp8Format[] = ["e4m3", "e5m2"];
const SPEC = {
  e4m3: { E: 4, M: 3, bias: 7, maxCode: 0x7e },
  e5m2: { E: 5, M: 2, bias: 15, maxCode: 0x7b },
} as const;

/** A code's value straight from the format's definition (sign, exponent, mantissa fields). */
function definition(code: number, format: Fp8Format): number {
  const { E, M, bias } = SPEC[format];
  const sign = code & 0x80 ? -1 : 1;
  const e = (code >> M) & ((1 << E) - 1);
  const m = code & ((1 << M) - 1);
  if (format === "e4m3" && e === 15 && m === 7) return Number.NaN;
  if (format === "e5m2" && e === 31) return m === 0 ? sign * Number.POSITIVE_INFINITY : Number.NaN;
  if (e === 0) return sign * 2 ** (1 - bias) * (m / 2 ** M);
  return sign * 2 ** (e - bias) * (1 + m / 2 ** M);
}

/** Non-negative finite values, index = code (0 .. maxCode), ascending. */
function positiveValues(format: Fp8Format): number[] {
  const out: number[] = [];
  for (let c = 0; c <= SPEC[format].maxCode; c++) out.push(definition(c, format));
  return out;
}

/** Slow reference encoder: nearest representable by search, ties to the even code, saturating. */
function referenceEncode(x: number, values: number[]): number {
  if (Number.isNaN(x)) return 0x7f;
  const sign = x < 0 || Object.is(x, -0) ? 0x80 : 0;
  const a = Math.abs(x);
  const top = values.length - 1;
  if (a >= values[top]) return top | sign;
  let lo = 0;
  let hi = top; // invariant: values[lo] <= a < values[hi]
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (values[mid] <= a) lo = mid;
    else hi = mid;
  }
  const twice = 2 * a; // exact, and so is the sum of two neighbours: no rounding in the comparison
  const sum = values[lo] + values[hi];
  const code = twice < sum ? lo : twice > sum ? hi : lo % 2 === 0 ? lo : hi;
  return code | sign;
}

const enc = (x: number, format: Fp8Format) => encodeFp8(Float32Array.of(x), format)[0];

describe("FP8 decoding", () => {
  for (const format of FORMATS) {
    it(`${format}: all 256 codes match the format's definition`, () => {
      const table = format === "e4m3" ? E4M3_TABLE : E5M2_TABLE;
      const all = Uint8Array.from({ length: 256 }, (_, i) => i);
      const decoded = decodeFp8(all, format);
      let nans = 0;
      for (let c = 0; c < 256; c++) {
        const want = definition(c, format);
        if (Number.isNaN(want)) nans++;
        expect(Object.is(table[c], want) || (Number.isNaN(want) && Number.isNaN(table[c])), `code ${c}`).toBe(
          true,
        );
        expect(Object.is(decoded[c], table[c]) || Number.isNaN(want)).toBe(true);
        expect(Object.is(decodeFp8Scalar(c, format), table[c]) || Number.isNaN(want)).toBe(true);
      }
      expect(nans).toBe(format === "e4m3" ? 2 : 6);
    });
  }

  it("known values", () => {
    expect(E4M3_TABLE[0x7e]).toBe(448);
    expect(E4M3_TABLE[0xfe]).toBe(-448);
    expect(E4M3_TABLE[0x01]).toBe(2 ** -9);
    expect(E4M3_TABLE[0x08]).toBe(2 ** -6);
    expect(E4M3_TABLE[0x38]).toBe(1);
    expect(Object.is(E4M3_TABLE[0x80], -0)).toBe(true);
    expect(E4M3_TABLE[0x7f]).toBeNaN();
    expect(E4M3_TABLE[0xff]).toBeNaN();
    expect(E5M2_TABLE[0x7b]).toBe(57344);
    expect(E5M2_TABLE[0x01]).toBe(2 ** -16);
    expect(E5M2_TABLE[0x04]).toBe(2 ** -14);
    expect(E5M2_TABLE[0x3c]).toBe(1);
    expect(E5M2_TABLE[0x7c]).toBe(Number.POSITIVE_INFINITY);
    expect(E5M2_TABLE[0xfc]).toBe(Number.NEGATIVE_INFINITY);
    for (const c of [0x7d, 0x7e, 0x7f, 0xfd, 0xfe, 0xff]) expect(E5M2_TABLE[c]).toBeNaN();
    expect(FP8_MAX).toEqual({ e4m3: 448, e5m2: 57344 });
  });
});

describe("FP8 encoding", () => {
  for (const format of FORMATS) {
    const values = positiveValues(format);
    const { maxCode } = SPEC[format];
    const max = FP8_MAX[format];

    it(`${format}: every finite code round-trips`, () => {
      for (let c = 0; c < 256; c++) {
        if ((c & 0x7f) > maxCode) continue;
        expect(enc(definition(c, format), format), `code ${c}`).toBe(c);
      }
    });

    it(`${format}: ties go to the even code, and one f32 ulp either side to the nearer`, () => {
      for (let i = 0; i < maxCode; i++) {
        const mid = (values[i] + values[i + 1]) / 2;
        expect(Math.fround(mid)).toBe(mid);
        const even = i % 2 === 0 ? i : i + 1;
        expect(enc(mid, format), `midpoint of codes ${i}, ${i + 1}`).toBe(even);
        expect(enc(-mid, format)).toBe(even | 0x80);
        expect(enc(nextUp(mid), format)).toBe(i + 1);
        expect(enc(nextDown(mid), format)).toBe(i);
        expect(enc(-nextUp(mid), format)).toBe((i + 1) | 0x80);
        expect(enc(-nextDown(mid), format)).toBe(i | 0x80);
      }
    });

    it(`${format}: subnormals, the smallest subnormal and half of it`, () => {
      const tiny = values[1];
      expect(tiny).toBe(format === "e4m3" ? 2 ** -9 : 2 ** -16);
      expect(enc(tiny, format)).toBe(0x01);
      expect(enc(tiny / 2, format)).toBe(0x00); // tie between 0 and 1: even is 0
      expect(enc(-tiny / 2, format)).toBe(0x80);
      expect(enc(nextUp(tiny / 2), format)).toBe(0x01);
      expect(enc(tiny * 1.5, format)).toBe(0x02); // tie between 1 and 2
      expect(enc(tiny * 2.5, format)).toBe(0x02); // tie between 2 and 3
      expect(enc(tiny / 4, format)).toBe(0x00);
      expect(enc(1e-30, format)).toBe(0x00);
      expect(enc(-1e-40, format)).toBe(0x80); // an f32 subnormal
      // The largest subnormal rounds up into the smallest normal.
      const minNormal = values[1 << SPEC[format].M];
      expect(enc(nextDown(minNormal), format)).toBe(1 << SPEC[format].M);
    });

    it(`${format}: the maximum, just below and above it, saturation, infinities`, () => {
      const ulp = max - values[maxCode - 1];
      expect(enc(max, format)).toBe(maxCode);
      expect(enc(nextDown(max), format)).toBe(maxCode);
      expect(enc(nextUp(max), format)).toBe(maxCode);
      expect(enc(max + ulp / 2, format)).toBe(maxCode); // the tie with the value past max
      expect(enc(nextUp(max + ulp / 2), format)).toBe(maxCode);
      expect(enc(max + ulp, format)).toBe(maxCode);
      expect(enc(-(max + ulp), format)).toBe(maxCode | 0x80);
      expect(enc(1e9, format)).toBe(maxCode);
      expect(enc(3.4e38, format)).toBe(maxCode);
      expect(enc(Number.POSITIVE_INFINITY, format)).toBe(maxCode);
      expect(enc(Number.NEGATIVE_INFINITY, format)).toBe(maxCode | 0x80);
      expect(encodeFp8Scalar(1e300, format)).toBe(maxCode); // rounds to f32 inf first
    });

    it(`${format}: signed zeros and NaN`, () => {
      expect(enc(0, format)).toBe(0x00);
      expect(enc(-0, format)).toBe(0x80);
      expect(enc(Number.NaN, format)).toBe(0x7f);
      for (const bits of [0x7fc00000, 0xffc00000, 0x7f800001, 0xffffffff, 0x7fbfffff]) {
        const x = new Float32Array(new Uint32Array([bits]).buffer);
        expect(encodeFp8(x, format)[0], `NaN bits ${bits.toString(16)}`).toBe(0x7f);
      }
      expect(decodeFp8Scalar(0x7f, format)).toBeNaN();
    });

    it(`${format}: 2M random f32 bit patterns match a search-based reference`, () => {
      const r = rng(format === "e4m3" ? 1 : 2);
      const n = 1 << 21;
      const bits = new Uint32Array(n);
      const { M, bias } = SPEC[format];
      const lowExp = 127 + 1 - bias - M - 3;
      const span = 2 * bias + M + 6;
      for (let i = 0; i < n; i++) {
        const word = r.next();
        if (i % 2 === 0)
          bits[i] = word; // anywhere, including NaN, inf and f32 subnormals
        else bits[i] = ((word & 0x807fffff) | ((lowExp + (r.next() % span)) << 23)) >>> 0; // near the range
      }
      const x = new Float32Array(bits.buffer);
      const codes = encodeFp8(x, format);
      let mismatches = 0;
      for (let i = 0; i < n; i++) {
        if (codes[i] !== referenceEncode(x[i], values)) {
          if (mismatches++ < 5) console.log(`mismatch at bits ${bits[i].toString(16)}: got ${codes[i]}`);
        }
      }
      expect(mismatches).toBe(0);
      for (let i = 0; i < 1000; i++) expect(encodeFp8Scalar(x[i], format)).toBe(codes[i]);
    });
  }
});

describe("BF16", () => {
  const bf = (bits: number) => encodeBf16(new Float32Array(new Uint32Array([bits]).buffer))[0];

  it("rounds to nearest, ties to even", () => {
    expect(bf(0x3f800000)).toBe(0x3f80); // 1
    expect(bf(0x3f808000)).toBe(0x3f80); // tie, 0x3f80 even
    expect(bf(0x3f818000)).toBe(0x3f82); // tie, 0x3f81 odd: up
    expect(bf(0x3f808001)).toBe(0x3f81);
    expect(bf(0x3f807fff)).toBe(0x3f80);
    expect(bf(0xbf808001)).toBe(0xbf81);
    expect(bf(0x00000001)).toBe(0x0000); // f32 subnormals are rounded like anything else
    expect(bf(0x00008000)).toBe(0x0000);
    expect(bf(0x00018000)).toBe(0x0002);
    expect(bf(0x80000000)).toBe(0x8000);
  });

  it("keeps infinities, overflows to infinity, keeps NaN a NaN", () => {
    expect(bf(0x7f800000)).toBe(0x7f80);
    expect(bf(0xff800000)).toBe(0xff80);
    expect(bf(0x7f7fffff)).toBe(0x7f80); // the largest f32 rounds up past the largest BF16
    expect(bf(0x7f7f7fff)).toBe(0x7f7f);
    for (const bits of [0x7fc00000, 0xffc00000, 0x7f800001, 0x7f810000]) {
      const h = bf(bits);
      expect(h).toBe(0x7fff);
      expect(decodeBf16(Uint16Array.of(h))[0]).toBeNaN();
    }
  });

  it("matches a reference on random bit patterns; roundBf16 = decode(encode)", () => {
    const r = rng(3);
    const n = 1 << 18;
    const bits = new Uint32Array(n);
    for (let i = 0; i < n; i++) bits[i] = r.next();
    const x = new Float32Array(bits.buffer);
    const h = encodeBf16(x);
    for (let i = 0; i < n; i++) {
      const v = x[i];
      let want: number;
      if (Number.isNaN(v)) want = 0x7fff;
      else {
        const lo = bits[i] & 0xffff0000;
        const a = fromBits(lo);
        const b = fromBits(lo + 0x10000); // next BF16 away from zero (may be inf: fine, see below)
        const loBits = lo >>> 16;
        if (v === a) want = loBits;
        else {
          // Compare distances exactly in f64; the neighbour past the largest finite is 2^128.
          const far = Number.isFinite(b) ? b : Math.sign(v) * 2 ** 128;
          const d = Math.abs(v - a) - Math.abs(far - v);
          want = d < 0 ? loBits : d > 0 ? loBits + 1 : loBits % 2 === 0 ? loBits : loBits + 1;
        }
      }
      if (h[i] !== want) expect(h[i], `bits ${bits[i].toString(16)}`).toBe(want);
    }
    const rounded = new Uint32Array(roundBf16(x).buffer);
    const decoded = new Uint32Array(decodeBf16(h).buffer);
    const copy = x.slice();
    expect(roundBf16InPlace(copy)).toBe(copy);
    const inPlace = new Uint32Array(copy.buffer);
    let differ = 0;
    for (let i = 0; i < n; i++) if (rounded[i] !== decoded[i] || inPlace[i] !== decoded[i]) differ++;
    expect(differ).toBe(0);
    expect(bitsOf(x[0])).toBe(bits[0]); // roundBf16 left its input alone
  });
});
