import { describe, expect, it } from "vitest";
import {
  decodeFp8,
  dequantize,
  type Fp8Format,
  matmulBf16,
  matmulF32,
  matmulF64,
  type QuantGroup,
  type QuantizedOperand,
  quantize,
  roundBf16,
  type ScaledMatmulOptions,
  scaledMatmul,
  scaleIndex,
  truncateSignificand,
} from "../src/index.ts";
import { randomNormal, rng } from "./helpers.ts";

/** Quantises a stored rows x cols matrix into a scaledMatmul operand. */
function operand(
  x: Float32Array,
  rows: number,
  cols: number,
  group: QuantGroup,
  trans = false,
  format: Fp8Format = "e4m3",
  unit = false,
): QuantizedOperand {
  return { ...quantize(x, rows, cols, { group, format, unit }), rows, cols, group, format, trans };
}

const deq = (op: QuantizedOperand) => dequantize(op, op.rows, op.cols, op);

function sqnrDb(c: ArrayLike<number>, ref: ArrayLike<number>): number {
  let signal = 0;
  let noise = 0;
  for (let i = 0; i < ref.length; i++) {
    signal += ref[i] ** 2;
    noise += (c[i] - ref[i]) ** 2;
  }
  return 10 * Math.log10(signal / noise);
}

function relError(c: ArrayLike<number>, ref: ArrayLike<number>): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < ref.length; i++) {
    num += (c[i] - ref[i]) ** 2;
    den += ref[i] ** 2;
  }
  return Math.sqrt(num / den);
}

/** Normal data with a few outlier channels (columns of a [rows, cols] matrix x100). */
function withOutliers(rows: number, cols: number, seed: number): Float32Array {
  const x = randomNormal(rows * cols, seed);
  for (const c of [3, 77, 130, 301].filter((c) => c < cols))
    for (let r = 0; r < rows; r++) x[r * cols + c] *= 100;
  return x;
}

// The four storage layouts, each with groups that are constant along K within 128-chunks:
// (A [M,K] | [K,M]) x (B [K,N] | [N,K]).
const LAYOUTS: { name: string; transA: boolean; groupA: QuantGroup; transB: boolean; groupB: QuantGroup }[] =
  [
    {
      name: "dgrad-like A[M,K] tile, B[K,N] block",
      transA: false,
      groupA: "tile",
      transB: false,
      groupB: "block",
    },
    {
      name: "fprop-like A[M,K] tile, B[N,K] block",
      transA: false,
      groupA: "tile",
      transB: true,
      groupB: "block",
    },
    {
      name: "wgrad-like A[K,M] column-tile, B[K,N] column-tile",
      transA: true,
      groupA: "column-tile",
      transB: false,
      groupB: "column-tile",
    },
    { name: "A[K,M] block, B[N,K] tile", transA: true, groupA: "block", transB: true, groupB: "tile" },
  ];

function build(
  M: number,
  K: number,
  N: number,
  layout: (typeof LAYOUTS)[number],
  seed: number,
  format: Fp8Format = "e4m3",
) {
  const [ar, ac] = layout.transA ? [K, M] : [M, K];
  const [br, bc] = layout.transB ? [N, K] : [K, N];
  const a = withOutliers(ar, ac, seed);
  const b = randomNormal(br * bc, seed + 1, 0.05);
  const A = operand(a, ar, ac, layout.groupA, layout.transA, format);
  const B = operand(b, br, bc, layout.groupB, layout.transB, format);
  const opts = { transA: layout.transA, transB: layout.transB };
  return { a, b, A, B, opts };
}

