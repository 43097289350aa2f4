import { describe, expect, it } from "vitest";
import {
  decodeFp8Scalar,
  dequantize,
  encodeFp8,
  encodeFp8Scalar,
  FP8_MAX,
  type Fp8Format,
  pow2Ceil,
  type QuantGroup,
  quantize,
  scaleIndex,
  scaleShape,
} from "../src/index.ts";
import { randomNormal, rng } from "./helpers.ts";

const GROUPS: QuantGroup[] = ["tile", "block", "column-tile", "row", "tensor"];
const FORMATS: Fp8Format[] = ["e4m3", "e5m2"];
/** Relative half-ulp of the normal range, and half the subnormal step. */
const HALF_ULP = { e4m3: 2 ** -4, e5m2: 2 ** -3 };
const HALF_SUB = { e4m3: 2 ** -10, e5m2: 2 ** -17 };

/** The groups as lists of element indices, enumerated straight from the spec's descriptions. */
function groupsOf(rows: number, cols: number, group: QuantGroup): number[][] {
  const out: number[][] = [];
  const range = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => from + i);
  const rowsOf = (rb: number) => range(rb * 128, Math.min(rows, rb * 128 + 128));
  const colsOf = (cb: number) => range(cb * 128, Math.min(cols, cb * 128 + 128));
  const nrb = Math.ceil(rows / 128);
  const ncb = Math.ceil(cols / 128);
  if (group === "tile")
    for (let r = 0; r < rows; r++)
      for (let cb = 0; cb < ncb; cb++) out.push(colsOf(cb).map((c) => r * cols + c));
  if (group === "block")
    for (let rb = 0; rb < nrb; rb++)
      for (let cb = 0; cb < ncb; cb++)
        out.push(rowsOf(rb).flatMap((r) => colsOf(cb).map((c) => r * cols + c)));
  if (group === "column-tile")
    for (let rb = 0; rb < nrb; rb++)
      for (let c = 0; c < cols; c++) out.push(rowsOf(rb).map((r) => r * cols + c));
  if (group === "row") for (let r = 0; r < rows; r++) out.push(range(0, cols).map((c) => r * cols + c));
  if (group === "tensor") out.push(range(0, rows * cols));
  return out;
}

/** The spec's formulas, written out per group. */
function reference(
  x: Float32Array,
  rows: number,
  cols: number,
  group: QuantGroup,
  format: Fp8Format,
  pow2: boolean,
) {
  const fmax = FP8_MAX[format];
  const groups = groupsOf(rows, cols, group);
  const data = new Uint8Array(x.length);
  const scales = new Float32Array(groups.length);
  groups.forEach((members, g) => {
    const amax = Math.max(Math.fround(1e-12), ...members.map((i) => Math.abs(x[i])));
    if (pow2) {
      const q = Math.fround(amax / fmax);
      let s = 1;
      while (s < q) s *= 2;
      while (s / 2 >= q) s /= 2;
      scales[g] = s;
      for (const i of members) data[i] = encodeFp8Scalar(Math.fround(x[i] / s), format);
    } else {
      const inv = Math.fround(fmax / amax);
      scales[g] = Math.fround(amax / fmax);
      for (const i of members) data[i] = encodeFp8Scalar(Math.fround(x[i] * inv), format);
    }
  });
  return { data, scales, groups };
}

/** Random normal data with a few outlier columns and rows of different magnitudes. */
function testMatrix(rows: number, cols: number, seed: number): Float32Array {
  const x = randomNormal(rows * cols, seed);
  for (let r = 0; r < rows; r++)
    for (let c = 0; c < cols; c++) {
      const i = r * cols + c;
      if (c % 37 === 5) x[i] *= 100;
      x[i] *= 10 ** ((r % 7) - 3);
    }
  return x;
}

function countDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let n = 0;
  for (let i = 0; i < a.length; i++) if (!Object.is(a[i], b[i])) n++;
  return n;
}

