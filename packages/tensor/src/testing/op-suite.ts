// One op test suite, run against every backend present (tfjs/burn style). Each case builds the same
// random inputs on the backend under test and on the `ts` reference and compares the outputs:
// bit-exact where docs/numerics.md pins bits (quantisation), a relative tolerance by precision elsewhere.
// Gradient checks by finite differences run on the backend under test for every op with a backward.
import { describe, expect, it } from "vitest";
import type { AdamWOptions, Backend, QuantizeOptions } from "../backend.ts";
import { Rng } from "../random.ts";
import type { Tensor } from "../tensor.ts";
import { TsBackend } from "../ts/backend.ts";
import type { HostArray } from "../types.ts";
import { adamwSteps } from "./adamw.ts";
import { relErr } from "./rel-err.ts";

type Outputs = Tensor | Tensor[] | Record<string, Tensor>;
type Case = (b: Backend) => Outputs;

function flatten(o: Outputs): [string, Tensor][] {
  if (Array.isArray(o)) return o.map((t, i) => [String(i), t]);
  if ("backend" in o && "shape" in o) return [["out", o as Tensor]];
  return Object.entries(o as Record<string, Tensor>);
}

async function readAll(b: Backend, c: Case): Promise<[string, HostArray, string][]> {
  return b.scope(async () => {
    const out: [string, HostArray, string][] = [];
    for (const [k, t] of flatten(c(b))) out.push([k, await t.read(), t.dtype]);
    return out;
  });
}

/**
 * Causal attention forward and backward on random q, k, v and dO of one shape (drawn once from rng),
 * per precision: the outputs o, lse, dq, dk, dv.
 */
export function attentionForwardBackward(rng: Rng, B: number, T: number, H: number, dqk: number, dv: number) {
  const q = rng.normals(B * T * H * dqk);
  const k = rng.normals(B * T * H * dqk);
  const v = rng.normals(B * T * H * dv);
  const dO = rng.normals(B * T * H * dv);
  return (precision: "f32" | "bf16") =>
    (b: Backend): Record<string, Tensor> => {
      const opts = { batch: B, seq: T, heads: H, scale: 1 / Math.sqrt(dqk), precision };
      const Q = b.upload(q, [B * T, H * dqk]);
      const K = b.upload(k, [B * T, H * dqk]);
      const V = b.upload(v, [B * T, H * dv]);
      const { o, lse } = b.attention(Q, K, V, opts);
      const g = b.attentionBackward(b.upload(dO, [B * T, H * dv]), Q, K, V, o, lse, opts);
      return { o, lse, dq: g.dq, dk: g.dk, dv: g.dv };
    };
}

/** Sizes that are not multiples of 128 or of any SIMD width, and some that are. */
export const ODD_SIZES = [1, 3, 17, 64, 129, 200];

