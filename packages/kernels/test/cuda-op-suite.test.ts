// The shared op suite on the cuda backend, against the ts reference. Runs where a GPU is present
// (skipped elsewhere, unless MOE8_REQUIRE_CUDA=1, which makes a missing GPU a failure). With
// MOE8_POISON=1 every new device buffer is filled with NaN bytes first, so an output an op forgets
// to write shows up as a mismatch.
import { type Backend, Rng, type Tensor, TsBackend } from "@moe8/tensor";
import { opSuite, relErr } from "@moe8/tensor/testing";
import { describe, expect, it } from "vitest";
import { CudaBackend } from "../src/cuda-backend.ts";
import { loadNative } from "../src/index.ts";
import { fpropSuffix } from "./sm90-entries.ts";

function cudaStatus(): { ok: boolean; reason: string; cc: string } {
  const s = loadNative();
  if (!s.addon) return { ok: false, reason: `native addon not loaded: ${s.reason}`, cc: "" };
  if (typeof s.addon.cudaInfo !== "function")
    return { ok: false, reason: "addon built without CUDA", cc: "" };
  const i = s.addon.cudaInfo();
  return { ok: i.available, reason: i.reason ?? "", cc: i.computeCapability ?? "" };
}

/** ||a - b|| / ||b|| (Frobenius): the measure the wgmma tolerance is stated in (notes/sm90-gemm.md). */
/** The E + 1 row offsets of expert groups of these sizes. */
function offsetsOf(sizes: number[]): Int32Array {
  const off = new Int32Array(sizes.length + 1);
  sizes.forEach((n, e) => {
    off[e + 1] = off[e] + n;
  });
  return off;
}

function normRel(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let d = 0;
  let n = 0;
  for (let i = 0; i < a.length; i++) {
    const e = a[i] - b[i];
    d += Number.isNaN(e) ? Infinity : e * e;
    n += b[i] * b[i];
  }
  return Math.sqrt(d / Math.max(n, 1e-30));
}

/**
 * The experts' FP8 Fprop and Dgrad (segments along M, 1x128 tiles x 128x128 blocks, E4M3) and Wgrad
 * (segments along K, 128x1 column tiles restarted at each expert on both operands) in every epilogue
 * (f32, BF16-rounded, accumulate-into), on expert groups of 0, 1, 127, 128, 129 rows and uneven ones,
 * with activations of varied row magnitude and outlier channels, K not a multiple of 128 and N (and
 * Wgrad's M) past the last full tile: the shapes that take every sm90 entry point.
 */
