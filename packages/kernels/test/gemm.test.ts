// The native CPU GEMMs and FP8 codecs/quantiser against @moe8/fp8-core (the TypeScript reference):
// bit-exact where docs/numerics.md pins the bits (codecs, quantisation), a tolerance scaled by
// sum |a*b| where only the summation order differs (GEMMs).
import {
  decodeFp8,
  encodeFp8,
  type Fp8Format,
  type QuantGroup,
  type QuantizedOperand,
  quantize,
  roundBf16,
  scaledMatmul,
} from "@moe8/fp8-core";
import { describe, expect, it } from "vitest";
import { requireNative } from "../src/index.ts";

const native = requireNative();
const FORMATS: Fp8Format[] = ["e4m3", "e5m2"];
const GROUPS: QuantGroup[] = ["tile", "block", "column-tile", "row", "tensor"];

/** Deterministic xorshift generator of values in [-1, 1). */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 2 ** 31 - 1;
  };
}

function randomF32(n: number, seed: number, spread = 1): Float32Array {
  const r = rng(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = r() * (1 + (i % 37) * spread);
  return out;
}

const bits = (x: Float32Array) => new Uint32Array(x.buffer, x.byteOffset, x.length);

function scaleCount(rows: number, cols: number, g: QuantGroup): number {
  const c = (a: number) => Math.ceil(a / 128);
  return {
    tile: rows * c(cols),
    block: c(rows) * c(cols),
    "column-tile": c(rows) * cols,
    row: rows,
    tensor: 1,
  }[g];
}

/** op(X)(i, j) of a row-major stored matrix with `ld` columns. */
const at = (x: ArrayLike<number>, ld: number, t: boolean, i: number, j: number) =>
  t ? x[j * ld + i] : x[i * ld + j];

/** f64 reference C and sum |a b| per element. */
function naive(
  a: ArrayLike<number>,
  b: ArrayLike<number>,
  m: number,
  n: number,
  k: number,
  ta: boolean,
  tb: boolean,
) {
  const c = new Float64Array(m * n);
  const mag = new Float64Array(m * n);
  const lda = ta ? m : k;
  const ldb = tb ? k : n;
  for (let i = 0; i < m; i++)
    for (let j = 0; j < n; j++) {
      let s = 0;
      let t = 0;
      for (let p = 0; p < k; p++) {
        const v = at(a, lda, ta, i, p) * at(b, ldb, tb, p, j);
        s += v;
        t += Math.abs(v);
      }
      c[i * n + j] = s;
      mag[i * n + j] = t;
    }
  return { c, mag };
}

function expectClose(
  got: Float32Array,
  want: ArrayLike<number>,
  mag: ArrayLike<number>,
  rel: number,
  what: string,
) {
  for (let i = 0; i < got.length; i++) {
    const tol = rel * mag[i] + 1e-30;
    if (!(Math.abs(got[i] - want[i]) <= tol))
      throw new Error(`${what}: element ${i}: got ${got[i]}, want ${want[i]} (tol ${tol})`);
  }
}

describe("FP8/BF16 codecs match fp8-core bit for bit", () => {
  const r = rng(1);
  const x = new Float32Array(100_000);
  const xb = bits(x);
  for (let i = 0; i < x.length; i++) xb[i] = Math.floor((r() + 1) * 2 ** 31) >>> 0; // every exponent
  for (let i = 0; i < 20_000; i++) x[i] = r() * 600; // the FP8 ranges
  x.set([
    0,
    -0,
    Number.POSITIVE_INFINITY,
    Number.NEGATIVE_INFINITY,
    Number.NaN,
    448,
    464,
    -480,
    57344,
    61440,
  ]);

  it.each(FORMATS)("fp8Encode %s", (f) => {
    const out = new Uint8Array(x.length);
    native.fp8Encode(x, f, out);
    expect(out).toEqual(encodeFp8(x, f));
  });

  it.each(FORMATS)("fp8Decode %s: all 256 codes", (f) => {
    const q = new Uint8Array(256).map((_, i) => i);
    const out = new Float32Array(256);
    native.fp8Decode(q, f, out);
    const want = decodeFp8(q, f);
    for (let i = 0; i < 256; i++)
      expect(Object.is(out[i], want[i]) || (Number.isNaN(out[i]) && Number.isNaN(want[i]))).toBe(true);
  });

  it("bf16Round, out of place and in place", () => {
    const out = new Float32Array(x.length);
    native.bf16Round(x, out);
    expect(bits(out)).toEqual(bits(roundBf16(x)));
    const y = x.slice();
    native.bf16Round(y, y);
    expect(bits(y)).toEqual(bits(out));
  });
});

describe("quantizeFp8 matches fp8-core's quantize bit for bit", () => {
  const shapes: [number, number][] = [
    [1, 1],
    [3, 130],
    [129, 7],
    [300, 257],
    [128, 256],
  ];
  for (const [rows, cols] of shapes)
    for (const group of GROUPS)
      for (const format of FORMATS)
        it(`${rows}x${cols} ${group} ${format}`, () => {
          const x = randomF32(rows * cols * 2, rows * 7 + cols, 3);
          if (rows * cols > 10) x.set([Number.NaN, 1e30, -0], 3); // NaN is ignored by the amax
          for (const mode of [{}, { pow2Scales: true }, { unit: true }, { eps: 1e-3 }]) {
            const ns = scaleCount(rows, cols, group);
            const data = new Uint8Array(x.length);
            const scales = new Float32Array(ns * 2);
            const pow2 = "pow2Scales" in mode;
            const unit = "unit" in mode;
            const eps = "eps" in mode ? (mode.eps as number) : 1e-12;
            native.quantizeFp8(
              x,
              { rows, cols, batch: 2, group, format },
              { mode: unit ? "unit" : pow2 ? "pow2" : "amax", eps },
              data,
              scales,
            );
            for (let b = 0; b < 2; b++) {
              const xb = x.subarray(b * rows * cols, (b + 1) * rows * cols);
              const want = quantize(xb, rows, cols, { group, format, ...mode });
              expect(data.subarray(b * rows * cols, (b + 1) * rows * cols)).toEqual(want.data);
              expect(bits(scales.subarray(b * ns, (b + 1) * ns))).toEqual(bits(want.scales));
            }
          }
        });

  it("column-tile with segments: each segment quantised on its own, groups never straddle", () => {
    const [rows, cols] = [400, 9];
    const seg = new Int32Array([0, 130, 130, 131, 400]);
    const x = randomF32(rows * cols, 5, 2);
    let ns = 0;
    for (let e = 0; e + 1 < seg.length; e++) ns += Math.ceil((seg[e + 1] - seg[e]) / 128) * cols;
    const data = new Uint8Array(rows * cols);
    const scales = new Float32Array(ns);
    native.quantizeFp8(
      x,
      { rows, cols, batch: 1, group: "column-tile", format: "e4m3" },
      { mode: "amax", eps: 1e-12 },
      data,
      scales,
      seg,
    );
    let s0 = 0;
    for (let e = 0; e + 1 < seg.length; e++) {
      const [r0, r1] = [seg[e], seg[e + 1]];
      const want = quantize(x.subarray(r0 * cols, r1 * cols), r1 - r0, cols, { group: "column-tile" });
      expect(data.subarray(r0 * cols, r1 * cols)).toEqual(want.data);
      expect(bits(scales.subarray(s0, s0 + want.scales.length))).toEqual(bits(want.scales));
      s0 += want.scales.length;
    }
  });

  it("rejects a bad eps and wrong buffer sizes", () => {
    const x = new Float32Array(4);
    expect(() =>
      native.quantizeFp8(
        x,
        { rows: 2, cols: 2, batch: 1, group: "tile", format: "e4m3" },
        { mode: "amax", eps: 0 },
        new Uint8Array(4),
        new Float32Array(2),
      ),
    ).toThrow(/eps/);
    expect(() =>
      native.quantizeFp8(
        x,
        { rows: 2, cols: 2, batch: 1, group: "tile", format: "e4m3" },
        { mode: "amax", eps: 1e-12 },
        new Uint8Array(3),
        new Float32Array(2),
      ),
    ).toThrow();
    expect(() =>
      native.quantizeFp8(
        x,
        { rows: 2, cols: 2, batch: 1, group: "blocky", format: "e4m3" },
        { mode: "amax", eps: 1e-12 },
        new Uint8Array(4),
        new Float32Array(2),
      ),
    ).toThrow(/group/);
  });
});

const SIZES: [number, number, number][] = [
  [1, 1, 1],
  [7, 5, 3],
  [1, 300, 129],
  [129, 7, 130],
  [33, 65, 17],
  [200, 129, 257],
  [2, 3, 0],
];
const TRANS: [boolean, boolean][] = [
  [false, false],
  [true, false],
  [false, true],
  [true, true],
];

describe("gemmF32 against an f64 reference", () => {
  for (const [m, n, k] of SIZES)
    for (const [ta, tb] of TRANS)
      it(`${m}x${n}x${k} transA=${ta} transB=${tb}`, () => {
        const a = randomF32(m * k, 11);
        const b = randomF32(k * n, 12);
        const { c: want, mag } = naive(a, b, m, n, k, ta, tb);
        const c = new Float32Array(m * n).fill(Number.NaN);
        native.gemmF32(a, b, c, { m, n, k, transA: ta, transB: tb });
        expectClose(c, want, mag, 1e-5, "f32");
        // BF16 inputs: the reference on rounded operands.
        const r = naive(roundBf16(a), roundBf16(b), m, n, k, ta, tb);
        native.gemmF32(a, b, c, { m, n, k, transA: ta, transB: tb, inputsBf16: true });
        expectClose(c, r.c, r.mag, 1e-5, "bf16 inputs");
        // accumulate + BF16 output: C = bf16(C0 + AB).
        const c0 = randomF32(m * n, 13);
        const c2 = c0.slice();
        native.gemmF32(a, b, c2, { m, n, k, transA: ta, transB: tb, accumulate: true, outputBf16: true });
        for (let i = 0; i < c2.length; i++) {
          expect(roundBf16(c2.subarray(i, i + 1))[0]).toBe(c2[i]);
          expect(Math.abs(c2[i] - (c0[i] + want[i]))).toBeLessThanOrEqual(
            1e-5 * mag[i] + 2 ** -8 * Math.abs(c2[i]) + 1e-30,
          );
        }
      });

  it("is repeatable bit for bit and rejects aliasing", () => {
    const [m, n, k] = [300, 260, 400];
    const a = randomF32(m * k, 14);
    const b = randomF32(k * n, 15);
    const c1 = new Float32Array(m * n);
    const c2 = new Float32Array(m * n);
    native.gemmF32(a, b, c1, { m, n, k });
    for (let r = 0; r < 3; r++) {
      native.gemmF32(a, b, c2, { m, n, k });
      expect(bits(c2)).toEqual(bits(c1));
    }
    expect(() => native.gemmF32(a, b, a, { m: 1, n: 1, k: 1 })).toThrow(/shares memory/);
  });
});

function quantOperand(
  x: Float32Array,
  rows: number,
  cols: number,
  group: QuantGroup,
  format: Fp8Format,
  trans: boolean,
): QuantizedOperand {
  const q = quantize(x, rows, cols, { group, format });
  return { data: q.data, scales: q.scales, rows, cols, group, format, trans };
}

/** sum_k |A B| of the dequantised operands: the scale of the f32 summation-order differences. */
function fp8Magnitude(a: QuantizedOperand, b: QuantizedOperand, m: number, n: number, k: number) {
  const deq = (o: QuantizedOperand) => {
    const v = decodeFp8(o.data, o.format);
    const ns = o.scales.length;
    // A loose bound is enough: every value times the largest scale of its operand.
    let smax = 0;
    for (let i = 0; i < ns; i++) smax = Math.max(smax, o.scales[i]);
    return v.map((x) => Math.abs(x) * smax);
  };
  return naive(deq(a), deq(b), m, n, k, !!a.trans, !!b.trans).mag;
}

describe("gemmFp8 against fp8-core's scaledMatmul", () => {
  for (const [m, n, k] of SIZES)
    for (const [ta, tb] of TRANS)
      it(`${m}x${n}x${k} transA=${ta} transB=${tb}`, () => {
        const [ar, ac] = ta ? [k, m] : [m, k];
        const [br, bc] = tb ? [n, k] : [k, n];
        const ag: QuantGroup = ta ? "column-tile" : "tile";
        const a = quantOperand(randomF32(m * k, 21, 4), ar, ac, ag, "e4m3", ta);
        for (const [bg, bf] of [
          ["block", "e4m3"],
          ["tensor", "e5m2"],
        ] as [QuantGroup, Fp8Format][]) {
          const b = quantOperand(randomF32(k * n, 22), br, bc, bg, bf, tb);
          const want = scaledMatmul(a, b);
          const mag = fp8Magnitude(a, b, m, n, k);
          const c = new Float32Array(m * n).fill(Number.NaN);
          native.gemmFp8(
            { data: a.data, scales: a.scales, group: ag, format: "e4m3" },
            { data: b.data, scales: b.scales, group: bg, format: bf },
            c,
            { m, n, k, transA: ta, transB: tb, promotion: 128 },
          );
          expectClose(c, want, mag, 1e-5, `fp8 ${bg}`);
        }
      });

  it("rejects a scale that varies inside a promotion chunk", () => {
    const [m, n, k] = [4, 4, 256];
    const a = quantOperand(randomF32(m * k, 1), m, k, "tile", "e4m3", false);
    const b = quantOperand(randomF32(k * n, 2), k, n, "block", "e4m3", false);
    const c = new Float32Array(m * n);
    const run = (ag: QuantGroup, p: number) =>
      native.gemmFp8(
        { data: a.data, scales: a.scales, group: ag, format: "e4m3" },
        { data: b.data, scales: b.scales, group: "block", format: "e4m3" },
        c,
        { m, n, k, promotion: p },
      );
    expect(() => run("tile", 256)).toThrow(/promotion chunk/);
    expect(() => run("column-tile", 128)).toThrow(/promotion chunk/);
    expect(() => run("tile", 128)).not.toThrow();
  });
});

describe("grouped GEMMs equal the per-expert GEMMs", () => {
  it("segment m (Fprop/Dgrad), f32 and fp8, with an empty expert", () => {
    const [n, k] = [70, 200];
    const off = new Int32Array([0, 5, 5, 140, 300]);
    const [e, m] = [off.length - 1, 300];
    const a = randomF32(m * k, 31);
    const b = randomF32(e * k * n, 32);
    const c = new Float32Array(m * n);
    native.groupedGemmF32(a, b, c, off, "m", { m, n, k, transB: true });
    const qa = quantize(a, m, k, { group: "tile" });
    const qbs = Array.from({ length: e }, (_, i) =>
      quantize(b.subarray(i * k * n, (i + 1) * k * n), n, k, { group: "block" }),
    );
    const qb = new Uint8Array(e * k * n);
    for (const [i, q] of qbs.entries()) qb.set(q.data, i * k * n);
    const sb = new Float32Array(qbs.reduce((s, q) => s + q.scales.length, 0));
    for (const [i, q] of qbs.entries()) sb.set(q.scales, i * q.scales.length);
    const c8 = new Float32Array(m * n);
    native.groupedGemmFp8(
      { data: qa.data, scales: qa.scales, group: "tile", format: "e4m3" },
      { data: qb, scales: sb, group: "block", format: "e4m3" },
      c8,
      off,
      "m",
      { m, n, k, transB: true, promotion: 128 },
    );
    for (let i = 0; i < e; i++) {
      const [o, len] = [off[i], off[i + 1] - off[i]];
      const ae = a.subarray(o * k, (o + len) * k);
      const { c: want, mag } = naive(ae, b.subarray(i * k * n, (i + 1) * k * n), len, n, k, false, true);
      expectClose(c.subarray(o * n, (o + len) * n), want, mag, 1e-5, "grouped m f32");
      const qae = quantOperand(ae, len, k, "tile", "e4m3", false);
      const qbe: QuantizedOperand = {
        ...qbs[i],
        rows: n,
        cols: k,
        group: "block",
        format: "e4m3",
        trans: true,
      };
      const want8 = scaledMatmul(qae, qbe);
      expectClose(
        c8.subarray(o * n, (o + len) * n),
        want8,
        fp8Magnitude(qae, qbe, len, n, k),
        1e-5,
        "grouped m fp8",
      );
    }
  });

  it("segment k (Wgrad), f32 and fp8 with segmented column-tile scales, odd and empty segments", () => {
    const [m, n] = [33, 130];
    const off = new Int32Array([0, 0, 1, 130, 130, 386]);
    const [e, k] = [off.length - 1, 386];
    const a = randomF32(k * m, 41);
    const b = randomF32(k * n, 42);
    const c = new Float32Array(e * m * n);
    native.groupedGemmF32(a, b, c, off, "k", { m, n, k, transA: true });
    const quant = (x: Float32Array, cols: number) => {
      let ns = 0;
      for (let i = 0; i < e; i++) ns += Math.ceil((off[i + 1] - off[i]) / 128) * cols;
      const data = new Uint8Array(k * cols);
      const scales = new Float32Array(ns);
      native.quantizeFp8(
        x,
        { rows: k, cols, batch: 1, group: "column-tile", format: "e4m3" },
        { mode: "amax", eps: 1e-12 },
        data,
        scales,
        off,
      );
      return { data, scales };
    };
    const [qa, qb] = [quant(a, m), quant(b, n)];
    const c8 = new Float32Array(e * m * n).fill(Number.NaN);
    native.groupedGemmFp8(
      { data: qa.data, scales: qa.scales, group: "column-tile", format: "e4m3" },
      { data: qb.data, scales: qb.scales, group: "column-tile", format: "e4m3" },
      c8,
      off,
      "k",
      { m, n, k, transA: true, promotion: 128 },
    );
    for (let i = 0; i < e; i++) {
      const [o, len] = [off[i], off[i + 1] - off[i]];
      const [ae, be] = [a.subarray(o * m, (o + len) * m), b.subarray(o * n, (o + len) * n)];
      const { c: want, mag } = naive(ae, be, m, n, len, true, false);
      expectClose(c.subarray(i * m * n, (i + 1) * m * n), want, mag, 1e-5, "grouped k f32");
      const qae = quantOperand(ae, len, m, "column-tile", "e4m3", true);
      const qbe = quantOperand(be, len, n, "column-tile", "e4m3", false);
      const want8 = len === 0 ? new Float32Array(m * n) : scaledMatmul(qae, qbe);
      const mag8 = len === 0 ? new Float64Array(m * n) : fp8Magnitude(qae, qbe, m, n, len);
      expectClose(c8.subarray(i * m * n, (i + 1) * m * n), want8, mag8, 1e-5, "grouped k fp8");
    }
  });
});

describe("benchGemm", () => {
  it.each(["fp32", "bf16", "fp8"])("%s returns a positive median time", (p) => {
    const ms = native.benchGemm(p, 64, 64, 128, false, false, 3);
    expect(ms).toBeGreaterThan(0);
  });
});