describe("scaledMatmul", () => {
  const M = 70;
  const K = 300;
  const N = 50;
  for (const layout of LAYOUTS)
    for (const promotion of [128, 64, 256]) {
      it(`${layout.name}, promotion ${promotion}: matches the f64 product of the dequantised operands`, () => {
        const { A, B, opts } = build(M, K, N, layout, 21);
        const c = scaledMatmul(A, B, { promotion });
        const da = deq(A);
        const db = deq(B);
        const ref = matmulF64(da, db, M, K, N, opts);
        const mag = matmulF64(da.map(Math.abs), db.map(Math.abs), M, K, N, opts);
        // f32 rounding: at most ~128 adds within a chunk, 2 scale products, one add per chunk.
        const gamma = (Math.min(promotion, K) + Math.ceil(K / promotion) + 3) * 2 ** -24;
        let worst = 0;
        for (let i = 0; i < ref.length; i++) {
          const err = Math.abs(c[i] - ref[i]);
          if (err > gamma * mag[i]) expect.fail(`element ${i}: ${c[i]} vs ${ref[i]}`);
          worst = Math.max(worst, err / mag[i]);
        }
        expect(worst).toBeLessThanOrEqual(1e-5);
      });
    }

  it("bit-exact against the spec's promotion loop written out per element, all layouts", () => {
    for (const layout of LAYOUTS) {
      const M = 20;
      const K = 300;
      const N = 12;
      const { A, B } = build(M, K, N, layout, 23);
      const c = scaledMatmul(A, B);
      const da = decodeFp8(A.data, A.format);
      const db = decodeFp8(B.data, B.format);
      const ia = scaleIndex(A.group, A.rows, A.cols);
      const ib = scaleIndex(B.group, B.rows, B.cols);
      // Stored position of logical A[m,k] and B[k,n].
      const posA = (m: number, k: number): [number, number] => (layout.transA ? [k, m] : [m, k]);
      const posB = (k: number, n: number): [number, number] => (layout.transB ? [n, k] : [k, n]);
      let differ = 0;
      for (let m = 0; m < M; m++)
        for (let n = 0; n < N; n++) {
          let acc = 0;
          for (let k0 = 0; k0 < K; k0 += 128) {
            let partial = 0;
            for (let k = k0; k < Math.min(k0 + 128, K); k++) {
              const [ar, ac] = posA(m, k);
              const [br, bc] = posB(k, n);
              partial = Math.fround(partial + da[ar * A.cols + ac] * db[br * B.cols + bc]);
            }
            const sa = A.scales[ia(...posA(m, k0))];
            const sb = B.scales[ib(...posB(k0, n))];
            acc = Math.fround(acc + Math.fround(Math.fround(partial * sa) * sb));
          }
          if (!Object.is(c[m * N + n], acc)) differ++;
        }
      expect(differ, layout.name).toBe(0);
    }
  });

  it("E5M2 operands and the tc14 accumulator with promotion also follow the dequantised product", () => {
    const { A, B, opts } = build(40, 260, 30, LAYOUTS[1], 22, "e5m2");
    const ref = matmulF64(deq(A), deq(B), 40, 260, 30, opts);
    expect(relError(scaledMatmul(A, B), ref)).toBeLessThan(1e-6);
    expect(relError(scaledMatmul(A, B, { accumulator: "tc14", promotion: 128 }), ref)).toBeLessThan(5e-3);
  });

  it("SQNR >= 25 dB against the unquantised f64 product, outlier channels included", () => {
    const T = 256;
    const IN = 512;
    const OUT = 96;
    const x = withOutliers(T, IN, 31);
    const w = randomNormal(OUT * IN, 32, 0.05);
    const dy = randomNormal(T * OUT, 33, 1e-3); // gradients are small
    // Fprop y = x W^T.
    const y = scaledMatmul(operand(x, T, IN, "tile"), operand(w, OUT, IN, "block", true));
    const yRef = matmulF64(x, w, T, IN, OUT, { transB: true });
    const yTensor = scaledMatmul(operand(x, T, IN, "tensor"), operand(w, OUT, IN, "tensor", true));
    // Wgrad dW = dy^T x, reduction over tokens.
    const dw = scaledMatmul(operand(dy, T, OUT, "column-tile", true), operand(x, T, IN, "column-tile"));
    const dwRef = matmulF64(dy, x, OUT, T, IN, { transA: true });
    const dwUnit = scaledMatmul(
      operand(dy, T, OUT, "tensor", true, "e4m3", true),
      operand(x, T, IN, "tensor", false, "e4m3", true),
    );
    const db = {
      fprop: sqnrDb(y, yRef),
      fpropTensorwise: sqnrDb(yTensor, yRef),
      fpropBf16: sqnrDb(matmulBf16(x, w, T, IN, OUT, { transB: true }), yRef),
      wgrad: sqnrDb(dw, dwRef),
      wgradUnscaled: sqnrDb(dwUnit, dwRef),
    };
    console.log(
      "SQNR dB",
      JSON.stringify(db, (_, v) => (typeof v === "number" ? Number(v.toFixed(1)) : v)),
    );
    expect(db.fprop).toBeGreaterThanOrEqual(25);
    expect(db.wgrad).toBeGreaterThanOrEqual(25);
    expect(db.fpropBf16).toBeGreaterThan(db.fprop);
    expect(db.fpropTensorwise).toBeGreaterThanOrEqual(20);
    expect(db.wgradUnscaled).toBeLessThan(20); // the negative control: small gradients underflow unscaled
  });

  it("promotion matters: at K = 4096 a 14-bit accumulator without promotion is far worse", () => {
    const M = 16;
    const N = 16;
    const report: Record<string, string> = {};
    let errNone = 0;
    let errPromoted = 0;
    let errTc14Promoted = 0;
    for (const K of [512, 4096]) {
      const A = operand(randomNormal(M * K, 41), M, K, "tensor");
      const B = operand(randomNormal(N * K, 42), N, K, "tensor", true);
      const ref = matmulF64(deq(A), deq(B), M, K, N, { transB: true });
      const run = (opts: ScaledMatmulOptions) => relError(scaledMatmul(A, B, opts), ref);
      errNone = run({ accumulator: "tc14" });
      errPromoted = run({ promotion: 128 });
      errTc14Promoted = run({ accumulator: "tc14", promotion: 128 });
      report[`K=${K}`] =
        `tc14 no promotion ${errNone.toExponential(2)}, tc14 promoted every 128 ${errTc14Promoted.toExponential(2)}, f32 promoted every 128 ${errPromoted.toExponential(2)}`;
    }
    console.log("relative error vs f64 of the dequantised operands:", report);
    expect(errNone).toBeGreaterThan(3 * errPromoted);
    expect(errNone).toBeGreaterThan(3 * errTc14Promoted);
    expect(errNone).toBeGreaterThan(5e-3); // on the order of the report's ~2%
    expect(errPromoted).toBeLessThan(1e-6);
  });

  it("tile scales without promotion are applied per product (no single scale per chunk)", () => {
    const { A, B, opts } = build(8, 384, 8, LAYOUTS[1], 43);
    const ref = matmulF64(deq(A), deq(B), 8, 384, 8, opts);
    expect(relError(scaledMatmul(A, B, { promotion: Number.POSITIVE_INFINITY }), ref)).toBeLessThan(1e-6);
    expect(relError(scaledMatmul(A, B, { accumulator: "tc14" }), ref)).toBeGreaterThan(1e-4);
  });

  it("rejects groups whose scale varies along K, mismatched K, bad options", () => {
    const x = randomNormal(64 * 256, 44);
    const w = randomNormal(32 * 256, 45);
    const good = operand(w, 32, 256, "block", true);
    expect(() => scaledMatmul(operand(x, 64, 256, "column-tile"), good)).toThrow(
      /operand A stored with K along its columns cannot use group "column-tile".*allowed: tile, block, row, tensor/,
    );
    expect(() => scaledMatmul(operand(x, 64, 256, "tile"), operand(w, 32, 256, "tile"))).toThrow(
      /inner dimensions/,
    );
    expect(() => scaledMatmul(operand(x, 64, 256, "tile"), operand(w, 256, 32, "tile"))).toThrow(
      /operand B stored with K along its rows cannot use group "tile".*allowed: column-tile, block, tensor/,
    );
    expect(() => scaledMatmul(operand(x, 256, 64, "row", true), good)).toThrow(/operand A.*"row"/);
    expect(() => scaledMatmul(operand(x, 64, 256, "tile"), good, { promotion: 0 })).toThrow(/promotion/);
    expect(() => scaledMatmul(operand(x, 64, 256, "row"), operand(w, 32, 256, "row", true))).not.toThrow();
  });
});