describe("scale shapes and indices", () => {
  it("shapes per group", () => {
    expect(scaleShape(300, 200, "tile")).toEqual([300, 2]);
    expect(scaleShape(300, 200, "block")).toEqual([3, 2]);
    expect(scaleShape(300, 200, "column-tile")).toEqual([3, 200]);
    expect(scaleShape(300, 200, "row")).toEqual([300, 1]);
    expect(scaleShape(300, 200, "tensor")).toEqual([1, 1]);
    expect(scaleShape(128, 128, "block")).toEqual([1, 1]);
    expect(scaleShape(129, 257, "block")).toEqual([2, 3]);
    for (const g of GROUPS) {
      const [sr, sc] = scaleShape(300, 200, g);
      expect(quantize(new Float32Array(300 * 200), 300, 200, { group: g }).scales.length).toBe(sr * sc);
    }
    expect(() => scaleShape(1, 1, "blocks" as QuantGroup)).toThrow(/unknown quantisation group "blocks"/);
  });

  it("scaleIndex agrees with the enumerated groups", () => {
    for (const g of GROUPS) {
      const idx = scaleIndex(g, 300, 200);
      groupsOf(300, 200, g).forEach((members, s) => {
        for (const i of members)
          if (idx(Math.floor(i / 200), i % 200) !== s) expect.fail(`${g}: element ${i}`);
      });
    }
  });
});