function expertGemms(seed: number) {
  const rng = new Rng(seed);
  // uncovered: rows after the last segment (they must read 0 in a fresh output).
  const cases: { sizes: number[]; out: number; inp: number; uncovered?: number }[] = [
    { sizes: [0, 1, 127, 128, 129, 0, 300, 5], out: 256, inp: 256, uncovered: 7 }, // 128x128 tiles both ways
    { sizes: [129, 0, 300, 1, 128, 63], out: 512, inp: 272 }, // Dgrad K = 512: 128x256, N = 272
    { sizes: [1, 130, 0, 64, 257], out: 128, inp: 1024 }, // Fprop K = 1024: 128x256, N = 128
    // Wgrad N = 128: the 128 x 128 two-buffer mainloop over 6, 0, 5, 1 and 3 chunks (pairs, odd
    // and even tails; the 4-stage ring wraps inside a tile).
    { sizes: [700, 0, 517, 1, 260], out: 256, inp: 128 },
    // More groups than the deep rings' tables hold (SM90_MAX_E_DEEP = 128): the 4-stage entry.
    { sizes: Array.from({ length: 130 }, (_, i) => (i * 37) % 61), out: 128, inp: 256 },
  ];
  return cases.map(({ sizes, out, inp, uncovered = 0 }) => {
    const E = sizes.length;
    const off = offsetsOf(sizes);
    const rows = off[E] + uncovered;
    const act = (cols: number) => {
      const v = rng.normals(rows * cols);
      const hot = new Set(Array.from({ length: Math.max(1, cols >> 6) }, () => rng.int(cols)));
      for (let r = 0; r < rows; r++) {
        const mag = Math.exp(0.5 * rng.normal());
        for (let c = 0; c < cols; c++) v[r * cols + c] *= mag * (hot.has(c) ? 40 : 1);
      }
      return v;
    };
    const x = act(inp);
    const dy = act(out);
    const w = rng.normals(E * out * inp, 0.05);
    const c0 = rng.normals(rows * Math.max(out, inp));
    const cw = rng.normals(E * out * inp);
    const name = `sizes ${sizes.join(",")}${uncovered ? ` + ${uncovered} uncovered rows` : ""}, W [${E}, ${out}, ${inp}]`;
    return {
      name,
      run: (b: Backend): Record<string, Tensor> => {
        const O = b.upload(off, [E + 1], "i32");
        const wq = b.quantize(b.upload(w, [E, out, inp]), { group: "block" });
        const xq = b.quantize(b.upload(x, [rows, inp]), { group: "tile" });
        const dyq = b.quantize(b.upload(dy, [rows, out]), { group: "tile" });
        const xc = b.quantize(b.upload(x, [rows, inp]), { group: "column-tile", segments: O });
        const dyc = b.quantize(b.upload(dy, [rows, out]), { group: "column-tile", segments: O });
        const wgrad = { segment: "k", transA: true, precision: "fp8" } as const;
        const r: Record<string, Tensor> = {};
        for (const outBf16 of [false, true]) {
          const tag = outBf16 ? "bf16" : "f32";
          r[`fprop ${tag}`] = b.groupedMatmul(xq, wq, O, {
            segment: "m",
            transB: true,
            precision: "fp8",
            outBf16,
          });
          r[`dgrad ${tag}`] = b.groupedMatmul(dyq, wq, O, { segment: "m", precision: "fp8", outBf16 });
          if (outBf16) {
            // BF16 storage (the sm90 epilogue's bf16 strips and partial-tile stores), read as f32.
            const s16 = { segment: "m", precision: "fp8", outBf16, storeBf16: true } as const;
            r["fprop bf16 stored"] = b.cast(b.groupedMatmul(xq, wq, O, { ...s16, transB: true }), "f32");
            r["dgrad bf16 stored"] = b.cast(b.groupedMatmul(dyq, wq, O, s16), "f32");
          }
          const accF = b.upload(c0.subarray(0, rows * out), [rows, out]);
          b.groupedMatmul(xq, wq, O, {
            segment: "m",
            transB: true,
            precision: "fp8",
            outBf16,
            accumulate: accF,
          });
          r[`fprop ${tag} accumulate`] = accF;
          const accD = b.upload(c0.subarray(0, rows * inp), [rows, inp]);
          b.groupedMatmul(dyq, wq, O, { segment: "m", precision: "fp8", outBf16, accumulate: accD });
          r[`dgrad ${tag} accumulate`] = accD;
          // Wgrad [E, out, inp], and its transpose [E, inp, out] (the other tile width).
          r[`wgrad ${tag}`] = b.groupedMatmul(dyc, xc, O, { ...wgrad, outBf16 });
          r[`wgrad swapped ${tag}`] = b.groupedMatmul(xc, dyc, O, { ...wgrad, outBf16 });
          const accW = b.upload(cw, [E, out, inp]);
          b.groupedMatmul(dyc, xc, O, { ...wgrad, outBf16, accumulate: accW });
          r[`wgrad ${tag} accumulate`] = accW;
        }
        return r;
      },
    };
  });
}

async function readOutputs(b: Backend, run: (b: Backend) => Record<string, Tensor>) {
  return b.scope(async () => {
    const out: [string, Float32Array][] = [];
    for (const [k, t] of Object.entries(run(b))) out.push([k, (await t.read()) as Float32Array]);
    return out;
  });
}