describe("plain GEMMs", () => {
  it("matmulF32 adds f32-rounded products in order of k; all transposes agree", () => {
    const M = 9;
    const K = 33;
    const N = 7;
    const a = randomNormal(M * K, 51);
    const b = randomNormal(K * N, 52);
    const c = matmulF32(a, b, M, K, N);
    for (let m = 0; m < M; m++)
      for (let n = 0; n < N; n++) {
        let acc = 0;
        for (let k = 0; k < K; k++) acc = Math.fround(acc + Math.fround(a[m * K + k] * b[k * N + n]));
        expect(c[m * N + n]).toBe(acc);
      }
    const at = new Float32Array(K * M);
    const bt = new Float32Array(N * K);
    for (let m = 0; m < M; m++) for (let k = 0; k < K; k++) at[k * M + m] = a[m * K + k];
    for (let k = 0; k < K; k++) for (let n = 0; n < N; n++) bt[n * K + k] = b[k * N + n];
    expect(matmulF32(at, bt, M, K, N, { transA: true, transB: true })).toEqual(c);
    expect(matmulF32(at, b, M, K, N, { transA: true })).toEqual(c);
    expect(matmulF32(a, bt, M, K, N, { transB: true })).toEqual(c);
    const ref = matmulF64(a, b, M, K, N);
    expect(relError(c, ref)).toBeLessThan(1e-6);
    expect(matmulF64(at, bt, M, K, N, { transA: true, transB: true })).toEqual(ref);
  });

  it("matmulBf16 rounds its inputs to BF16 and accumulates in f32", () => {
    const a = randomNormal(12 * 40, 53);
    const b = randomNormal(40 * 10, 54);
    const c = matmulBf16(a, b, 12, 40, 10);
    expect(c).toEqual(matmulF32(roundBf16(a), roundBf16(b), 12, 40, 10));
    const err = relError(c, matmulF64(a, b, 12, 40, 10));
    expect(err).toBeGreaterThan(1e-4);
    expect(err).toBeLessThan(1e-2);
    expect(() => matmulF32(a, b, 12, 41, 10)).toThrow(/expected 12x41/);
  });

  it("truncateSignificand keeps the top bits, toward zero", () => {
    expect(truncateSignificand(1 + 2 ** -13 + 2 ** -14, 14)).toBe(1 + 2 ** -13);
    expect(truncateSignificand(-(1 + 2 ** -13 + 2 ** -14), 14)).toBe(-(1 + 2 ** -13));
    expect(truncateSignificand(3 * 2 ** 40 - 1, 14)).toBe(3 * 2 ** 40 - 2 ** 28);
    expect(truncateSignificand(0, 14)).toBe(0);
    const r = rng(55);
    for (let i = 0; i < 1000; i++) {
      const x = (r.uniform() - 0.5) * 2 ** ((r.next() % 40) - 20);
      const t = truncateSignificand(x, 14);
      const ulp = 2 ** (Math.floor(Math.log2(Math.abs(x))) - 13);
      expect(Math.abs(t)).toBeLessThanOrEqual(Math.abs(x));
      expect(Math.abs(x - t)).toBeLessThan(ulp * 1.0000001);
      expect(Number.isInteger(t / (ulp / 2))).toBe(true);
    }
  });
});