export function opSuite(name: string, make: () => Backend): void {
  const ref = new TsBackend();
  const be = make();

  async function same(c: Case, tol: number | "exact") {
    const want = await readAll(ref, c);
    const got = await readAll(be, c);
    expect(got.map((g) => g[0])).toEqual(want.map((w) => w[0]));
    for (let i = 0; i < want.length; i++) {
      const [key, w, dtype] = want[i];
      const g = got[i][1];
      expect(got[i][2], `${key} dtype`).toBe(dtype);
      if (tol === "exact" || dtype === "i32" || dtype === "e4m3" || dtype === "e5m2")
        expect(Array.from(g), `${key} bit-exact`).toEqual(Array.from(w));
      else expect(relErr(g, w), `${key} relative error`).toBeLessThanOrEqual(tol);
    }
  }

  /** Directional finite difference of L(x) = sum(r * f(x)) against the analytic gradient. */
  async function gradCheck(
    f: (b: Backend, x: Tensor) => Tensor,
    grad: (b: Backend, x: Tensor, r: Tensor, rHost: Float32Array) => Tensor,
    x0: Float32Array,
    shape: number[],
    outSize: number,
    seed: number,
    tol = 2e-3,
  ) {
    const rng = new Rng(seed);
    const r = rng.normals(outSize);
    const d = rng.normals(x0.length);
    const h = 1e-2;
    const L = async (x: Float32Array) =>
      be.scope(async () => {
        const y = await f(be, be.upload(x, shape)).read();
        let s = 0;
        for (let i = 0; i < y.length; i++) s += r[i] * y[i];
        return s;
      });
    const xp = x0.map((v, i) => v + h * d[i]);
    const xm = x0.map((v, i) => v - h * d[i]);
    const fd = ((await L(xp)) - (await L(xm))) / (2 * h);
    const g = await be.scope(async () => grad(be, be.upload(x0, shape), be.upload(r, [outSize]), r).read());
    let an = 0;
    for (let i = 0; i < g.length; i++) an += g[i] * d[i];
    expect(Math.abs(fd - an) / Math.max(1e-3, Math.abs(an)), `fd ${fd} vs analytic ${an}`).toBeLessThan(tol);
  }

  describe(`op suite: ${name}`, () => {
    const rng = new Rng(1234);

    it("elementwise ops, casts and sums", async () => {
      const a = rng.normals(1000);
      const b2 = rng.normals(1000);
      await same((b) => {
        const x = b.upload(a, [40, 25]);
        const y = b.upload(b2, [40, 25]);
        const acc = b.copy(x);
        b.addInto(acc, y, -0.5);
        const z = b.zeros([3, 3]);
        b.fill(z, 2.5);
        return {
          add: b.add(x, y),
          acc,
          scale: b.scale(x, 3),
          z,
          sum: b.sum(x),
          bf: b.cast(x, "bf16"),
          back: b.cast(b.cast(x, "bf16"), "f32"),
        };
      }, 1e-6);
    });

    it("rows copies a row range and setRows writes one back (f32 and i32)", async () => {
      const x = rng.normals(7 * 5);
      const ids = Int32Array.from({ length: 9 }, (_, i) => i * 3 - 4);
      await same((b) => {
        const t = b.upload(x, [7, 5]);
        const mid = b.rows(t, 2, 3);
        const dst = b.zeros([7, 5]);
        b.setRows(dst, 4, mid);
        b.setRows(dst, 0, b.rows(t, 6, 1));
        const i = b.upload(ids, [9], "i32");
        return { mid, dst, tail: b.rows(i, 5, 4), none: b.rows(t, 7, 0) };
      }, "exact");
    });

    it("toWords/fromWords: BF16 and FP8 rows as i32 words and f32 scales, and back, bit for bit", async () => {
      const [N, d] = [9, 264];
      const x = rng.normals(N * d, 2);
      // Rows of the words and scales taken apart and put together again (as dispatch does) give the
      // rows' own values: of BF16, the cast rows; of FP8 1x128 tiles or rows, the quantised rows.
      const regroup = (b: Backend, w: Tensor): Tensor => {
        const out = b.zeros([N, w.cols], w.dtype);
        b.setRows(out, 0, b.rows(w, 5, 4));
        b.setRows(out, 4, b.rows(w, 0, 5));
        return out;
      };
      await same((b) => {
        const X = b.upload(x, [N, d]);
        const swapped = b.zeros([N, d]);
        b.setRows(swapped, 0, b.rows(X, 5, 4));
        b.setRows(swapped, 4, b.rows(X, 0, 5));
        const out: Record<string, Tensor> = {};
        const h = b.toWords(b.cast(X, "bf16"));
        expect(h.scales).toBeNull();
        expect(h.words.shape).toEqual([N, d / 2]);
        out.bf16 = b.fromWords(regroup(b, h.words), null, { dtype: "bf16" });
        out.bf16Want = b.cast(swapped, "bf16");
        for (const group of ["tile", "row"] as const)
          for (const format of ["e4m3", "e5m2"] as const) {
            const w = b.toWords(b.quantize(X, { group, format }));
            expect(w.words.shape).toEqual([N, d / 4]);
            expect(w.scales!.shape).toEqual([N, group === "tile" ? 3 : 1]);
            const q = b.fromWords(regroup(b, w.words), regroup(b, w.scales!), { dtype: format, group });
            const want = b.quantize(swapped, { group, format });
            expect(q.quant).toMatchObject({ group, format });
            Object.assign(out, {
              [`${group}.${format}`]: q,
              [`${group}.${format}.scales`]: q.quant!.scales,
              [`${group}.${format}.want`]: want,
              [`${group}.${format}.wantScales`]: want.quant!.scales,
            });
          }
        return out;
      }, "exact");
      // What has no word form, or words that do not match the kind, is refused.
      const X = be.upload(x, [N, d]);
      expect(() => be.toWords(X)).toThrow(/not a 2-D BF16 or FP8 matrix/);
      expect(() => be.toWords(be.cast(be.upload(x.subarray(0, 3 * 3), [3, 3]), "bf16"))).toThrow(
        /4-byte words/,
      );
      expect(() => be.toWords(be.quantize(X, { group: "block" }))).toThrow(/1x128 tiles or rows/);
      const w = be.toWords(be.quantize(X, { group: "tile" }));
      expect(() => be.fromWords(w.words, null, { dtype: "e4m3", group: "tile" })).toThrow(
        /need 27 f32 scales/,
      );
      expect(() => be.fromWords(w.words, w.scales, { dtype: "bf16" })).toThrow(/without scales/);
      expect(() => be.fromWords(w.scales!, null, { dtype: "bf16" })).toThrow(/not an i32 matrix/);
    });

    it("quantize is bit-exact in every group layout, format and scale option", async () => {
      for (const [rows, cols] of [
        [1, 1],
        [3, 200],
        [129, 17],
        [256, 384],
      ]) {
        const x = rng.normals(rows * cols, 3);
        x[0] = 1e-30;
        if (x.length > 5) x[5] = -2e4;
        for (const group of ["tile", "block", "column-tile", "row", "tensor"] as const)
          for (const format of ["e4m3", "e5m2"] as const)
            for (const extra of [{}, { pow2Scales: true }, { unit: true }])
              await same((b) => {
                const q = b.quantize(b.upload(x, [rows, cols]), { group, format, ...extra });
                return { q, scales: q.quant!.scales, deq: b.dequantize(q) };
              }, "exact");
      }
    });

    // Widths a multiple of 16 too: the widths cuda stores K-major on Hopper (for its Wgrad).
    it("quantize 128x1 restarts groups at expert segments; batched 128x128 blocks per matrix", async () => {
      const seg = Int32Array.of(0, 0, 130, 131, 300);
      for (const cols of [40, 48]) {
        const x = rng.normals(300 * cols);
        await same((b) => {
          const q = b.quantize(b.upload(x, [300, cols]), {
            group: "column-tile",
            segments: b.upload(seg, [5], "i32"),
          });
          return { q, scales: q.quant!.scales, deq: b.dequantize(q), copy: b.copy(q) };
        }, "exact");
      }
      const w = rng.normals(3 * 130 * 70);
      await same((b) => {
        const q = b.quantize(b.upload(w, [3, 130, 70]), { group: "block" });
        return { q, scales: q.quant!.scales };
      }, "exact");
    });

    it("requantize equals quantize(dequantize): 1x128 tiles to 128x1 column tiles, with and without segments", async () => {
      const x = rng.normals(300 * 256, 2);
      x[7] = 3e4;
      const seg = Int32Array.of(0, 0, 130, 131, 300);
      // 256: whole 128-column blocks (cuda's requant_tile_kmajor on Hopper).
      for (const cols of [200, 208, 256])
        for (const format of ["e4m3", "e5m2"] as const)
          for (const segments of [false, true])
            await same((b) => {
              const q = b.quantize(b.upload(x.subarray(0, 300 * cols), [300, cols]), {
                group: "tile",
                format: "e4m3",
              });
              const opts = {
                group: "column-tile" as const,
                format,
                segments: segments ? b.upload(seg, [5], "i32") : undefined,
              };
              const r = b.requantize(q, opts);
              const twice = b.quantize(b.dequantize(q), opts);
              return { q: r, scales: r.quant!.scales, deq: b.dequantize(r), twice: b.dequantize(twice) };
            }, "exact");
    });

    it("quantisers code NaN as 0x7f whatever its sign or payload, and infinities alike (E4M3)", async () => {
      // The cuda kernels convert two values at once and repair NaN bytes for the whole word after:
      // NaNs of both signs and two payloads, and infinities (whose tiles' scales become inf), in
      // every layout the model quantises into, and requantized from codes that hold NaN.
      const rows = 256;
      const cols = 256;
      const x = new Float32Array(rng.normals(rows * cols, 3));
      const bits = new Uint32Array(x.buffer);
      for (let i = 0; i < x.length; i += 97) bits[i] = i % 2 ? 0xffc00000 : 0x7fc00123;
      for (let i = 5; i < x.length; i += 1031)
        x[i] = i % 2 ? Number.POSITIVE_INFINITY : Number.NEGATIVE_INFINITY;
      await same((b) => {
        const X = b.upload(x, [rows, cols]);
        const segments = b.upload(new Int32Array([0, 100, 100, 229, 256]), [5], "i32");
        const tile = b.quantize(X, { group: "tile" });
        const col = b.quantize(X, { group: "column-tile", segments });
        const block = b.quantize(X, { group: "block" });
        const re = b.requantize(tile, { group: "column-tile", segments });
        const out: Record<string, Tensor> = {};
        for (const [k, t] of Object.entries({ tile, col, block, re })) {
          out[k] = t;
          out[`${k}Scales`] = t.quant!.scales;
        }
        return out;
      }, "exact");
    });

    it("fp8Flow counts clipped and flushed values", async () => {
      // Unscaled E4M3: 1000, inf, NaN, 470 and 1e4 clip (beyond 464, half an ulp above 448), 1e-4
      // and -2e-5 flush to zero; unscaled E5M2 clips only inf and NaN and keeps the small values.
      const x = new Float32Array(256);
      x.set([1000, Number.POSITIVE_INFINITY, Number.NaN, 470, 448, 1e4, 1e-4, -2e-5, 0, 3]);
      const counts = async (b: Backend, opts: Parameters<Backend["quantize"]>[1]) =>
        b.scope(async () => {
          const X = b.upload(x, [2, 128]);
          return Array.from((await b.fp8Flow(X, b.quantize(X, opts)).read()) as Float32Array);
        });
      expect(await counts(be, { group: "tensor", unit: true })).toEqual([5, 2]);
      expect(await counts(be, { group: "tile", format: "e5m2", unit: true })).toEqual([2, 0]);
      const y = rng.normals(300 * 200, 5);
      await same((b) => {
        const Y = b.upload(y, [300, 200]);
        return {
          tile: b.fp8Flow(Y, b.quantize(Y, { group: "tile" })),
          unit: b.fp8Flow(Y, b.quantize(Y, { group: "row", unit: true, format: "e5m2" })),
        };
      }, "exact");
    });

    it("matmul f32 and bf16 in every transposition, with accumulate and BF16 output", async () => {
      for (const [M, N, K] of [
        [1, 1, 1],
        [17, 3, 129],
        [64, 200, 17],
        [130, 64, 256],
      ])
        for (const transA of [false, true])
          for (const transB of [false, true]) {
            const a = rng.normals(M * K);
            const bb = rng.normals(K * N);
            const c0 = rng.normals(M * N);
            for (const precision of ["f32", "bf16"] as const)
              await same(
                (b) => {
                  const A = b.upload(a, transA ? [K, M] : [M, K]);
                  const B = b.upload(bb, transB ? [N, K] : [K, N]);
                  const acc = b.upload(c0, [M, N]);
                  b.matmul(A, B, { transA, transB, precision, accumulate: acc });
                  return { c: b.matmul(A, B, { transA, transB, precision }), acc };
                },
                2e-5, // BF16 operands multiply exactly in f32: only the accumulation order differs
              );
            // A BF16 output may differ by one BF16 ulp where the f32 sum sits next to a rounding boundary.
            for (const precision of ["f32", "bf16"] as const)
              await same((b) => {
                const A = b.upload(a, transA ? [K, M] : [M, K]);
                const B = b.upload(bb, transB ? [N, K] : [K, N]);
                // Accumulating a BF16 output adds the rounded product (layers sum branch Dgrads so).
                const acc = b.upload(c0, [M, N]);
                b.matmul(A, B, { transA, transB, precision, outBf16: true, accumulate: acc });
                return { c16: b.matmul(A, B, { transA, transB, precision, outBf16: true }), acc };
              }, 1e-2);
          }
    });

    // Odd sizes (byte-wise tile loads), then sizes a multiple of 16 (vectorised loads, whole tiles).
    it.each([
      [200, 129, 300],
      [256, 384, 256],
    ])(
      "matmul fp8 for Fprop, Dgrad and Wgrad operand layouts (T %i, in %i, out %i)",
      async (T, din, dout) => {
        const x = rng.normals(T * din);
        const w = rng.normals(dout * din, 0.05);
        const dy = rng.normals(T * dout);
        for (const format of ["e4m3", "e5m2"] as const)
          await same((b) => {
            const X = b.upload(x, [T, din]);
            const W = b.upload(w, [dout, din]);
            const DY = b.upload(dy, [T, dout]);
            const wq = b.quantize(W, { group: "block" });
            const fprop = b.matmul(b.quantize(X, { group: "tile" }), wq, {
              transB: true,
              precision: "fp8",
              outBf16: true,
            });
            const dgrad = b.matmul(b.quantize(DY, { group: "tile", format }), wq, { precision: "fp8" });
            const wgrad = b.matmul(
              b.quantize(DY, { group: "column-tile", format }),
              b.quantize(X, { group: "column-tile" }),
              {
                transA: true,
                precision: "fp8",
              },
            );
            const tw = b.matmul(b.quantize(X, { group: "tensor" }), b.quantize(W, { group: "tensor" }), {
              transB: true,
              precision: "fp8",
            });
            return { fprop, dgrad, wgrad, tw };
          }, 1e-2);
      },
    );

    // Odd sizes, then sizes a multiple of 16 (the vectorised tensor-core paths on cuda), with
    // segments longer than one 128-row promotion chunk.
    it.each([
      [[0, 5, 5, 140, 150], 130, 40],
      [[0, 5, 5, 140, 300], 144, 48],
    ])(
      "grouped matmul over expert segments (m and k), empty experts included (offsets %j, K %i, N %i)",
      async (offs, K, N) => {
        const off = Int32Array.from(offs);
        const E = off.length - 1;
        const Mt = off[E];
        const a = rng.normals(Mt * K);
        const w = rng.normals(E * N * K, 0.1);
        const dy = rng.normals(Mt * N);
        for (const precision of ["f32", "bf16", "fp8"] as const)
          await same(
            (b): Record<string, Tensor> => {
              const O = b.upload(off, [E + 1], "i32");
              const A = b.upload(a, [Mt, K]);
              const W = b.upload(w, [E, N, K]);
              const DY = b.upload(dy, [Mt, N]);
              if (precision !== "fp8")
                return {
                  m: b.groupedMatmul(A, W, O, { segment: "m", transB: true, precision }),
                  k: b.groupedMatmul(DY, A, O, { segment: "k", transA: true, precision }),
                };
              const wq = b.quantize(W, { group: "block" });
              return {
                m: b.groupedMatmul(b.quantize(A, { group: "tile" }), wq, O, {
                  segment: "m",
                  transB: true,
                  precision,
                }),
                d: b.groupedMatmul(b.quantize(DY, { group: "tile" }), wq, O, { segment: "m", precision }),
                k: b.groupedMatmul(
                  b.quantize(DY, { group: "column-tile", segments: O }),
                  b.quantize(A, { group: "column-tile", segments: O }),
                  O,
                  { segment: "k", transA: true, precision },
                ),
              };
            },
            precision === "f32" ? 2e-5 : 1e-2,
          );
      },
    );

    it("rmsnorm, rope, head slicing, swiglu, embedding forward and backward", async () => {
      const R = 37;
      const C = 72;
      const x = rng.normals(R * C);
      const w = rng.normals(C);
      const dy = rng.normals(R * C);
      const ids = rng.ints(R, 11);
      const table = rng.normals(11 * C);
      await same((b) => {
        const X = b.upload(x, [R, C]);
        const W = b.upload(w, [C]);
        const DY = b.upload(dy, [R, C]);
        const { y, rstd } = b.rmsnorm(X, W, 1e-6);
        const { dx, dw } = b.rmsnormBackward(DY, X, W, rstd);
        const ro = { heads: 3, width: 24, offset: 8, dim: 16, seqLen: 5, theta: 10000 };
        const sl = { heads: 3, width: 24, start: 4, len: 10 };
        const sliced = b.headSlice(X, sl);
        const summed = b.headSlice(X, { ...sl, sumHeads: true });
        const dst = b.copy(X);
        b.headScatterAdd(dst, sliced, sl);
        const cat = b.headConcat(sliced, b.headSlice(X, { heads: 1, width: 72, start: 0, len: 6 }), 3, 1);
        const cat3 = b.headConcat(sliced, sliced, 3, 3);
        // The same part of X's heads read in place (aPart), against the sliced copy above.
        const one = b.headSlice(X, { heads: 1, width: 72, start: 0, len: 6 });
        const catPart = b.headConcat(X, one, 3, 1, false, sl);
        // X as a packed gate|up [R, 2 x 36].
        const h = b.swiglu(X);
        const dgu = b.swigluBackward(b.scale(h, 0.5), X);
        const E = b.upload(table, [11, C]);
        const emb = b.embedding(E, b.upload(ids, [R], "i32"));
        const dE = b.zeros([11, C]);
        b.embeddingBackward(dE, DY, b.upload(ids, [R], "i32"));
        return {
          y,
          rstd,
          dx,
          dw,
          rope: b.rope(X, ro),
          inv: b.rope(X, { ...ro, inverse: true }),
          // Rows after a context (a KV-cache decode step), one position for all rows and far out.
          ropeAt: b.rope(X, { ...ro, start: 7 }),
          ropeOne: b.rope(X, { ...ro, seqLen: 1, start: 1000 }),
          invAt: b.rope(X, { ...ro, start: 7, inverse: true }),
          sliced,
          summed,
          dst,
          cat,
          cat3,
          catPart,
          h,
          dgu,
          emb,
          dE,
        };
      }, 2e-5);
    });

    // Widths in multiples of 4 (MLA's: cuda moves four columns a thread) and one rotation that is
    // not (the one-column path); f32 and BF16 storage.
    it("rope, headSlice and headConcat at four-column layouts", async () => {
      const [R, C] = [37, 96];
      const x = rng.normals(R * C);
      await same((b) => {
        const X = b.upload(x, [R, C]);
        const ro = { heads: 4, width: 24, offset: 8, dim: 16, seqLen: 5, theta: 10000 };
        const odd = { heads: 4, width: 24, offset: 6, dim: 18, seqLen: 7, theta: 500 };
        const sl = { heads: 4, width: 24, start: 8, len: 12 };
        const kpe = b.headSlice(X, { heads: 1, width: 96, start: 4, len: 8 });
        const sliced = b.headSlice(X, sl);
        return {
          rope: b.rope(X, ro),
          rope16: b.rope(X, { ...ro, inverse: true, start: 3, storeBf16: true }),
          odd: b.rope(X, odd),
          oddInv: b.rope(X, { ...odd, inverse: true }),
          kpe,
          sliced16: b.headSlice(X, { ...sl, storeBf16: true }),
          summed: b.headSlice(X, { ...sl, sumHeads: true }),
          cat: b.headConcat(sliced, kpe, 4, 1),
          cat16: b.headConcat(sliced, sliced, 4, 4, true),
          catPart: b.headConcat(X, kpe, 4, 1, true, sl),
        };
      }, 2e-5);
    });

    // The model's widths (cuda's one-pass backward takes C % 128 == 0, C <= 1024, 128-row chunks;
    // 300 rows end in a partial chunk) and a width past that path.
    it("rmsnorm forward and backward at the model's widths", async () => {
      for (const [R, C] of [
        [300, 256],
        [300, 1024],
        [130, 1152],
      ]) {
        const x = rng.normals(R * C, 3);
        const w = rng.normals(C);
        const dy = rng.normals(R * C);
        const [dx0, dw0] = [rng.normals(R * C), rng.normals(C)];
        await same((b) => {
          const X = b.upload(x, [R, C]);
          const W = b.upload(w, [C]);
          const DY = b.upload(dy, [R, C]);
          const { y, rstd } = b.rmsnorm(X, W, 1e-6);
          const { dx, dw } = b.rmsnormBackward(DY, X, W, rstd);
          // Accumulated: into a running dx and a weight gradient, or only into the latter.
          const acc = { dx: b.upload(dx0, [R, C]), dw: b.upload(dw0, [C]) };
          const into = b.rmsnormBackward(DY, X, W, rstd, acc);
          expect(into.dx).toBe(acc.dx);
          const dwOnly = b.rmsnormBackward(DY, X, W, rstd, { dw: b.upload(dw0, [C]) });
          return { y, rstd, dx, dw, accDx: acc.dx, accDw: acc.dw, dx2: dwOnly.dx, accDw2: dwOnly.dw };
        }, 2e-5);
      }
    });

    it("rope, headSlice and headConcat with storeBf16: the f32 results cast to BF16, bit for bit", async () => {
      const [R, C] = [37, 72];
      await be.scope(async () => {
        const X = be.upload(rng.normals(R * C), [R, C]);
        const ro = { heads: 3, width: 24, offset: 8, dim: 16, seqLen: 5, theta: 10000 };
        const sl = { heads: 3, width: 24, start: 4, len: 10 };
        const kpe = be.headSlice(X, { heads: 1, width: 72, start: 0, len: 6 });
        const cases: [string, (bf16: boolean) => Tensor][] = [
          ["rope", (bf16) => be.rope(X, { ...ro, storeBf16: bf16 })],
          ["rope inverse at 7", (bf16) => be.rope(X, { ...ro, start: 7, inverse: true, storeBf16: bf16 })],
          ["headSlice", (bf16) => be.headSlice(X, { ...sl, storeBf16: bf16 })],
          ["headSlice summed", (bf16) => be.headSlice(X, { ...sl, sumHeads: true, storeBf16: bf16 })],
          ["headConcat broadcast", (bf16) => be.headConcat(be.headSlice(X, sl), kpe, 3, 1, bf16)],
        ];
        for (const [what, op] of cases) {
          const y16 = op(true);
          expect(y16.dtype, what).toBe("bf16");
          expect(Array.from(await be.cast(y16, "f32").read()), what).toEqual(
            Array.from(await be.cast(be.cast(op(false), "bf16"), "f32").read()),
          );
        }
      });
    });

    const attentionCase = (B: number, T: number, H: number, dqk: number, dv: number) =>
      attentionForwardBackward(rng, B, T, H, dqk, dv);

    it("causal attention forward and backward, f32 and bf16", async () => {
      const run = attentionCase(2, 19, 3, 24, 16);
      for (const precision of ["f32", "bf16"] as const)
        await same(run(precision), precision === "f32" ? 2e-5 : 2e-2);
    });

    // A KV-cache decode step's forward: Tq queries at the last positions of Tk keys, per batch.
    // Tk past a tile (64 on cpu, 4 rows per block on cuda), one query and several, head sizes the
    // cuda flash kernels have (which must not take this case) and odd ones.
    it("attention with fewer queries than keys (kvSeq), f32 and bf16", async () => {
      for (const [B, Tq, Tk, H, dqk, dv] of [
        [1, 1, 1, 1, 8, 8],
        [2, 1, 19, 3, 24, 16],
        [1, 1, 150, 2, 48, 32],
        [2, 5, 130, 2, 17, 40],
        [1, 3, 257, 8, 48, 32],
        [1, 1, 300, 6, 96, 64],
      ]) {
        const q = rng.normals(B * Tq * H * dqk);
        const k = rng.normals(B * Tk * H * dqk);
        const v = rng.normals(B * Tk * H * dv);
        for (const precision of ["f32", "bf16"] as const)
          await same(
            (b) => {
              const opts = { batch: B, seq: Tq, kvSeq: Tk, heads: H, scale: 1 / Math.sqrt(dqk), precision };
              const Q = b.upload(q, [B * Tq, H * dqk]);
              const r = b.attention(Q, b.upload(k, [B * Tk, H * dqk]), b.upload(v, [B * Tk, H * dv]), opts);
              return { o: r.o, lse: r.lse };
            },
            precision === "f32" ? 2e-5 : 2e-2,
          );
      }
      // With batch 1, k and v may be longer than kvSeq (a cache with room for later positions): only
      // the first kvSeq rows are read, so rows of NaN after them change nothing.
      for (const [Tq, Tk, H, dqk, dv] of [
        [1, 37, 3, 24, 16],
        [2, 150, 2, 48, 32],
      ]) {
        const [q, k, v] = [Tq * H * dqk, Tk * H * dqk, Tk * H * dv].map((n) => rng.normals(n));
        const padded = (x: Float32Array, cols: number) => {
          const y = new Float32Array(x.length + 5 * cols).fill(Number.NaN);
          y.set(x);
          return y;
        };
        for (const precision of ["f32", "bf16"] as const) {
          const opts = { batch: 1, seq: Tq, kvSeq: Tk, heads: H, scale: 1 / Math.sqrt(dqk), precision };
          const run = (long: boolean) =>
            readAll(be, (b) => {
              const K = long ? b.upload(padded(k, H * dqk), [Tk + 5, H * dqk]) : b.upload(k, [Tk, H * dqk]);
              const V = long ? b.upload(padded(v, H * dv), [Tk + 5, H * dv]) : b.upload(v, [Tk, H * dv]);
              const r = b.attention(b.upload(q, [Tq, H * dqk]), K, V, opts);
              return { o: r.o, lse: r.lse };
            });
          expect(await run(true), `cache of ${Tk} + 5 rows`).toEqual(await run(false));
        }
      }
      expect(() =>
        be.scope(() => {
          const opts = { batch: 2, seq: 1, kvSeq: 2, heads: 1, scale: 1, precision: "f32" as const };
          be.attention(be.zeros([2, 8]), be.zeros([5, 8]), be.zeros([5, 8]), opts);
        }),
      ).toThrow(/rows/);
      // The backward takes as many keys as queries.
      expect(() =>
        be.scope(() => {
          const [Q, K] = [be.zeros([1, 8]), be.zeros([2, 8])];
          const opts = { batch: 1, seq: 1, kvSeq: 2, heads: 1, scale: 1, precision: "f32" as const };
          const r = be.attention(Q, K, K, opts);
          be.attentionBackward(r.o, Q, K, K, r.o, r.lse, opts);
        }),
      ).toThrow(/kvSeq/);
    });

    // Head sizes a multiple of 16 take the tensor-core kernels on cuda (96/64 and 64/64 the wgmma
    // kernels on Hopper, with 128-row tiles); 150, 300 and 130 rows leave partial tiles.
    it("causal attention forward and backward, bf16, tensor-core head sizes", async () => {
      await same(attentionCase(2, 150, 2, 48, 32)("bf16"), 2e-2);
      await same(attentionCase(2, 300, 2, 96, 64)("bf16"), 2e-2);
      await same(attentionCase(1, 130, 3, 64, 64)("bf16"), 2e-2);
    });

    // Under bf16 the ops round their inputs to BF16, so a bf16 tensor of the same values must give
    // bit for bit what its f32 source gives (the model keeps such copies to skip repeated rounding).
    it("bf16 tensors as inputs of bf16 GEMMs and attention equal their f32 sources", async () => {
      const bits = async (c: Case) => (await readAll(be, c)).map(([k, v]) => [k, Array.from(v)]);
      const off = Int32Array.from([0, 3, 3, 40]);
      const [M, N, K, E] = [40, 24, 136, 3];
      const a = rng.normals(M * K);
      const w = rng.normals(E * N * K, 0.1);
      const dy = rng.normals(M * N);
      const gemms =
        (lowp: boolean): Case =>
        (b) => {
          const v = (t: Tensor) => (lowp ? b.cast(t, "bf16") : t);
          const [A, W, DY] = [b.upload(a, [M, K]), b.upload(w, [E, N, K]), b.upload(dy, [M, N])];
          const O = b.upload(off, [E + 1], "i32");
          const W0 = b.upload(w.subarray(0, N * K), [N, K]);
          const precision = "bf16";
          return {
            fprop: b.matmul(v(A), v(W0), { transB: true, precision, outBf16: true }),
            dgrad: b.matmul(v(DY), v(W0), { precision }),
            wgrad: b.matmul(v(DY), v(A), { transA: true, precision }),
            m: b.groupedMatmul(v(A), v(W), O, { segment: "m", transB: true, precision }),
            k: b.groupedMatmul(v(DY), v(A), O, { segment: "k", transA: true, precision }),
          };
        };
      expect(await bits(gemms(true))).toEqual(await bits(gemms(false)));
      for (const [T, dqk, dv] of [
        [19, 24, 16],
        [150, 48, 32],
        [150, 96, 64],
      ]) {
        const [q, k, v, dO] = [dqk, dqk, dv, dv].map((d) => rng.normals(2 * T * 2 * d));
        const attn =
          (lowp: boolean): Case =>
          (b) => {
            const opts = {
              batch: 2,
              seq: T,
              heads: 2,
              scale: 1 / Math.sqrt(dqk),
              precision: "bf16" as const,
            };
            const up = (x: Float32Array, d: number) => {
              const t = b.upload(x, [2 * T, 2 * d]);
              return lowp ? b.cast(t, "bf16") : b.cast(b.cast(t, "bf16"), "f32");
            };
            const [Q, Kt, V] = [up(q, dqk), up(k, dqk), up(v, dv)];
            const r = b.attention(Q, Kt, V, opts);
            const g = b.attentionBackward(up(dO, dv), Q, Kt, V, r.o, r.lse, opts);
            return { o: r.o, lse: r.lse, dq: g.dq, dk: g.dk, dv: g.dv };
          };
        expect(await bits(attn(true)), `attention T ${T}`).toEqual(await bits(attn(false)));
      }
      // f32 GEMMs take f32 tensors only.
      expect(() =>
        be.scope(() => {
          const t = be.cast(be.upload(a, [M, K]), "bf16");
          be.matmul(t, t, { transB: true, precision: "f32" });
        }),
      ).toThrow(/f32/);
    });

    it("BF16 storage of grouped outputs (storeBf16), and the expert ops that read BF16", async () => {
      const off = Int32Array.from([0, 5, 5, 140, 300]);
      const [E, Mt, K, N] = [4, 300, 144, 48];
      const a = rng.normals(Mt * K);
      const w = rng.normals(E * N * K, 0.1);
      const dy = rng.normals(Mt * N);
      const grouped = (b: Backend, precision: "f32" | "bf16" | "fp8", storeBf16: boolean) => {
        const O = b.upload(off, [E + 1], "i32");
        const [A, W, DY] = [b.upload(a, [Mt, K]), b.upload(w, [E, N, K]), b.upload(dy, [Mt, N])];
        const fp8 = precision === "fp8";
        const wq = fp8 ? b.quantize(W, { group: "block" }) : W;
        const q = (t: Tensor) => (fp8 ? b.quantize(t, { group: "tile" }) : t);
        const o = { segment: "m", precision, outBf16: true, storeBf16 } as const;
        return {
          y: b.groupedMatmul(q(A), wq, O, { ...o, transB: true }),
          dx: b.groupedMatmul(q(DY), wq, O, o),
        };
      };
      for (const precision of ["f32", "bf16", "fp8"] as const) {
        // Against the reference, as f32 values: one BF16 ulp apart where two sums straddle a rounding
        // boundary.
        await same((b) => {
          const r = grouped(b, precision, true);
          return { y: b.cast(r.y, "f32"), dx: b.cast(r.dx, "f32") };
        }, 1e-2);
        // On this backend: exactly the BF16-rounded f32 result, stored as BF16.
        await be.scope(async () => {
          const [s16, f32] = [grouped(be, precision, true), grouped(be, precision, false)];
          for (const k of ["y", "dx"] as const) {
            expect(s16[k].dtype, `${precision} ${k}`).toBe("bf16");
            expect(Array.from(await be.cast(s16[k], "f32").read()), `${precision} ${k}`).toEqual(
              Array.from(await f32[k].read()),
            );
          }
        });
      }
      await be.scope(async () => {
        const O = be.upload(off, [E + 1], "i32");
        const A = be.upload(a, [Mt, K]);
        expect(() =>
          be.groupedMatmul(A, A, O, { segment: "k", transA: true, precision: "f32", storeBf16: true }),
        ).toThrow(/storeBf16 needs segments along M/);
        const W = be.upload(w, [E, N, K]);
        const acc = be.zeros([Mt, N]);
        expect(() =>
          be.groupedMatmul(A, W, O, {
            segment: "m",
            transB: true,
            precision: "f32",
            storeBf16: true,
            accumulate: acc,
          }),
        ).toThrow(/storeBf16 cannot accumulate/);
        // combine, permute backward and swiglu backward read BF16 inputs as their values.
        const [T, k, d] = [40, 3, 24];
        const r = be.router(be.upload(rng.normals(T * 8), [T, 8]), be.zeros([8]), k, 1);
        const p = be.moePermute(be.upload(rng.normals(T * d), [T, d]), r.topIdx, 8);
        const y16 = be.cast(p.xs, "bf16");
        const y32 = be.cast(y16, "f32");
        const eq = async (x: Tensor, y: Tensor, what: string) =>
          expect(Array.from(await x.read()), what).toEqual(Array.from(await y.read()));
        await eq(be.moeCombine(y16, p.slot, r.weights), be.moeCombine(y32, p.slot, r.weights), "moeCombine");
        await eq(
          be.moePermuteBackward(y16, p.slot, T),
          be.moePermuteBackward(y32, p.slot, T),
          "moePermuteBackward",
        );
        const gu16 = be.cast(be.upload(rng.normals(T * k * 2 * d), [T * k, 2 * d]), "bf16");
        await eq(be.swigluBackward(y16, gu16), be.swigluBackward(y32, gu16), "swigluBackward, BF16 dh");
        await eq(
          be.swigluBackward(y16, be.cast(gu16, "f32")),
          be.swigluBackward(y32, gu16),
          "BF16 dh, f32 gate|up",
        );
      });
    });

    // A quantised x permuted moves each row's codes and scales together: the same bits as quantising
    // the permuted x (the MoE layer quantises the tokens once, before the k copies).
    it("moePermute of FP8 rows (1x128 tiles, rows) equals quantising the permuted rows", async () => {
      const [N, E, k] = [37, 8, 3];
      // Rows whose codes are not whole 4-byte words too, except on cuda, which moves codes as words.
      for (const d of be.name === "cuda" ? [264] : [264, 262]) {
        const x = rng.normals(N * d, 2);
        const top = Int32Array.from({ length: N * k }, (_, i) => (i * 5 + Math.floor(i / k)) % E);
        for (const group of ["tile", "row"] as const)
          for (const format of ["e4m3", "e5m2"] as const)
            await same((b) => {
              const X = b.upload(x, [N, d]);
              const T = b.upload(top, [N, k], "i32");
              const p = b.moePermute(b.quantize(X, { group, format }), T, E);
              const twice = b.quantize(b.moePermute(X, T, E).xs, { group, format });
              return {
                xs: p.xs,
                scales: p.xs.quant!.scales,
                slot: p.slot,
                offsets: p.offsets,
                quantisedAfter: twice,
                scalesAfter: twice.quant!.scales,
              };
            }, "exact");
      }
      // Scales that do not follow the rows are refused.
      const d = 264;
      const x = rng.normals(N * d, 2);
      const top = Int32Array.from({ length: N * k }, (_, i) => (i * 5 + Math.floor(i / k)) % E);
      const X = be.upload(x, [N, d]);
      const T = be.upload(top, [N, k], "i32");
      expect(() => be.moePermute(be.quantize(X, { group: "block" }), T, E)).toThrow(/1x128 tiles or rows/);
    });

    // The experts' output gradient quantised by the combine's backward (cuda: without an f32 copy
    // when d % 128 == 0) against quantising moeCombineBackward's d(ys): the same bits. Uneven experts
    // (one empty, one over 128 rows: column tiles restart at each), ys in f32 and BF16.
    it("moeCombineBackwardQuantized equals quantising moeCombineBackward's d(ys)", async () => {
      // Expert 0 takes 140 rows, 1 a few, 2 the rest, 3 none.
      const [N, E, k] = [150, 4, 2];
      const top = Int32Array.from({ length: N * k }, (_, i) => {
        const n = Math.floor(i / k);
        if (i % k === 0) return n < 140 ? 0 : 1;
        return n % 5 === 0 && n < 140 ? 1 : 2;
      });
      for (const d of [256, 200]) {
        const dy = rng.normals(N * d);
        dy[7 * d + 3] = 300; // an outlier channel value
        const ysv = rng.normals(N * k * d);
        const wts = rng.normals(N * k);
        for (const bf16 of [false, true]) {
          const run = (b: Backend) => {
            const p = b.moePermute(b.upload(dy, [N, d]), b.upload(top, [N, k], "i32"), E);
            const ys0 = b.upload(ysv, [N * k, d]);
            const ys = bf16 ? b.cast(ys0, "bf16") : ys0;
            const W = b.upload(wts, [N, k]);
            const DY = b.upload(dy, [N, d]);
            const q = {
              dgrad: { group: "tile" as const },
              wgrad: { group: "column-tile" as const, segments: p.offsets },
            };
            const fused = b.moeCombineBackwardQuantized(DY, ys, p.slot, W, q);
            const plain = b.moeCombineBackward(DY, ys, p.slot, W);
            return { fused, plain, q };
          };
          await same((b) => {
            const { fused, plain, q } = run(b);
            const tiles = b.quantize(plain.dys, q.dgrad);
            const cols = b.quantize(plain.dys, q.wgrad);
            return {
              dgrad: fused.dgrad,
              dgradScales: fused.dgrad.quant!.scales,
              tiles,
              tilesScales: tiles.quant!.scales,
              wgrad: fused.wgrad,
              wgradScales: fused.wgrad.quant!.scales,
              cols,
              colsScales: cols.quant!.scales,
            };
          }, "exact");
          await be.scope(async () => {
            const { fused, plain } = run(be);
            expect(Array.from(await fused.dweights.read()), `d ${d} dweights`).toEqual(
              Array.from(await plain.dweights.read()),
            );
          });
        }
      }
    });

    // SwiGLU's backward quantised for the gate|up projection (cuda: without an f32 copy when
    // inter % 128 == 0) against quantising swigluBackward's result: the same bits, for each storage
    // of dh and gate|up the model uses, column tiles restarting at uneven segments.
    it("swigluBackwardQuantized equals quantising swigluBackward's d[g | u]", async () => {
      const rows = 300;
      const offsets = Int32Array.of(0, 140, 140, 150, 300);
      for (const inter of [256, 200]) {
        const gu = rng.normals(rows * 2 * inter, 2);
        const dh = rng.normals(rows * inter);
        dh[5 * inter + 7] = 250; // an outlier
        for (const [gu16, dh16] of [
          [false, false],
          [true, false],
          [true, true],
        ])
          await be.scope(async () => {
            const b = be;
            const GU0 = b.upload(gu, [rows, 2 * inter]);
            const GU = gu16 ? b.cast(GU0, "bf16") : GU0;
            const DH0 = b.upload(dh, [rows, inter]);
            const DH = dh16 ? b.cast(DH0, "bf16") : DH0;
            // Unit and power-of-two scales too (one storage: the scaling does not depend on it).
            const scalings = gu16 && !dh16 ? [{}, { unit: true }, { pow2Scales: true }] : [{}];
            for (const scaling of scalings) {
              const q = {
                dgrad: { group: "tile" as const, ...scaling },
                wgrad: { group: "column-tile" as const, segments: b.upload(offsets, [5], "i32"), ...scaling },
              };
              const fused = b.swigluBackwardQuantized(DH, GU, q);
              const dgu = b.swigluBackward(DH, GU);
              const want = { dgrad: b.quantize(dgu, q.dgrad), wgrad: b.quantize(dgu, q.wgrad) };
              for (const k of ["dgrad", "wgrad"] as const) {
                const what = `inter ${inter}, gu ${gu16 ? "bf16" : "f32"}, dh ${dh16 ? "bf16" : "f32"} ${JSON.stringify(scaling)}: ${k}`;
                expect(Array.from(await fused[k].read()), what).toEqual(Array.from(await want[k].read()));
                expect(Array.from(await fused[k].quant!.scales.read()), `${what} scales`).toEqual(
                  Array.from(await want[k].quant!.scales.read()),
                );
              }
            }
          });
      }
    });

    // The forward's producers that hand their output over as the next GEMM's FP8 input (cuda: one
    // kernel, the f32 output never stored, where rows are whole 1x128 tiles) against quantising
    // rmsnorm's and swiglu's f32 results: the same codes and scales, for fused and unfused widths,
    // every scaling, E4M3 and E5M2.
    it("rmsnormQuantized and swigluQuantized equal quantising rmsnorm's y and swiglu's h", async () => {
      const rows = 300;
      const scalings = [{}, { unit: true }, { pow2Scales: true }, { format: "e5m2" as const }];
      for (const C of [1024, 256, 200]) {
        const x = rng.normals(rows * C, 3);
        x[7 * C + 5] = 900; // an outlier
        const w = rng.normals(C, 1);
        await be.scope(async () => {
          const b = be;
          const X = b.upload(x, [rows, C]);
          const W = b.upload(w, [C]);
          for (const scaling of scalings) {
            const q = { group: "tile" as const, ...scaling };
            const fused = b.rmsnormQuantized(X, W, 1e-6, q);
            const plain = b.rmsnorm(X, W, 1e-6);
            const want = b.quantize(plain.y, q);
            const what = `rmsnorm, ${C} columns ${JSON.stringify(scaling)}`;
            expect(Array.from(await fused.y.read()), what).toEqual(Array.from(await want.read()));
            expect(Array.from(await fused.y.quant!.scales.read()), `${what} scales`).toEqual(
              Array.from(await want.quant!.scales.read()),
            );
            expect(Array.from(await fused.rstd.read()), `${what} rstd`).toEqual(
              Array.from(await plain.rstd.read()),
            );
          }
        });
      }
      for (const inter of [256, 2816, 200]) {
        const gu = rng.normals(rows * 2 * inter, 2);
        gu[3 * 2 * inter + 9] = 40; // an outlier
        for (const gu16 of [false, true])
          await be.scope(async () => {
            const b = be;
            const GU0 = b.upload(gu, [rows, 2 * inter]);
            const GU = gu16 ? b.cast(GU0, "bf16") : GU0;
            for (const scaling of scalings) {
              const q = { group: "tile" as const, ...scaling };
              const fused = b.swigluQuantized(GU, q);
              const want = b.quantize(b.swiglu(GU), q);
              const what = `swiglu, inter ${inter}, gu ${gu16 ? "bf16" : "f32"} ${JSON.stringify(scaling)}`;
              expect(Array.from(await fused.read()), what).toEqual(Array.from(await want.read()));
              expect(Array.from(await fused.quant!.scales.read()), `${what} scales`).toEqual(
                Array.from(await want.quant!.scales.read()),
              );
            }
          });
      }
    });

    // GEMM outputs handed over quantised (cuda on sm_90: FP8 Fprop and Dgrad quantised in the wgmma
    // epilogue, f32 never stored) against quantising the f32 product: the same codes and scales, for
    // dense and grouped GEMMs, every scaling, E4M3 and E5M2, other
    // groups and precisions (quantised after the product), and the combinations refused.
    it("matmul and groupedMatmul with storeQuantized equal quantising their f32 product", async () => {
      const off = Int32Array.from([0, 5, 5, 140, 300]);
      const [E, Mt, K, N] = [4, 300, 272, 144];
      const x = rng.normals(Mt * K, 2);
      x[9 * K + 3] = 300; // an outlier
      const w = rng.normals(E * N * K, 0.1);
      const dy = rng.normals(Mt * N);
      const scalings = [{}, { unit: true }, { pow2Scales: true }, { format: "e5m2" as const }];
      await be.scope(async () => {
        const b = be;
        const O = b.upload(off, [E + 1], "i32");
        const W = b.upload(w, [E, N, K]);
        const [X, DY] = [b.upload(x, [Mt, K]), b.upload(dy, [Mt, N])];
        const wq = b.quantize(W, { group: "block" });
        const W0 = b.quantize(b.upload(w.subarray(0, N * K), [N, K]), { group: "block" });
        const [xq, dyq] = [b.quantize(X, { group: "tile" }), b.quantize(DY, { group: "tile" })];
        const eq = async (got: Tensor, want: Tensor, what: string) => {
          expect(got.dtype, what).toBe(want.dtype);
          expect(Array.from(await got.read()), what).toEqual(Array.from(await want.read()));
          expect(Array.from(await got.quant!.scales.read()), `${what} scales`).toEqual(
            Array.from(await want.quant!.scales.read()),
          );
        };
        const m = { segment: "m", precision: "fp8" } as const;
        for (const scaling of scalings) {
          const q = { group: "tile" as const, ...scaling };
          const s = JSON.stringify(scaling);
          const cases: [string, (sq?: typeof q) => Tensor][] = [
            ["grouped fprop", (sq) => b.groupedMatmul(xq, wq, O, { ...m, transB: true, storeQuantized: sq })],
            ["grouped dgrad", (sq) => b.groupedMatmul(dyq, wq, O, { ...m, storeQuantized: sq })],
            ["fprop", (sq) => b.matmul(xq, W0, { transB: true, precision: "fp8", storeQuantized: sq })],
            ["dgrad", (sq) => b.matmul(dyq, W0, { precision: "fp8", storeQuantized: sq })],
          ];
          for (const [what, run] of cases) await eq(run(q), b.quantize(run(), q), `${what} ${s}`);
        }
        // Other groups, BF16-rounded values and other precisions: quantised after the product.
        const f32 = (sq?: QuantizeOptions) =>
          b.groupedMatmul(X, W, O, { segment: "m", transB: true, precision: "f32", storeQuantized: sq });
        await eq(f32({ group: "tile" }), b.quantize(f32(), { group: "tile" }), "grouped f32 fprop");
        const rowq = { group: "row" as const };
        const fpropRow = (sq?: QuantizeOptions) =>
          b.groupedMatmul(xq, wq, O, { ...m, transB: true, outBf16: true, storeQuantized: sq });
        await eq(fpropRow(rowq), b.quantize(fpropRow(), rowq), "grouped fprop, BF16-rounded, row scales");
        expect(() =>
          b.groupedMatmul(dyq, xq, O, { segment: "k", transA: true, precision: "fp8", storeQuantized: rowq }),
        ).toThrow(/storeQuantized needs segments along M/);
        expect(() =>
          b.groupedMatmul(xq, wq, O, {
            ...m,
            transB: true,
            storeQuantized: rowq,
            accumulate: b.zeros([Mt, N]),
          }),
        ).toThrow(/storeQuantized cannot accumulate/);
        expect(() =>
          b.matmul(xq, W0, { transB: true, precision: "fp8", storeQuantized: rowq, storeBf16: true }),
        ).toThrow(/storeQuantized and storeBf16 exclude each other/);
      });
    });

    // MLA's gradients quantised by their producers (cuda: without the f32 copy where rows are whole
    // 1x128 tiles and groups of four do not straddle) against quantising rope's and headConcat's
    // f32 results: the same bits, for fused and unfused layouts, column tiles with segments.
    it("ropeQuantized and headConcatQuantized equal quantising rope and headConcat", async () => {
      const R = 300;
      const offsets = Int32Array.of(0, 130, 130, 300);
      const x = rng.normals(R * 512, 2);
      x[3 * 512 + 70] = -400; // an outlier
      await be.scope(async () => {
        const b = be;
        const seg = b.upload(offsets, [4], "i32");
        const q = {
          dgrad: { group: "tile" as const },
          wgrad: { group: "column-tile" as const, segments: seg },
        };
        const X = (cols: number) => b.upload(x.subarray(0, R * cols), [R, cols]);
        const cases: [string, () => { dgrad: Tensor; wgrad: Tensor }, () => Tensor][] = [];
        for (const [heads, width, offset, dim, inverse] of [
          [4, 96, 64, 32, true],
          [4, 96, 64, 32, false],
          [1, 288, 256, 32, true],
          [2, 64, 6, 18, false],
        ] as const) {
          const o = { heads, width, offset, dim, seqLen: 7, theta: 10000, inverse };
          cases.push([
            `rope ${heads}x${width} at ${offset}`,
            () => b.ropeQuantized(X(heads * width), o, q),
            () => b.rope(X(heads * width), o),
          ]);
        }
        const part = { width: 96, start: 0, len: 64 };
        cases.push(
          [
            "headConcat of parts",
            () => b.headConcatQuantized(X(384), X(256), 4, 4, part, q),
            () => b.headConcat(X(384), X(256), 4, 4, false, part),
          ],
          [
            "headConcat broadcast",
            () => b.headConcatQuantized(X(256), X(32), 4, 1, undefined, q),
            () => b.headConcat(X(256), X(32), 4, 1),
          ],
          [
            "headConcat unfused",
            () => b.headConcatQuantized(X(40), X(6), 4, 1, undefined, q),
            () => b.headConcat(X(40), X(6), 4, 1),
          ],
        );
        for (const [what, fused, plain] of cases) {
          const got = fused();
          const y = plain();
          const want = { dgrad: b.quantize(y, q.dgrad), wgrad: b.quantize(y, q.wgrad) };
          for (const k of ["dgrad", "wgrad"] as const) {
            expect(Array.from(await got[k].read()), `${what}: ${k}`).toEqual(
              Array.from(await want[k].read()),
            );
            expect(Array.from(await got[k].quant!.scales.read()), `${what}: ${k} scales`).toEqual(
              Array.from(await want[k].quant!.scales.read()),
            );
          }
        }
      });
    });

    // The router noise: the reference's bits on every backend, and a row's noise depends on its index
    // in the stream only (two halves with their row offsets are the whole).
    it("addUniformNoise: the same bits everywhere, by each row's index", async () => {
      const [R, C] = [70, 64];
      const x = rng.normals(R * C);
      const o = { seed: -123456789, rowOffset: 1000, scale: 2.5 };
      await same((b) => {
        const X = b.upload(x, [R, C]);
        b.addUniformNoise(X, o);
        const halves = [b.upload(x.subarray(0, 30 * C), [30, C]), b.upload(x.subarray(30 * C), [R - 30, C])];
        b.addUniformNoise(halves[0], o);
        b.addUniformNoise(halves[1], { ...o, rowOffset: o.rowOffset + 30 });
        // The seed and scale read from row 1 of a table (a replayed graph's), the values given ignored.
        const T = b.upload(x, [R, C]);
        const bits = new Int32Array(new Float32Array([o.scale]).buffer)[0];
        const table = b.upload(Int32Array.of(7, 7, o.seed, bits, 9, 9), [3, 2], "i32");
        b.addUniformNoise(T, { seed: 1, rowOffset: o.rowOffset, scale: 0.5, params: { table, row: 1 } });
        return { X, top: halves[0], bottom: halves[1], T };
      }, "exact");
      await be.scope(async () => {
        const [X, T] = [be.upload(x, [R, C]), be.upload(x, [R, C])];
        be.addUniformNoise(X, o);
        const bits = new Int32Array(new Float32Array([o.scale]).buffer)[0];
        const table = be.upload(Int32Array.of(o.seed, bits), [1, 2], "i32");
        be.addUniformNoise(T, { seed: 5, rowOffset: o.rowOffset, scale: 9, params: { table, row: 0 } });
        expect(Array.from(await T.read()), "the table's seed and scale").toEqual(Array.from(await X.read()));
      });
      await be.scope(async () => {
        const X = be.upload(x, [R, C]);
        be.addUniformNoise(X, o);
        const got = (await X.read()) as Float32Array;
        const noise = got.map((v, i) => (v - x[i]) / o.scale);
        // Uniform in [-1, 1): every value inside, the mean near 0 and the spread near 1/sqrt(3).
        expect(Math.min(...noise)).toBeGreaterThanOrEqual(-1.0001);
        expect(Math.max(...noise)).toBeLessThan(1.0001);
        const mean = noise.reduce((a, v) => a + v, 0) / noise.length;
        const sd = Math.sqrt(noise.reduce((a, v) => a + (v - mean) ** 2, 0) / noise.length);
        expect(Math.abs(mean)).toBeLessThan(0.05);
        expect(Math.abs(sd - 1 / Math.sqrt(3))).toBeLessThan(0.03);
      });
    });

    it("router, balance loss, permute/combine and bias update", async () => {
      const N = 50;
      const E = 8;
      const k = 2;
      const d = 20;
      const logits = rng.normals(N * E);
      const bias = rng.normals(E, 0.1);
      const x = rng.normals(N * d);
      const dw = rng.normals(N * k);
      await same((b) => {
        const r = b.router(b.upload(logits, [N, E]), b.upload(bias, [E]), k, 2.5);
        const bl = b.balanceLoss(r.scores, r.topIdx, { batch: 2, seq: 25, alpha: 0.01 });
        const dl = b.routerBackward(b.upload(dw, [N, k]), r.scores, r.topIdx, 2.5, bl.dscores);
        const p = b.moePermute(b.upload(x, [N, d]), r.topIdx, E);
        const back = b.moePermuteBackward(p.xs, p.slot, N);
        const y = b.moeCombine(p.xs, p.slot, r.weights);
        const cb = b.moeCombineBackward(b.upload(x, [N, d]), p.xs, p.slot, r.weights);
        const bs = b.upload(bias, [E]);
        b.biasUpdate(bs, p.offsets, { gamma: 0.001, rule: "sign" });
        const be = b.upload(bias, [E]);
        b.biasUpdate(be, p.offsets, { gamma: 0.05, rule: "error" });
        const out = { ...r, bl: bl.loss, bld: bl.dscores, dl, ...p, back, y };
        return { ...out, dys: cb.dys, dwts: cb.dweights, bs, be };
      }, 2e-5);
    });

    // The three bias rules on skewed loads (an expert with 60 of 100 rows, one with none): each
    // bias moved by gamma times sign, the relative error, or that error clipped to [-1, 1], in f64
    // and rounded once.
    it("biasUpdate: sign, error and clipped steps", async () => {
      const offsets = Int32Array.of(0, 60, 60, 61, 70, 80, 90, 95, 100);
      const E = 8;
      const mean = 100 / E;
      const bias = rng.normals(E, 0.1);
      for (const rule of ["sign", "error", "clipped"] as const)
        await be.scope(async () => {
          const B = be.upload(bias, [E]);
          be.biasUpdate(B, be.upload(offsets, [E + 1], "i32"), { gamma: 0.03, rule });
          const want = Array.from(bias, (v, e) => {
            const err = (mean - (offsets[e + 1] - offsets[e])) / mean;
            const step =
              rule === "sign" ? Math.sign(err) : rule === "clipped" ? Math.max(-1, Math.min(1, err)) : err;
            return Math.fround(v + 0.03 * step);
          });
          expect(Array.from(await B.read()), rule).toEqual(want);
        });
    });

    it("moeCombine's add: the values of add() after it, bit for bit", async () => {
      for (const d of [20, 18]) {
        const [N, E, k] = [40, 6, 3];
        await be.scope(async () => {
          const r = be.router(
            be.upload(rng.normals(N * E), [N, E]),
            be.upload(rng.normals(E, 0.1), [E]),
            k,
            1,
          );
          const p = be.moePermute(be.upload(rng.normals(N * d), [N, d]), r.topIdx, E);
          const [A, B] = [be.upload(rng.normals(N * d), [N, d]), be.upload(rng.normals(N * d, 30), [N, d])];
          const plain = be.moeCombine(p.xs, p.slot, r.weights);
          const one = be.moeCombine(p.xs, p.slot, r.weights, [A]);
          const two = be.moeCombine(p.xs, p.slot, r.weights, [A, B]);
          expect(Array.from(await one.read()), `d ${d}, one`).toEqual(
            Array.from(await be.add(plain, A).read()),
          );
          expect(Array.from(await two.read()), `d ${d}, two`).toEqual(
            Array.from(await be.add(be.add(plain, A), B).read()),
          );
          expect(() => be.moeCombine(p.xs, p.slot, r.weights, [A, A, A])).toThrow(/at most 2/);
          expect(() => be.moeCombine(p.xs, p.slot, r.weights, [be.zeros([N, d + 1])])).toThrow(/add \[/);
        });
      }
    });

    it("cross-entropy, clipping and AdamW with f32 and BF16 moments", async () => {
      const N = 30;
      const V = 77;
      const logits = rng.normals(N * V, 3);
      const t = rng.ints(N, V);
      const p = rng.normals(500);
      const g = rng.normals(500);
      await same((b) => {
        const ce = b.crossEntropy(b.upload(logits, [N, V]), b.upload(t, [N], "i32"), 0.7);
        const G = b.upload(g, [500]);
        const clip = b.clipScale([G, ce.dlogits], 0.5);
        const out: Record<string, Tensor> = {
          loss: ce.loss,
          dl: ce.dlogits,
          norm: clip.norm,
          scale: clip.scale,
        };
        const runs = adamwSteps(b, {
          param: () => b.upload(p, [500]),
          grad: G,
          gradScale: clip.scale,
          lr: 1e-2,
          steps: 3,
        });
        for (const dt of ["f32", "bf16"] as const) {
          out[`p_${dt}`] = runs[dt].p;
          out[`m_${dt}`] = dt === "bf16" ? b.cast(runs[dt].m, "f32") : runs[dt].m;
        }
        return out;
      }, 1e-5);
    });

    // Rows as wide as a vocabulary (the cuda kernel's four-wide path when V % 4 == 0), targets at
    // both ends of a row and a -inf logit (it adds nothing to the sum and gets a zero gradient).
    it("cross-entropy over wide rows", async () => {
      for (const V of [1024, 1027]) {
        const N = 6;
        const logits = rng.normals(N * V, 4);
        logits[2 * V + 5] = Number.NEGATIVE_INFINITY;
        logits[3 * V] = Number.NEGATIVE_INFINITY;
        const t = Int32Array.of(0, V - 1, 7, 1, V - 2, 3);
        await same((b) => {
          const ce = b.crossEntropy(b.upload(logits, [N, V]), b.upload(t, [N], "i32"), 0.7);
          return { loss: ce.loss, dl: ce.dlogits };
        }, 1e-5);
      }
    });

    // The output head's BF16 path: logits stored as BF16 by the head's GEMM, read by the cross-entropy,
    // whose gradient comes back in BF16 for a head that reads it so.
    it("dense matmul with storeBf16, cross-entropy of BF16 logits with a BF16 gradient", async () => {
      const [M, N, K] = [37, 48, 40];
      const a = rng.normals(M * K);
      const w = rng.normals(N * K, 0.2);
      for (const precision of ["f32", "bf16"] as const)
        await same((b) => {
          const y = b.matmul(b.upload(a, [M, K]), b.upload(w, [N, K]), {
            transB: true,
            precision,
            storeBf16: true,
          });
          expect(y.dtype).toBe("bf16");
          return { y: b.cast(y, "f32") };
        }, 1e-2);
      // An FP8 Fprop (the shared experts' gate|up: cuda's sm90 kernel stores BF16 itself), against
      // the rounded f32 result in BF16, bit for bit.
      await be.scope(async () => {
        const [m, n, k] = [300, 256, 384];
        const X = be.quantize(be.upload(rng.normals(m * k), [m, k]), { group: "tile" });
        const W = be.quantize(be.upload(rng.normals(n * k, 0.1), [n, k]), { group: "block" });
        const o = { transB: true, precision: "fp8", outBf16: true } as const;
        const y16 = be.matmul(X, W, { ...o, storeBf16: true });
        expect(y16.dtype).toBe("bf16");
        expect(Array.from(await y16.read())).toEqual(
          Array.from(await be.cast(be.matmul(X, W, o), "bf16").read()),
        );
      });
      await be.scope(async () => {
        const A = be.upload(a, [M, K]);
        expect(() =>
          be.matmul(A, A, { transA: true, precision: "f32", storeBf16: true, accumulate: be.zeros([K, K]) }),
        ).toThrow(/storeBf16 cannot accumulate/);
        for (const V of [1024, 77]) {
          const rows = 6;
          const l16 = be.cast(be.upload(rng.normals(rows * V, 4), [rows, V]), "bf16");
          const t = be.upload(Int32Array.of(0, V - 1, 7, 1, V - 2, 3), [rows], "i32");
          const want = be.crossEntropy(be.cast(l16, "f32"), t, 0.7);
          const got = be.crossEntropy(l16, t, 0.7, true);
          expect(got.dlogits.dtype).toBe("bf16");
          expect(Array.from(await got.loss.read()), `loss, V ${V}`).toEqual(
            Array.from(await want.loss.read()),
          );
          expect(Array.from(await be.cast(got.dlogits, "f32").read()), `dlogits, V ${V}`).toEqual(
            Array.from(await be.cast(be.cast(want.dlogits, "bf16"), "f32").read()),
          );
        }
      });
    });

    // The optimiser's path: one prepared gradient norm and one prepared AdamW over tensors of odd
    // sizes (empty, one element, across the cuda kernel's 4,096-element blocks, past 256 norm
    // partials), f32, BF16 and mixed moments, with and without weight decay, for three steps. Against
    // the reference within the single-tensor case's tolerance, and on the backend itself bit-exact
    // against the same steps prepared one tensor at a time (grouping changes no element's update).
    it("multi-tensor clipping and AdamW: many tensors, mixed moments and decay, as one tensor at a time", async () => {
      const sizes = [1, 0, 17, 129, 4096, 4097, 3 * 4096 - 7, 2048 * 256 + 3];
      const ps = sizes.map((n) => rng.normals(n));
      const gs = sizes.map((n) => rng.normals(n, 0.1));
      const dt = (x: boolean) => (x ? "bf16" : "f32");
      const run = (b: Backend, grouped: boolean): Record<string, Tensor> => {
        const slots = sizes.map((n, i) => ({
          p: b.upload(ps[i], [n]),
          g: b.upload(gs[i], [n]),
          m: b.zeros([n], dt(i % 2 === 1)),
          v: b.zeros([n], dt(i % 3 !== 0)),
          decay: i % 4 !== 1,
        }));
        const clip = b.prepareClipScale(slots.map((s) => s.g));
        const { norm, scale } = clip.clipScale(0.5);
        const plans = grouped ? [b.prepareAdamW(slots)] : slots.map((s) => b.prepareAdamW([s]));
        for (let step = 1; step <= 3; step++)
          for (const plan of plans)
            plan.update({
              lr: 1e-2,
              beta1: 0.9,
              beta2: 0.95,
              eps: 1e-8,
              weightDecay: 0.1,
              step,
              gradScale: scale,
            });
        for (const plan of [clip, ...plans]) plan.dispose();
        expect(() => clip.clipScale(0.5), "a prepared op after dispose()").toThrow(/after dispose/);
        expect(() => plans[0].update({} as AdamWOptions), "a prepared op after dispose()").toThrow(
          /after dispose/,
        );
        const out: Record<string, Tensor> = { norm, scale };
        slots.forEach((s, i) => {
          out[`p${i}`] = s.p;
          out[`m${i}`] = b.cast(s.m, "f32");
          out[`v${i}`] = b.cast(s.v, "f32");
        });
        return out;
      };
      await same((b) => run(b, true), 1e-5);
      const [grouped, alone] = [
        await readAll(be, (b) => run(b, true)),
        await readAll(be, (b) => run(b, false)),
      ];
      expect(grouped.map(([k]) => k)).toEqual(alone.map(([k]) => k));
      grouped.forEach(([key, got], i) => {
        expect(Array.from(got), `${key}: all tensors in one call = one call each`).toEqual(
          Array.from(alone[i][1]),
        );
      });
    });

    it("arenas release everything a step allocates; dispose frees long-lived tensors", async () => {
      const before = be.stats();
      const kept = be.scope(() => {
        const x = be.upload(rng.normals(64), [8, 8]);
        be.matmul(x, x, { precision: "f32" });
        return be.keep(be.quantize(x, { group: "tile" }));
      });
      expect(be.stats().tensors).toBe(before.tensors + 2); // the kept tensor and its scales
      kept.dispose();
      expect(be.stats()).toEqual(before);
      expect(() => be.add(kept, kept)).toThrow(/disposed/);
    });
  });

  describe(`gradient checks: ${name}`, () => {
    const rng = new Rng(99);
    const R = 6;
    const C = 16;

    it("rmsnorm dx and dw", async () => {
      const w = rng.normals(C);
      const x0 = rng.normals(R * C);
      await gradCheck(
        (b, x) => b.rmsnorm(x, b.upload(w, [C]), 1e-6).y,
        (b, x, r) =>
          b.rmsnormBackward(
            b.reshape(r, [R, C]),
            x,
            b.upload(w, [C]),
            b.rmsnorm(x, b.upload(w, [C]), 1e-6).rstd,
          ).dx,
        x0,
        [R, C],
        R * C,
        1,
      );
      await gradCheck(
        (b, ww) => b.rmsnorm(b.upload(x0, [R, C]), ww, 1e-6).y,
        (b, ww, r) => {
          const x = b.upload(x0, [R, C]);
          return b.rmsnormBackward(b.reshape(r, [R, C]), x, ww, b.rmsnorm(x, ww, 1e-6).rstd).dw;
        },
        w,
        [C],
        R * C,
        2,
      );
    });

    it("rope (the inverse rotation is the adjoint)", async () => {
      const o = { heads: 2, width: 8, offset: 2, dim: 6, seqLen: 3, start: 5, theta: 10000 };
      await gradCheck(
        (b, x) => b.rope(x, o),
        (b, _x, r) => b.rope(b.reshape(r, [R, C]), { ...o, inverse: true }),
        rng.normals(R * C),
        [R, C],
        R * C,
        3,
      );
    });

    it("headSlice / headScatterAdd / headConcat with a broadcast head", async () => {
      const o = { heads: 2, width: 8, start: 3, len: 4 };
      await gradCheck(
        (b, x) => b.headSlice(x, o),
        (b, _x, r) => {
          const d = b.zeros([R, C]);
          b.headScatterAdd(d, b.reshape(r, [R, 8]), o);
          return d;
        },
        rng.normals(R * C),
        [R, C],
        R * 8,
        4,
      );
      const a = rng.normals(R * 8);
      await gradCheck(
        (b, kpe) => b.headConcat(b.upload(a, [R, 8]), kpe, 2, 1),
        (b, _k, r) =>
          b.headSlice(b.reshape(r, [R, 2 * 7]), { heads: 2, width: 7, start: 4, len: 3, sumHeads: true }),
        rng.normals(R * 3),
        [R, 3],
        R * 14,
        5,
      );
    });

    it("attention dq, dk, dv (f32)", async () => {
      const B = 2;
      const T = 5;
      const H = 2;
      const D = 4;
      const opts = { batch: B, seq: T, heads: H, scale: 0.5, precision: "f32" as const };
      const q = rng.normals(B * T * H * D);
      const k = rng.normals(B * T * H * D);
      const v = rng.normals(B * T * H * D);
      const shape = [B * T, H * D];
      const n = B * T * H * D;
      const run = (b: Backend, Q: Tensor, K: Tensor, V: Tensor, r: Tensor) => {
        const { o, lse } = b.attention(Q, K, V, opts);
        return b.attentionBackward(b.reshape(r, shape), Q, K, V, o, lse, opts);
      };
      const up = (b: Backend, a: Float32Array) => b.upload(a, shape);
      await gradCheck(
        (b, Q) => b.attention(Q, up(b, k), up(b, v), opts).o,
        (b, Q, r) => run(b, Q, up(b, k), up(b, v), r).dq,
        q,
        shape,
        n,
        6,
      );
      await gradCheck(
        (b, K) => b.attention(up(b, q), K, up(b, v), opts).o,
        (b, K, r) => run(b, up(b, q), K, up(b, v), r).dk,
        k,
        shape,
        n,
        7,
      );
      await gradCheck(
        (b, V) => b.attention(up(b, q), up(b, k), V, opts).o,
        (b, V, r) => run(b, up(b, q), up(b, k), V, r).dv,
        v,
        shape,
        n,
        8,
      );
    });

    it("swiglu d[g | u] over the packed gate|up", async () => {
      // gu [R, 2C]: the finite difference moves the g and the u halves of every row at once.
      await gradCheck(
        (b, gu) => b.swiglu(gu),
        (b, gu, r) => b.swigluBackward(b.reshape(r, [R, C]), gu),
        rng.normals(R * 2 * C),
        [R, 2 * C],
        R * C,
        9,
      );
    });

    it("swiglu reads a BF16 gate|up as its values, and refuses a misshapen one", async () => {
      const gu = rng.normals(R * 2 * C);
      const dh = rng.normals(R * C);
      await same((b) => {
        const g32 = b.cast(b.cast(b.upload(gu, [R, 2 * C]), "bf16"), "f32");
        const g16 = b.cast(g32, "bf16");
        const D = b.upload(dh, [R, C]);
        return {
          h32: b.swiglu(g32),
          h16: b.swiglu(g16),
          d32: b.swigluBackward(D, g32),
          d16: b.swigluBackward(D, g16),
        };
      }, 2e-5);
      await be.scope(async () => {
        const g32 = be.cast(be.cast(be.upload(gu, [R, 2 * C]), "bf16"), "f32");
        const D = be.upload(dh, [R, C]);
        // The BF16 codes decode to exactly the f32 values: the same bits out.
        expect(Array.from(await be.swiglu(be.cast(g32, "bf16")).read())).toEqual(
          Array.from(await be.swiglu(g32).read()),
        );
        expect(Array.from(await be.swigluBackward(D, be.cast(g32, "bf16")).read())).toEqual(
          Array.from(await be.swigluBackward(D, g32).read()),
        );
        expect(() => be.swiglu(be.upload(rng.normals(R * 5), [R, 5]))).toThrow(
          /swiglu: gate\|up has 5 columns/,
        );
        expect(() => be.swigluBackward(be.upload(rng.normals(R * 2), [R, 2]), g32)).toThrow(
          /swigluBackward: dh has shape \[\d+,2\], want/,
        );
      });
    });

    // Many tokens (several 128-token chunks), a vocabulary of several 64-id slices and a partial one,
    // rows wider than a block's 128 columns and not a multiple of them, half the tokens on one id
    // (a byte-level corpus's spaces), into a gradient that already holds values (a second
    // micro-batch's, or the MTP module's after the trunk's): every element is the gradient plus its
    // tokens' rows in token order, the same bits on every backend.
    it("embedding backward: many tokens, repeated ids, several slices, into a non-zero gradient", async () => {
      const N = 700;
      const V = 200;
      const D = 300;
      const ids = rng.ints(N, V);
      for (let n = 0; n < N; n += 2) ids[n] = 5;
      ids[N - 1] = V - 1;
      const dy = rng.normals(N * D);
      const g0 = rng.normals(V * D);
      await same((b) => {
        const dE = b.upload(g0, [V, D]);
        b.embeddingBackward(dE, b.upload(dy, [N, D]), b.upload(ids, [N], "i32"));
        return { dE };
      }, "exact");
    });

    it("embedding backward is the adjoint of the gather", async () => {
      const ids = Int32Array.of(0, 3, 3, 1, 0, 2);
      await gradCheck(
        (b, w) => b.embedding(w, b.upload(ids, [6], "i32")),
        (b, _w, r) => {
          const d = b.zeros([4, C]);
          b.embeddingBackward(d, b.reshape(r, [6, C]), b.upload(ids, [6], "i32"));
          return d;
        },
        rng.normals(4 * C),
        [4, C],
        6 * C,
        11,
      );
    });

    it("router weights and the balance loss through the logits", async () => {
      const N = 12;
      const E = 6;
      const k = 2;
      const bias = rng.normals(E, 0.05);
      // Fixed selection: the finite difference must not cross a top-k boundary, so use a large margin.
      const logits = rng.normals(N * E);
      for (let n = 0; n < N; n++) {
        logits[n * E + (n % E)] += 4;
        logits[n * E + ((n + 1) % E)] += 3;
      }
      await gradCheck(
        (b, l) => b.router(l, b.upload(bias, [E]), k, 1.5).weights,
        (b, l, r) => {
          const rr = b.router(l, b.upload(bias, [E]), k, 1.5);
          return b.routerBackward(b.reshape(r, [N, k]), rr.scores, rr.topIdx, 1.5);
        },
        logits,
        [N, E],
        N * k,
        12,
      );
      await gradCheck(
        (b, l) => {
          const rr = b.router(l, b.upload(bias, [E]), k, 1.5);
          return b.balanceLoss(rr.scores, rr.topIdx, { batch: 2, seq: 6, alpha: 0.3 }).loss;
        },
        (b, l, _r, rh) => {
          const rr = b.router(l, b.upload(bias, [E]), k, 1.5);
          const bl = b.balanceLoss(rr.scores, rr.topIdx, { batch: 2, seq: 6, alpha: 0.3 });
          const zero = b.zeros([N, k]);
          return b.scale(b.routerBackward(zero, rr.scores, rr.topIdx, 1.5, bl.dscores), rh[0]);
        },
        logits,
        [N, E],
        1,
        13,
      );
    });

    it("permute and combine backward (tokens and weights)", async () => {
      const N = 7;
      const d = 5;
      const k = 2;
      const top = Int32Array.of(0, 2, 1, 2, 3, 0, 2, 1, 0, 3, 1, 0, 2, 3);
      const wts = rng.normals(N * k);
      await gradCheck(
        (b, x) => {
          const p = b.moePermute(x, b.upload(top, [N, k], "i32"), 4);
          return b.moeCombine(b.scale(p.xs, 1.5), p.slot, b.upload(wts, [N, k]));
        },
        (b, x, r) => {
          const p = b.moePermute(x, b.upload(top, [N, k], "i32"), 4);
          const cb = b.moeCombineBackward(
            b.reshape(r, [N, d]),
            b.scale(p.xs, 1.5),
            p.slot,
            b.upload(wts, [N, k]),
          );
          return b.moePermuteBackward(b.scale(cb.dys, 1.5), p.slot, N);
        },
        rng.normals(N * d),
        [N, d],
        N * d,
        14,
      );
      const x0 = rng.normals(N * d);
      await gradCheck(
        (b, w) => {
          const p = b.moePermute(b.upload(x0, [N, d]), b.upload(top, [N, k], "i32"), 4);
          return b.moeCombine(p.xs, p.slot, w);
        },
        (b, w, r) => {
          const p = b.moePermute(b.upload(x0, [N, d]), b.upload(top, [N, k], "i32"), 4);
          return b.moeCombineBackward(b.reshape(r, [N, d]), p.xs, p.slot, w).dweights;
        },
        wts,
        [N, k],
        N * d,
        15,
      );
    });

    it("cross-entropy gradient", async () => {
      const N = 5;
      const V = 9;
      const t = Int32Array.of(1, 8, 0, 4, 4);
      await gradCheck(
        (b, l) => b.crossEntropy(l, b.upload(t, [N], "i32"), 1).loss,
        (b, l, _r, rh) => b.scale(b.crossEntropy(l, b.upload(t, [N], "i32"), 1).dlogits, rh[0]),
        rng.normals(N * V),
        [N, V],
        1,
        16,
      );
    });

    it("matmul gradients: Dgrad and Wgrad GEMMs are the adjoints of Fprop", async () => {
      const T = 5;
      const din = 7;
      const dout = 4;
      const w = rng.normals(dout * din);
      await gradCheck(
        (b, x) => b.matmul(x, b.upload(w, [dout, din]), { transB: true, precision: "f32" }),
        (b, _x, r) => b.matmul(b.reshape(r, [T, dout]), b.upload(w, [dout, din]), { precision: "f32" }),
        rng.normals(T * din),
        [T, din],
        T * dout,
        17,
      );
      const x0 = rng.normals(T * din);
      await gradCheck(
        (b, ww) => b.matmul(b.upload(x0, [T, din]), ww, { transB: true, precision: "f32" }),
        (b, _w, r) =>
          b.matmul(b.reshape(r, [T, dout]), b.upload(x0, [T, din]), { transA: true, precision: "f32" }),
        w,
        [dout, din],
        T * dout,
        18,
      );
    });
  });
}