/**
 * A cuda backend with the sm90 GEMMs on or off and the other settings of `env` (MOE8_SM90_GEMM,
 * MOE8_SM90_KMAJOR, MOE8_SM90_BN, MOE8_SM90_CTAS, ...) for its construction (they are read there;
 * set directly rather than stubbed, as this file also runs under `bun test`).
 */
function cudaWith(sm90: boolean, env: Record<string, string> = {}): CudaBackend {
  const all: Record<string, string> = { MOE8_SM90_GEMM: sm90 ? "1" : "0", ...env };
  const before = Object.fromEntries(Object.keys(all).map((k) => [k, process.env[k]]));
  Object.assign(process.env, all);
  try {
    return new CudaBackend();
  } finally {
    for (const [k, v] of Object.entries(before)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}

const status = cudaStatus();
// The 128 x 256 Wgrad entry's suffix by MOE8_SM90_WGRAD_STAGED (its "0" entry depends on MOE8_SM90_PINGPONG).
const WIDE_WGRAD: Record<string, string> = {
  "1": "staged",
  checked: "staged_checked",
  halves: "halves",
  turns: "turns",
  lean: "lean",
};
const required = process.env.MOE8_REQUIRE_CUDA === "1";

if (status.ok) {
  opSuite("cuda", () => new CudaBackend());

  describe("cuda backend specifics", () => {
    it("reports device memory and frees tensors explicitly", async () => {
      const be = new CudaBackend();
      const before = be.memoryStats().allocated;
      const t = be.upload(new Float32Array(1000).fill(1.5), [1000]);
      expect(be.memoryStats().allocated).toBeGreaterThan(before);
      expect(be.peakMemory()).toBeGreaterThanOrEqual(be.memoryStats().allocated);
      expect(Array.from((await t.read()).slice(0, 2))).toEqual([1.5, 1.5]);
      t.dispose();
      expect(be.memoryStats().allocated).toBe(before);
    });

    // The optimiser's kernels over a few tensors of uneven sizes, five steps with the clip factor of
    // each step: within the op suite's AdamW tolerance of the reference; how many weights differ
    // from it at all is printed (the per-element arithmetic is the reference's, up to the fused
    // multiply-adds NVRTC may contract). The device tables go with dispose().
    it("multi-tensor AdamW and gradient norm: against the reference over five steps, tables freed", async () => {
      const be = new CudaBackend();
      const ref = new TsBackend();
      const rng = new Rng(18);
      const sizes = [3, 4096, 70_001, 1, 600_000];
      const data = sizes.map((n) => [rng.normals(n), rng.normals(n, 0.1)]);
      const run = (b: Backend, moments: "f32" | "bf16") =>
        b.scope(async () => {
          const slots = sizes.map((n, i) => ({
            p: b.upload(data[i][0], [n]),
            g: b.upload(data[i][1], [n]),
            m: b.zeros([n], moments),
            v: b.zeros([n], moments),
            decay: i !== 0,
          }));
          const clip = b.prepareClipScale(slots.map((s) => s.g));
          const adamw = b.prepareAdamW(slots);
          const norms: number[] = [];
          for (let step = 1; step <= 5; step++) {
            const c = clip.clipScale(1);
            norms.push(await c.norm.item());
            adamw.update({
              lr: 1e-2,
              beta1: 0.9,
              beta2: 0.95,
              eps: 1e-8,
              weightDecay: 0.1,
              step,
              gradScale: c.scale,
            });
          }
          clip.dispose();
          adamw.dispose();
          const p: number[] = [];
          for (const s of slots) for (const x of await s.p.read()) p.push(x);
          return { norms, p };
        });
      for (const moments of ["f32", "bf16"] as const) {
        const before = be.memoryStats().allocated;
        const got = await run(be, moments);
        expect(be.memoryStats().allocated, "everything freed").toBe(before);
        const want = await run(ref, moments);
        const differ = got.p.filter((x, i) => !Object.is(x, want.p[i])).length;
        console.log(
          `adamw, ${moments} moments: ${differ} of ${got.p.length} weights differ from ts after 5 steps`,
        );
        expect(relErr(got.p, want.p)).toBeLessThanOrEqual(1e-5);
        expect(relErr(got.norms, want.norms)).toBeLessThanOrEqual(1e-6);
      }
    });

    it("is deterministic: the same inputs give the same bits twice", async () => {
      const be = new CudaBackend();
      const run = () =>
        be.scope(async () => {
          const x = be.upload(
            Float32Array.from({ length: 4096 }, (_, i) => Math.sin(i) * 3),
            [64, 64],
          );
          const ids = be.upload(
            Int32Array.from({ length: 64 }, (_, i) => (i * 7) % 16),
            [64],
            "i32",
          );
          const r = be.router(
            be.matmul(x, be.upload(new Float32Array(64 * 16).fill(0.01), [64, 16]), { precision: "f32" }),
            be.zeros([16]),
            2,
            1,
          );
          const p = be.moePermute(x, r.topIdx, 16);
          const dE = be.zeros([16, 64]);
          be.embeddingBackward(dE, x, ids);
          return [
            await be.sum(x).read(),
            await p.slot.read(),
            await dE.read(),
            await be.clipScale([x, dE], 1).norm.read(),
          ];
        });
      expect(await run()).toEqual(await run());
    });
  });

  // Both grouped FP8 paths against the ts reference (the exact chunked sums of fp8-core's
  // scaledMatmul), each with the tolerance its arithmetic implies. mma.sync sums the FP8 products in
  // f32 inside each 128-deep chunk, as the reference does (only the order differs). wgmma keeps ~14
  // bits while summing inside each instruction (Hopper's FP8 accumulation; the DeepSeek-V3 report
  // describes it): ~2.5e-4 relative (Frobenius) measured, at most 8e-4 of the largest output on
  // one element, and promotion every 128 bounds it, so 1e-3 (Frobenius) and 2e-3 (largest element
  // error over the largest output). BF16-rounded outputs may differ by one BF16 ulp (2^-8) where
  // the two sums straddle a rounding boundary, on either path.
  describe("grouped FP8 GEMM paths (experts' Fprop, Dgrad and Wgrad)", () => {
    const seed = Number(process.env.MOE8_TEST_SEED ?? Date.now() % 1_000_000_007);
    const ref = new TsBackend();
    // The reference's outputs of each case, computed once for all the paths below (the inputs
    // depend only on the seed): the ts backend takes ~30 s for the five cases, the GPU milliseconds.
    const cases = expertGemms(seed);
    const wanted = new Map<string, Promise<[string, Float32Array][]>>();
    const reference = (c: (typeof cases)[number]) => {
      const known = wanted.get(c.name);
      if (known) return known;
      const p = readOutputs(ref, c.run);
      wanted.set(c.name, p);
      return p;
    };
    // sm90: the Wgrad's column tiles written K-major by the quantisers (or transposed before it);
    // Fprop and Dgrad on 128 x 128 tiles (or 128 x 256); one CTA per SM (or 3, each walking many
    // tiles: the ring's phases, epilogues deferred across tiles).
    const paths: { sm90: boolean; env: Record<string, string>; name: string }[] = [
      { sm90: false, env: {}, name: "mma.sync" },
      ...(status.cc === "9.0"
        ? [
            { sm90: true, env: {}, name: "sm90 wgmma" },
            { sm90: true, env: { MOE8_SM90_KMAJOR: "0" }, name: "sm90 wgmma, MOE8_SM90_KMAJOR=0" },
            { sm90: true, env: { MOE8_SM90_BN: "256" }, name: "sm90 wgmma, MOE8_SM90_BN=256" },
            { sm90: true, env: { MOE8_SM90_RING: "4" }, name: "sm90 wgmma, MOE8_SM90_RING=4" },
            { sm90: true, env: { MOE8_SM90_CTAS: "3" }, name: "sm90 wgmma on 3 CTAs" },
            {
              sm90: true,
              env: { MOE8_SM90_BN: "256", MOE8_SM90_PINGPONG: "0", MOE8_SM90_WGRAD_STAGED: "0" },
              name: "sm90 wgmma, MOE8_SM90_BN=256 MOE8_SM90_PINGPONG=0 MOE8_SM90_WGRAD_STAGED=0",
            },
            {
              sm90: true,
              env: { MOE8_SM90_WGRAD_STAGED: "0" },
              name: "sm90 wgmma, MOE8_SM90_WGRAD_STAGED=0",
            },
            {
              sm90: true,
              env: { MOE8_SM90_WGRAD_STAGED: "checked" },
              name: "sm90 wgmma, MOE8_SM90_WGRAD_STAGED=checked",
            },
            {
              sm90: true,
              env: { MOE8_SM90_WGRAD_ORDER: "experts" },
              name: "sm90 wgmma, MOE8_SM90_WGRAD_ORDER=experts",
            },
            // On 3 CTAs (each CTA through many tiles: the staging slots rotate across them, the
            // ring's stages carry over), the entries the defaults replaced and the opt-in ones (the
            // defaults' own 3-CTA run is "sm90 wgmma on 3 CTAs"): the staged Wgrad's epilogue by
            // halves (before the strips), taking turns (before warpgroup 1 lagged a chunk behind),
            // without the lean descriptors (=1); the Fprop/Dgrad entries before the early ones (plain).
            ...[
              ["MOE8_SM90_WGRAD_STAGED", "halves"],
              ["MOE8_SM90_WGRAD_STAGED", "turns"],
              ["MOE8_SM90_WGRAD_STAGED", "1"],
              ["MOE8_SM90_FPROP", "plain"],
            ].map(([k, v]) => ({
              sm90: true,
              env: { [k]: v, MOE8_SM90_CTAS: "3" },
              name: `sm90 wgmma, ${k}=${v} on 3 CTAs`,
            })),
          ]
        : []),
    ];
    for (const { sm90, env, name } of paths)
      it(`${name} equals the reference within its tolerance (seed ${seed})`, async () => {
        const be = cudaWith(sm90, env);
        expect(be.groupedGemmKernel).toBe(sm90 ? "sm90-wgmma" : "mma.sync");
        const ran = new Set<string>();
        const worst = { f32Frobenius: 0, f32Largest: 0, bf16Largest: 0 };
        for (const c of cases) {
          const want = await reference(c);
          let got: [string, Float32Array][] = [];
          const t = await be.timeKernels(async () => {
            got = await readOutputs(be, c.run);
          });
          for (const k of t.kernels) if (k.name.startsWith("gemm")) ran.add(k.name);
          for (let i = 0; i < want.length; i++) {
            const [key, w] = want[i];
            const g = got[i][1];
            const what = `${c.name}: ${key} (seed ${seed})`;
            const bf16 = key.includes("bf16");
            if (bf16) worst.bf16Largest = Math.max(worst.bf16Largest, relErr(g, w));
            else {
              worst.f32Frobenius = Math.max(worst.f32Frobenius, normRel(g, w));
              worst.f32Largest = Math.max(worst.f32Largest, relErr(g, w));
            }
            if (sm90 && !bf16) {
              expect(normRel(g, w), `${what}, Frobenius`).toBeLessThanOrEqual(1e-3);
              expect(relErr(g, w), `${what}, largest element`).toBeLessThanOrEqual(2e-3);
            } else if (bf16) {
              expect(relErr(g, w), `${what}, largest element`).toBeLessThanOrEqual(1e-2);
            } else {
              expect(relErr(g, w), `${what}, largest element`).toBeLessThanOrEqual(1e-5);
            }
          }
        }
        // The measured errors, for the record (notes/sm90-gemm.md).
        console.log(`grouped FP8 ${name} vs reference: ${JSON.stringify(worst)}`);
        // Which kernels computed them: every sm90 entry point (and the Wgrad's transposes only
        // where the quantisers do not write K-major), or the mma.sync kernels only.
        const sm90Ran = [...ran].filter((k) => k.startsWith("gemm_sm90."));
        if (sm90)
          expect(sm90Ran.sort(), [...ran].join(", ")).toEqual(
            [
              // Fprop/Dgrad up to 128 groups: the 6-stage ring for BF16 stores, the 5-stage one
              // otherwise; the 4-stage entry for 130 groups; unless forced.
              ...(env.MOE8_SM90_BN || env.MOE8_SM90_RING
                ? [
                    env.MOE8_SM90_BN === "256"
                      ? `gemm_sm90.gemm_sm90_fp8_grouped_128x256${env.MOE8_SM90_PINGPONG === "0" ? "" : "_pingpong"}`
                      : "gemm_sm90.gemm_sm90_fp8_grouped_128x128",
                  ]
                : [
                    `gemm_sm90.gemm_sm90_fp8_grouped_128x128_bf16${fpropSuffix(env.MOE8_SM90_FPROP)}`,
                    `gemm_sm90.gemm_sm90_fp8_grouped_128x128_e128${fpropSuffix(env.MOE8_SM90_FPROP)}`,
                    "gemm_sm90.gemm_sm90_fp8_grouped_128x128",
                  ]),
              // Wgrad: 128 x 128 and 128 x 256 by N.
              "gemm_sm90.gemm_sm90_fp8_wgrad_128x128",
              env.MOE8_SM90_WGRAD_STAGED === "0"
                ? `gemm_sm90.gemm_sm90_fp8_wgrad_128x256${env.MOE8_SM90_PINGPONG === "0" ? "" : "_pingpong"}`
                : `gemm_sm90.gemm_sm90_fp8_wgrad_128x256_${WIDE_WGRAD[env.MOE8_SM90_WGRAD_STAGED ?? "lean"]}`,
              ...(env.MOE8_SM90_KMAJOR === "0" ? ["gemm_sm90.sm90_coltile_transpose"] : []),
            ].sort(),
          );
        else expect(sm90Ran, [...ran].join(", ")).toEqual([]);
      }, 300_000);

    // The order in which the Wgrad's CTAs take the experts' tiles (largest expert first, or in
    // expert order) moves no bit: each tile's chunks are summed in the same order either way.
    if (status.cc === "9.0")
      it(`sm90 wgmma: the Wgrad's tile order changes no output bit (seed ${seed})`, async () => {
        const sorted = cudaWith(true, {});
        const experts = cudaWith(true, { MOE8_SM90_WGRAD_ORDER: "experts" });
        for (const c of cases) {
          const [a, b] = [await readOutputs(sorted, c.run), await readOutputs(experts, c.run)];
          for (let i = 0; i < a.length; i++) expect(b[i][1], `${c.name}: ${a[i][0]}`).toEqual(a[i][1]);
        }
      }, 300_000);

    // FP8 outputs quantised in the sm90 epilogue (storeQuantized): the codes and scales of quantising
    // the same loop's f32 output (quant_tile128), bit for bit, on the experts' Fprop and Dgrad with
    // groups of 0, 1, 127, 128, 129 rows, rows no segment covers (code 0, a zero tile's scale), N past
    // the last full tile, every scaling and both formats; 130 groups (past the entry's tables) take
    // the f32 product and quantize, with the same result.
    if (status.cc === "9.0")
      it(`sm90 wgmma: FP8 outputs equal quantising the f32 output, bit for bit (seed ${seed})`, async () => {
        const be = cudaWith(true, {});
        const rng = new Rng(seed + 7);
        const shapes = [
          { sizes: [0, 1, 127, 128, 129, 0, 300, 5], out: 256, inp: 272, uncovered: 7 },
          { sizes: [129, 0, 300, 1, 128, 63], out: 512, inp: 144, uncovered: 0 },
          { sizes: [1, 130, 0, 64, 257], out: 128, inp: 1024, uncovered: 0 },
          { sizes: Array.from({ length: 130 }, (_, i) => (i * 37) % 61), out: 128, inp: 256, uncovered: 0 },
        ];
        const scalings = [{}, { format: "e5m2" as const }, { pow2Scales: true }, { unit: true }];
        const ran = new Set<string>();
        for (const { sizes, out, inp, uncovered } of shapes) {
          const E = sizes.length;
          const off = offsetsOf(sizes);
          const rows = off[E] + uncovered;
          const x = rng.normals(rows * inp, 2);
          const dy = rng.normals(rows * out);
          x[3 * inp + 5] = 700; // an outlier
          const w = rng.normals(E * out * inp, 0.05);
          const t = await be.timeKernels(() =>
            be.scope(async () => {
              const O = be.upload(off, [E + 1], "i32");
              const wq = be.quantize(be.upload(w, [E, out, inp]), { group: "block" });
              const xq = be.quantize(be.upload(x, [rows, inp]), { group: "tile" });
              const dyq = be.quantize(be.upload(dy, [rows, out]), { group: "tile" });
              const m = { segment: "m", precision: "fp8" } as const;
              for (const scaling of scalings) {
                const q = { group: "tile" as const, ...scaling };
                const runs: [string, (sq?: typeof q) => Tensor][] = [
                  ["fprop", (sq) => be.groupedMatmul(xq, wq, O, { ...m, transB: true, storeQuantized: sq })],
                  ["dgrad", (sq) => be.groupedMatmul(dyq, wq, O, { ...m, storeQuantized: sq })],
                ];
                for (const [role, run] of runs) {
                  const what = `sizes ${sizes.length > 8 ? `${E} groups` : sizes.join(",")}, ${role} ${JSON.stringify(scaling)}`;
                  const [got, want] = [run(q), be.quantize(run(), q)];
                  expect(Array.from(await got.read()), what).toEqual(Array.from(await want.read()));
                  expect(Array.from(await got.quant!.scales.read()), `${what} scales`).toEqual(
                    Array.from(await want.quant!.scales.read()),
                  );
                }
              }
            }),
          );
          for (const k of t.kernels) if (k.name.startsWith("gemm_sm90.")) ran.add(k.name);
        }
        expect([...ran]).toContain("gemm_sm90.gemm_sm90_fp8_grouped_128x128_fp8out");
      }, 300_000);

    // Dense FP8 GEMMs (Fprop, Dgrad, Wgrad of a Linear) on the same kernels as one group of all rows
    // (MOE8_SM90_DENSE=all), against the reference with the wgmma tolerance: M not a multiple of
    // 128, K not a multiple of 128 (Fprop) and N past the last full tile, every epilogue; Wgrad
    // split along K and summed (sum_slices_f32). Under `auto` with T a multiple of 128 the Wgrad is
    // cuBLASLt's, reading the K-major column tiles as they are.
    for (const [mode, T] of [
      ["all", 1300],
      ["auto", 1280],
    ] as const)
      it.skipIf(status.cc !== "9.0")(
        `sm90 wgmma: dense FP8 roles as one group, MOE8_SM90_DENSE=${mode}, ${T} tokens (seed ${seed})`,
        async () => {
          const be = cudaWith(true);
          be.sm90Dense = mode;
          const rng = new Rng(seed + 2);
          // T = 1300 (11 chunks): Wgrad split along K into two parts (wgradSplit), the last partial.
          const [out, inp] = [272, 400];
          const x = rng.normals(T * inp);
          const dy = rng.normals(T * out);
          const w = rng.normals(out * inp, 0.05);
          const c0 = rng.normals(Math.max(T * Math.max(out, inp), out * inp));
          const run = (b: Backend): Record<string, Tensor> => {
            const wq = b.quantize(b.upload(w, [out, inp]), { group: "block" });
            const xq = b.quantize(b.upload(x, [T, inp]), { group: "tile" });
            const dyq = b.quantize(b.upload(dy, [T, out]), { group: "tile" });
            const xc = b.quantize(b.upload(x, [T, inp]), { group: "column-tile" });
            const dyc = b.quantize(b.upload(dy, [T, out]), { group: "column-tile" });
            const r: Record<string, Tensor> = {};
            for (const outBf16 of [false, true]) {
              const tag = outBf16 ? "bf16" : "f32";
              const fp8 = { precision: "fp8", outBf16 } as const;
              r[`fprop ${tag}`] = b.matmul(xq, wq, { ...fp8, transB: true });
              r[`dgrad ${tag}`] = b.matmul(dyq, wq, fp8);
              r[`wgrad ${tag}`] = b.matmul(dyc, xc, { ...fp8, transA: true });
              const acc = b.upload(c0.subarray(0, out * inp), [out, inp]);
              b.matmul(dyc, xc, { ...fp8, transA: true, accumulate: acc });
              r[`wgrad ${tag} accumulate`] = acc;
              const accD = b.upload(c0.subarray(0, T * inp), [T, inp]);
              b.matmul(dyq, wq, { ...fp8, accumulate: accD });
              r[`dgrad ${tag} accumulate`] = accD;
            }
            return r;
          };
          const want = await readOutputs(ref, run);
          let got: [string, Float32Array][] = [];
          const t = await be.timeKernels(async () => {
            got = await readOutputs(be, run);
          });
          for (let i = 0; i < want.length; i++) {
            const [key, wv] = want[i];
            const what = `dense ${key} (seed ${seed})`;
            if (key.includes("bf16")) expect(relErr(got[i][1], wv), what).toBeLessThanOrEqual(1e-2);
            else {
              expect(normRel(got[i][1], wv), `${what}, Frobenius`).toBeLessThanOrEqual(1e-3);
              expect(relErr(got[i][1], wv), `${what}, largest element`).toBeLessThanOrEqual(2e-3);
            }
          }
          const ran = new Set(t.kernels.map((k) => k.name));
          const names = [...ran].join(", ");
          // (The Wgrad on the experts' default 128 x 256 entry, N = 400: the lean one.)
          if (mode === "all")
            expect([...ran].sort()).toEqual(
              expect.arrayContaining([
                "elementwise.sum_slices_f32",
                `gemm_sm90.gemm_sm90_fp8_wgrad_128x256_${WIDE_WGRAD.lean}`,
              ]),
            );
          else
            expect(
              [...ran].some((n) => n.startsWith("cublasLt.")),
              names,
            ).toBe(true);
          // Column tiles written K-major: no transposes before either Wgrad, no conversion back (the
          // Dgrad's weight transpose is transpose_u8_tiled too, so that one is not checked here).
          for (const k of ["gemm_sm90.sm90_coltile_transpose", "quant.coltile_kmajor_rows"])
            expect(ran.has(k), `${k} in ${names}`).toBe(false);
          expect(
            [...ran].some((n) => n.includes("grouped")),
            [...ran].join(", "),
          ).toBe(true);
        },
        300_000,
      );

    it.skipIf(status.cc !== "9.0")("sm90 wgmma gives the same bits twice", async () => {
      const be = cudaWith(true);
      const [c] = expertGemms(seed + 1);
      expect(await readOutputs(be, c.run)).toEqual(await readOutputs(be, c.run));
    });
  });
} else {
  describe("cuda op suite", () => {
    it.skipIf(!required)(`needs a GPU (${status.reason})`, () => {
      throw new Error(`MOE8_REQUIRE_CUDA=1 but the cuda backend is unavailable: ${status.reason}`);
    });
  });
}