describe("quantize", () => {
  for (const format of FORMATS)
    for (const pow2 of [false, true])
      it(`${format}${pow2 ? " pow2" : ""}: bit-exact against the spec's formulas, every group, 300x200`, () => {
        const x = testMatrix(300, 200, 11);
        for (const group of GROUPS) {
          const got = quantize(x, 300, 200, { group, format, pow2Scales: pow2 });
          const want = reference(x, 300, 200, group, format, pow2);
          expect(countDiff(got.scales, want.scales), `${group} scales`).toBe(0);
          expect(countDiff(got.data, want.data), `${group} data`).toBe(0);
        }
      });

  it("values scaled onto FP8 ties: f32(x * inv) exactly as the spec orders it", () => {
    // Each row is one tile whose amax makes inv inexact; its other values land on (or one f32 ulp
    // beside) midpoints between FP8 values after scaling, where the rounding order decides the code.
    const r = rng(17);
    const rows = 200;
    const cols = 128;
    const x = new Float32Array(rows * cols);
    for (let row = 0; row < rows; row++) {
      const amax = Math.fround(1 + r.uniform() * 7);
      const inv = Math.fround(448 / amax);
      x[row * cols] = amax;
      for (let c = 1; c < cols; c++) {
        const code = 1 + (r.next() % 0x7c);
        const mid = (decodeFp8Scalar(code, "e4m3") + decodeFp8Scalar(code + 1, "e4m3")) / 2;
        const v = Math.fround(mid / inv);
        const u = new Float32Array([v]);
        const bits = new Uint32Array(u.buffer);
        bits[0] += (c % 3) - 1; // v - 1 ulp, v, v + 1 ulp
        x[row * cols + c] = u[0];
      }
    }
    const got = quantize(x, rows, cols, { group: "tile" });
    const want = reference(x, rows, cols, "tile", "e4m3", false);
    expect(countDiff(got.data, want.data)).toBe(0);
    // The test can tell the spec's order from a plausible other one, x / scale.
    let otherOrder = 0;
    for (let i = 0; i < x.length; i++) {
      const alt = encodeFp8Scalar(Math.fround(x[i] / want.scales[Math.floor(i / cols)]), "e4m3");
      if (alt !== want.data[i]) otherOrder++;
    }
    expect(otherOrder).toBeGreaterThan(0);
  });

  it("pow2Ceil: the smallest power of two >= q, from the bits, subnormals included", () => {
    expect(pow2Ceil(3)).toBe(4);
    expect(pow2Ceil(4)).toBe(4);
    expect(pow2Ceil(Math.fround(4.000001))).toBe(8);
    expect(pow2Ceil(Math.fround(Math.fround(1e-12) / 448))).toBe(2 ** -48);
    expect(pow2Ceil(3 * 2 ** -140)).toBe(2 ** -138);
    expect(pow2Ceil(2 ** -149)).toBe(2 ** -149);
    expect(pow2Ceil(2 ** -126 - 2 ** -149)).toBe(2 ** -126);
    expect(pow2Ceil(0)).toBe(2 ** -149);
  });

  it("power-of-two scales are powers of two, the smallest >= f32(amax / FMAX)", () => {
    const x = testMatrix(300, 200, 12);
    for (const format of FORMATS)
      for (const group of GROUPS) {
        const { scales, groups } = {
          ...quantize(x, 300, 200, { group, format, pow2Scales: true }),
          ...reference(x, 300, 200, group, format, true),
        };
        groups.forEach((members, g) => {
          const amax = Math.max(...members.map((i) => Math.abs(x[i])));
          const q = Math.fround(amax / FP8_MAX[format]);
          const s = scales[g];
          expect(Number.isInteger(Math.log2(s))).toBe(true);
          expect(s >= q && s / 2 < q).toBe(true);
        });
      }
  });

  for (const format of FORMATS)
    for (const pow2 of [false, true])
      it(`${format}${pow2 ? " pow2" : ""}: round-trip error within half an FP8 ulp per element and per group amax`, () => {
        const x = testMatrix(300, 200, 13);
        const u = HALF_ULP[format];
        for (const group of GROUPS) {
          const q = quantize(x, 300, 200, { group, format, pow2Scales: pow2 });
          const y = dequantize(q, 300, 200, { group, format });
          const idx = scaleIndex(group, 300, 200);
          const { groups } = reference(x, 300, 200, group, format, pow2);
          const amaxOf = groups.map((m) => Math.max(...m.map((i) => Math.abs(x[i]))));
          const groupOf = new Int32Array(x.length);
          groups.forEach((m, g) => {
            for (const i of m) groupOf[i] = g;
          });
          let worst = 0;
          for (let i = 0; i < x.length; i++) {
            const scale = q.scales[idx(Math.floor(i / 200), i % 200)];
            const err = Math.abs(y[i] - x[i]);
            // RNE in the normal range: u|x|; in the subnormal range: half a step, times the scale.
            const bound = (u + 2 ** -20) * Math.abs(x[i]) + HALF_SUB[format] * scale * (1 + 2 ** -20);
            if (err > bound) expect.fail(`${group}: element ${i} error ${err} > ${bound}`);
            worst = Math.max(worst, err / amaxOf[groupOf[i]]);
          }
          expect(worst, group).toBeLessThanOrEqual(u + 2 ** -18);
          expect(worst, group).toBeGreaterThan(u / 8); // the bound is not vacuous
        }
      });

  it("dequantize is decode(q) * scale in f32", () => {
    const x = testMatrix(130, 260, 14);
    for (const group of GROUPS) {
      const q = quantize(x, 130, 260, { group, format: "e5m2" });
      const y = dequantize(q, 130, 260, { group, format: "e5m2" });
      const idx = scaleIndex(group, 130, 260);
      for (let r = 0; r < 130; r += 7)
        for (let c = 0; c < 260; c += 3)
          expect(y[r * 260 + c]).toBe(
            Math.fround(decodeFp8Scalar(q.data[r * 260 + c], "e5m2") * q.scales[idx(r, c)]),
          );
    }
  });

  it("partial groups at the edges use only their own values", () => {
    const x = randomNormal(300 * 200, 15);
    x[299 * 200 + 199] = 1000; // the last tile/block/column-tile, all partial
    const at = (group: QuantGroup, r: number, c: number) =>
      quantize(x, 300, 200, { group }).scales[scaleIndex(group, 300, 200)(r, c)];
    for (const group of ["tile", "block", "column-tile"] as QuantGroup[]) {
      expect(at(group, 299, 199)).toBe(Math.fround(1000 / 448));
      expect(at(group, 299, 199 - 128)).toBeLessThan(0.1); // its neighbours do not see the outlier
      expect(at(group, 299 - 128 - 44, 199)).toBeLessThan(0.1);
    }
    const q = quantize(x, 300, 200, { group: "block" });
    expect(q.data[299 * 200 + 199]).toBe(0x7e);
  });

  it("all-zero groups: scale eps / FMAX, data zero", () => {
    const x = new Float32Array(200 * 300);
    x[5] = -0;
    for (const format of FORMATS)
      for (const group of GROUPS) {
        const q = quantize(x, 200, 300, { group, format });
        expect(q.scales.every((s) => s === Math.fround(Math.fround(1e-12) / FP8_MAX[format]))).toBe(true);
        expect(q.data.every((c, i) => c === (i === 5 ? 0x80 : 0))).toBe(true);
        const p = quantize(x, 200, 300, { group, format, pow2Scales: true });
        expect(p.scales.every((s) => s === 2 ** Math.ceil(Math.log2(1e-12 / FP8_MAX[format])))).toBe(true);
        expect(dequantize(p, 200, 300, { group, format }).every((v) => v === 0)).toBe(true);
      }
    const e = quantize(new Float32Array(4), 2, 2, { group: "tensor", eps: 1e-6 });
    expect(e.scales[0]).toBe(Math.fround(Math.fround(1e-6) / 448));
  });

  it("a tensor spanning 1e-30 to 1e9: tile groups keep every group at FP8 precision, above eps", () => {
    const rows = 64;
    const cols = 256;
    const r0 = rng(16);
    const x = new Float32Array(rows * cols);
    for (let r = 0; r < rows; r++)
      for (let c = 0; c < cols; c++)
        x[r * cols + c] =
          (r0.uniform() < 0.5 ? -1 : 1) * 10 ** (-30 + (39 * r) / (rows - 1)) * (1 + r0.uniform());
    for (const eps of [1e-12, 1e-35]) {
      const q = quantize(x, rows, cols, { group: "tile", eps });
      const y = dequantize(q, rows, cols, { group: "tile" });
      for (let i = 0; i < x.length; i++) {
        const err = Math.abs(y[i] - x[i]);
        const amaxAtLeast = Math.abs(x[i]);
        if (amaxAtLeast >= eps * 2) {
          // The group holds values within a factor 2 of each other: all in E4M3's normal range.
          if (err > (2 ** -4 + 2 ** -20) * Math.abs(x[i]))
            expect.fail(`eps ${eps}: element ${i}: ${x[i]} -> ${y[i]}`);
        } else if (x[i] !== 0 && Math.abs(x[i]) < eps * 2 ** -20) {
          expect(Math.abs(y[i])).toBe(0); // far below the eps floor: flushed
        }
      }
      expect(q.scales.every((s) => Number.isFinite(s) && s > 0)).toBe(true);
    }
    // One scale for the whole tensor: only the top few decades survive, within the error bound.
    const t = quantize(x, rows, cols, { group: "tensor" });
    const y = dequantize(t, rows, cols, { group: "tensor" });
    let flushed = 0;
    for (let i = 0; i < x.length; i++) {
      const bound = (2 ** -4 + 2 ** -20) * Math.abs(x[i]) + 2 ** -10 * t.scales[0];
      if (Math.abs(y[i] - x[i]) > bound) expect.fail(`tensor: element ${i}`);
      if (y[i] === 0) flushed++;
    }
    expect(flushed).toBeGreaterThan(x.length / 2);
  });

  it("unit scales: encoded as they are, saturating", () => {
    const x = Float32Array.of(1, -2.5, 1000, -1e9, 0.001, 3e-3);
    const q = quantize(x, 2, 3, { group: "tile", unit: true });
    expect(Array.from(q.scales)).toEqual([1, 1]);
    expect(Array.from(q.data)).toEqual(Array.from(encodeFp8(x, "e4m3")));
    expect(Array.from(dequantize(q, 2, 3, { group: "tile" }))).toEqual([
      1,
      -2.5,
      448,
      -448,
      2 ** -9,
      2 ** -8,
    ]);
  });

  it("rejects bad shapes and eps", () => {
    expect(() => quantize(new Float32Array(5), 2, 3, { group: "tile" })).toThrow(/do not fill/);
    expect(() => quantize(new Float32Array(6), 2, 3, { group: "tile", eps: 0 })).toThrow(/eps/);
    expect(() => quantize(new Float32Array(6), 2, 3, { group: "nope" as QuantGroup })).toThrow(
      /unknown quantisation group/,
    );
  });
});
