// The cuda backend's host code without a GPU: every op runs against a fake addon that records the
// launches instead of running them, in each configuration that picks other kernels (cuBLASLt on,
// refusing, off; tensor cores off; a Hopper GPU, with and without MOE8_SM90_GEMM=0). Each launch
// must name a kernel of the signature table, stay within its __launch_bounds__ and the grid limits,
// and pass one 8-byte slot per parameter (tensor maps: 128 bytes at a 64-byte boundary); the
// encoder's run-time checks (integer arguments, pointers below 2^53) run on every launch site; and
// every kernel of the table must be launched by some op. The numbers are the cuda op suite's job
// (cuda-op-suite.test.ts, on a GPU).
import type { Backend, Tensor } from "@moe8/tensor";
import { describe, expect, it, vi } from "vitest";
import { DEFINES, KERNELS } from "../src/cuda/kernels.generated.ts";
import { createFakeCuda, type FakeCudaConfig } from "./fake-cuda.ts";
import { fpropSuffix } from "./sm90-entries.ts";

const config: FakeCudaConfig = { computeCapability: "8.9", misalign: true, lt: "ok" };
const fake = createFakeCuda(config);
const { table, launched, launchedNow, problems, log, uploads } = fake;

vi.mock("../src/index.ts", async (original) => ({
  ...(await original<typeof import("../src/index.ts")>()),
  loadNative: () => ({ loaded: true, reason: null, addon: fake.addon }),
}));
const { CudaBackend } = await import("../src/cuda-backend.ts");

const seq = (n: number) => Float32Array.from({ length: n }, (_, i) => Math.sin(i));
const ints = (n: number, m: number) => Int32Array.from({ length: n }, (_, i) => (i * 7) % m);

/** Every op, in the shapes and options that take each branch of the host code. */
async function everyOp(b: Backend) {
  const up = (shape: number[]) => b.upload(seq(shape.reduce((x, y) => x * y, 1)), shape);
  const x = up([64, 256]);
  const y = up([64, 256]);
  b.add(x, y);
  b.addInto(x, y, 0.5);
  b.scale(x, 1.5);
  for (const dt of ["f32", "i32", "e4m3", "bf16"] as const) b.fill(b.zeros([5], dt), 1);
  b.setRows(b.rows(b.copy(x), 3, 7), 0, up([2, 256]));
  b.cast(b.cast(x, "bf16"), "f32");
  b.cast(up([3, 3]), "bf16");
  b.sum(up([1, 100000]));
  for (const group of ["tile", "block", "column-tile", "row", "tensor"] as const) {
    for (const o of [{}, { format: "e5m2" as const, pow2Scales: true }, { unit: true }])
      b.fp8Flow(x, b.quantize(x, { group, ...o }));
    b.dequantize(b.quantize(up([2, 130, 300]), { group }));
  }
  const segs = b.upload(Int32Array.from([0, 10, 10, 64]), [4], "i32");
  const bySegment = b.quantize(x, { group: "column-tile", segments: segs });
  b.dequantize(bySegment);
  await b.read(bySegment.quant!.scales);
  b.requantize(b.quantize(x, { group: "tile" }), { group: "column-tile" });
  b.requantize(b.quantize(x, { group: "tile" }), { group: "block" });
  // Column tiles (K-major on Hopper) read back, copied (row-major, without scales) and quantised
  // again.
  for (const seg of [undefined, segs]) {
    const c = b.quantize(x, { group: "column-tile", segments: seg });
    await b.read(c);
    b.rows(b.copy(c), 3, 7);
    for (const group of ["column-tile", "tile"] as const) b.requantize(c, { group });
  }
  for (const precision of ["f32", "bf16"] as const)
    for (const [M, N, K] of [
      [128, 256, 128],
      [33, 17, 9],
    ])
      for (const transA of [false, true])
        for (const transB of [false, true]) {
          const [A, B] = [up(transA ? [K, M] : [M, K]), up(transB ? [N, K] : [K, N])];
          b.matmul(A, B, { precision, transA, transB, outBf16: true });
          b.matmul(A, B, { precision, transA, transB, accumulate: b.zeros([M, N]), outBf16: true });
        }
  for (const [M, N, K] of [
    [128, 256, 256],
    [48, 32, 128],
    [40, 24, 72],
  ])
    for (const [fa, fb] of [
      ["e4m3", "e4m3"],
      ["e4m3", "e5m2"],
      ["e5m2", "e4m3"],
      ["e5m2", "e5m2"],
    ] as const) {
      const a = b.quantize(up([M, K]), { group: "tile", format: fa });
      b.matmul(a, b.quantize(up([N, K]), { group: "block", format: fb }), { precision: "fp8", transB: true });
      b.matmul(a, b.quantize(up([N, K]), { group: "block" }), {
        precision: "fp8",
        transB: true,
        promotion: 32,
      });
      b.matmul(a, b.quantize(up([K, N]), { group: "block", format: fb }), { precision: "fp8" });
      const t = (s: number[], f: "e4m3" | "e5m2") => b.quantize(up(s), { group: "tensor", format: f });
      b.matmul(t([M, K], fa), t([N, K], fb), { precision: "fp8", transB: true });
      const c = (s: number[], f: "e4m3" | "e5m2") => b.quantize(up(s), { group: "column-tile", format: f });
      b.matmul(c([K, M], fa), c([K, N], fb), { precision: "fp8", transA: true });
    }
  // A dense FP8 Wgrad over 1300 tokens: split along K on Hopper (gemm-sm90.ts, wgradSplit).
  const ct = (s: number[]) => b.quantize(up(s), { group: "column-tile" });
  b.matmul(ct([1300, 128]), ct([1300, 256]), { precision: "fp8", transA: true, outBf16: true });
  const offs = b.upload(Int32Array.from([0, 20, 20, 64]), [4], "i32");
  for (const precision of ["f32", "bf16"] as const) {
    b.groupedMatmul(up([64, 128]), up([3, 64, 128]), offs, { precision, segment: "m", transB: true });
    b.groupedMatmul(up([64, 36]), up([3, 36, 20]), offs, { precision, segment: "m" });
    b.groupedMatmul(up([64, 32]), up([64, 48]), offs, { precision, segment: "k", transA: true });
  }
  const q = (s: number[], group: "tile" | "block") => b.quantize(up(s), { group });
  b.groupedMatmul(q([64, 128], "tile"), q([3, 64, 128], "block"), offs, {
    precision: "fp8",
    segment: "m",
    transB: true,
  });
  b.groupedMatmul(q([64, 64], "tile"), q([3, 64, 128], "block"), offs, { precision: "fp8", segment: "m" });
  // More groups than the deep rings' tables hold (SM90_MAX_E_DEEP = 128): the 4-stage entry.
  const many = b.upload(
    Int32Array.from({ length: 131 }, (_, i) => Math.min(i, 64)),
    [131],
    "i32",
  );
  b.groupedMatmul(q([64, 128], "tile"), q([130, 64, 128], "block"), many, {
    precision: "fp8",
    segment: "m",
    transB: true,
  });
  // A weight whose columns are not a multiple of 16: quant_block writes no transpose beside it, so
  // the Dgrad transposes it first.
  b.groupedMatmul(q([64, 48], "tile"), q([3, 48, 72], "block"), offs, { precision: "fp8", segment: "m" });
  // BF16 storage: the sm90 epilogue on Hopper (128 x 256 and 128 x 128 entries), f32 then a
  // conversion elsewhere and for other precisions.
  for (const [K, N] of [
    [512, 256],
    [128, 64],
  ])
    b.groupedMatmul(q([64, K], "tile"), q([3, N, K], "block"), offs, {
      precision: "fp8",
      segment: "m",
      transB: true,
      outBf16: true,
      storeBf16: true,
    });
  b.groupedMatmul(up([64, 128]), up([3, 64, 128]), offs, {
    precision: "f32",
    segment: "m",
    transB: true,
    storeBf16: true,
  });
  // FP8 storage (storeQuantized): quantised in the sm90 epilogue on Hopper (Fprop, Dgrad, dense),
  // elsewhere the f32 product then quantize.
  for (const transB of [true, false])
    b.groupedMatmul(q([64, 128], "tile"), q([3, 128, 128], "block"), offs, {
      precision: "fp8",
      segment: "m",
      transB,
      storeQuantized: { group: "tile" },
    });
  b.matmul(q([64, 128], "tile"), q([256, 128], "block"), {
    precision: "fp8",
    transB: true,
    storeQuantized: { group: "tile", format: "e5m2" },
  });
  // Long K (the 128 x 256 sm90 tiles), BF16-rounded output, accumulate-into, and E5M2 (mma.sync).
  for (const accumulate of [undefined, b.zeros([64, 256])])
    b.groupedMatmul(q([64, 512], "tile"), q([3, 256, 512], "block"), offs, {
      precision: "fp8",
      segment: "m",
      transB: true,
      outBf16: true,
      accumulate,
    });
  b.groupedMatmul(
    b.quantize(up([64, 64]), { group: "tile", format: "e5m2" }),
    q([3, 64, 128], "block"),
    offs,
    {
      precision: "fp8",
      segment: "m",
    },
  );
  const cs = (s: number[]) => b.quantize(up(s), { group: "column-tile", segments: offs });
  // Wgrad: N = 128 and N = 256 take the two sm90 Wgrad entries (after the transposes), accumulating
  // too.
  b.groupedMatmul(cs([64, 64]), cs([64, 128]), offs, { precision: "fp8", segment: "k", transA: true });
  b.groupedMatmul(cs([64, 32]), cs([64, 256]), offs, {
    precision: "fp8",
    segment: "k",
    transA: true,
    accumulate: b.zeros([3, 32, 256]),
  });
  const w = up([256]);
  b.rmsnormBackward(y, x, w, b.rmsnorm(x, w, 1e-6).rstd);
  // Producers handing the next Linear its FP8 input (the fused kernels where rows are whole tiles).
  b.rmsnormQuantized(x, w, 1e-6, { group: "tile" });
  // A width the one-pass backward does not take (C % 128 != 0): the two-pass kernels, whatever the
  // buffers' alignment.
  const [x72, w72] = [up([64, 72]), up([72])];
  b.rmsnormBackward(up([64, 72]), x72, w72, b.rmsnorm(x72, w72, 1e-6).rstd);
  b.rope(x, { heads: 4, width: 64, offset: 32, dim: 32, seqLen: 16, theta: 10000, inverse: true });
  b.rope(x, { heads: 4, width: 64, offset: 32, dim: 32, seqLen: 1, start: 200, theta: 10000 });
  const hs = { heads: 4, width: 64, start: 8, len: 16 };
  b.headScatterAdd(x, b.headSlice(x, hs), hs);
  b.headConcat(up([64, 96]), up([64, 8]), 4, 1);
  // Producers quantising for the next Linear's backward (MLA's gradients).
  const gq = { dgrad: { group: "tile" }, wgrad: { group: "column-tile" } } as const;
  b.ropeQuantized(
    x,
    { heads: 4, width: 64, offset: 32, dim: 32, seqLen: 16, theta: 10000, inverse: true },
    gq,
  );
  b.headConcatQuantized(up([64, 96]), up([64, 8]), 4, 1, undefined, gq);
  // Layouts whose groups of four columns straddle a pair, a head or the a|b boundary: one column a thread.
  b.rope(x, { heads: 4, width: 64, offset: 30, dim: 18, seqLen: 16, theta: 10000 });
  b.headSlice(x, { heads: 4, width: 64, start: 6, len: 10 });
  b.headConcat(up([64, 40]), up([64, 6]), 4, 1);
  // x as a packed gate|up [rows, 2 x 128], in f32 and as BF16 codes.
  for (const gu of [x, b.cast(x, "bf16")]) {
    const h = b.swiglu(gu);
    b.swigluQuantized(gu, { group: "tile" });
    b.swigluBackward(h, gu);
    b.swigluBackward(b.cast(h, "bf16"), gu);
    const q = { dgrad: { group: "tile" }, wgrad: { group: "column-tile" } } as const;
    b.swigluBackwardQuantized(h, gu, q);
    if (gu.dtype === "bf16") b.swigluBackwardQuantized(b.cast(h, "bf16"), gu, q);
  }
  const ids = b.upload(ints(64, 100), [64], "i32");
  b.embeddingBackward(up([100, 48]), b.embedding(up([100, 48]), ids), ids);
  for (const precision of ["f32", "bf16"] as const)
    for (const [dqk, dv] of [
      ...Object.keys(KERNELS.flash)
        .filter((n) => n.startsWith("flash_fwd_"))
        .map((n) => n.slice("flash_fwd_".length).split("_").map(Number)),
      [24, 16],
    ]) {
      const o = { batch: 2, seq: 16, heads: 3, scale: 0.125, precision };
      const [qq, k, v] = [up([32, 3 * dqk]), up([32, 3 * dqk]), up([32, 3 * dv])];
      const a = b.attention(qq, k, v, o);
      b.attentionBackward(up([32, 3 * dv]), qq, k, v, a.o, a.lse, o);
      // A KV-cache decode step: one query per batch against 16 keys.
      b.attention(up([2, 3 * dqk]), k, v, { ...o, seq: 1, kvSeq: 16 });
    }
  b.addUniformNoise(up([64, 16]), { seed: 7, rowOffset: 64, scale: 2 });
  const r = b.router(up([64, 16]), up([16]), 2, 2.5);
  b.routerBackward(up([64, 2]), r.scores, r.topIdx, 2.5, up([64, 16]));
  b.balanceLoss(r.scores, r.topIdx, { batch: 2, seq: 32, alpha: 0.001 });
  const p = b.moePermute(x, r.topIdx, 16);
  // FP8 rows (tiles, rows): codes and scales gathered as words.
  for (const group of ["tile", "row"] as const) b.moePermute(b.quantize(x, { group }), r.topIdx, 16);
  b.moePermuteBackward(up([128, 256]), p.slot, 64);
  const ys = up([128, 256]);
  b.moeCombine(ys, p.slot, r.weights);
  for (const yv of [ys, b.cast(ys, "bf16")]) {
    b.moeCombineBackward(y, yv, p.slot, r.weights);
    b.moeCombineBackwardQuantized(y, yv, p.slot, r.weights, {
      dgrad: { group: "tile" },
      wgrad: { group: "column-tile", segments: p.offsets },
    });
    b.moeCombine(yv, p.slot, r.weights);
    b.moePermuteBackward(yv, p.slot, 64);
  }
  for (const rule of ["sign", "error", "clipped"] as const)
    b.biasUpdate(up([16]), p.offsets, { gamma: 0.001, rule });
  b.crossEntropy(x, b.upload(ints(64, 256), [64], "i32"), 0.5);
  const clip = b.clipScale([x, y], 1.0);
  const ao = {
    lr: 1e-3,
    beta1: 0.9,
    beta2: 0.95,
    eps: 1e-8,
    weightDecay: 0.1,
    step: 3,
    gradScale: clip.scale,
  };
  const adamw = b.prepareAdamW([
    { p: x, g: y, m: up([64, 256]), v: b.cast(up([64, 256]), "bf16"), decay: true },
    { p: up([3]), g: up([3]), m: b.zeros([3], "bf16"), v: b.zeros([3]), decay: false },
    { p: up([0]), g: up([0]), m: b.zeros([0]), v: b.zeros([0]), decay: true },
  ]);
  adamw.update(ao);
  adamw.dispose();
  b.prepareAdamW([]).update(ao);
  b.prepareClipScale([]).clipScale(1.0);
}

describe("cuda backend host code, without a GPU", () => {
  // name, environment, cuBLASLt's answer, compute capability, misaligned buffers among the others.
  const configs: [string, Record<string, string>, "ok" | "refuse", string, boolean][] = [
    ["cuBLASLt", {}, "ok", "8.9", true],
    ["cuBLASLt refusing", {}, "refuse", "8.9", true],
    ["no cuBLASLt, no tensor cores", { MOE8_CUBLASLT: "0", MOE8_TENSOR_CORES: "0" }, "ok", "8.9", true],
    ["Hopper: the sm90 GEMMs", {}, "ok", "9.0", false],
    ["Hopper, misaligned buffers: the sm90 fallbacks", {}, "ok", "9.0", true],
    ["Hopper, MOE8_SM90_GEMM=0", { MOE8_SM90_GEMM: "0" }, "ok", "9.0", true],
    ["Hopper, MOE8_SM90_ATTENTION=0", { MOE8_SM90_ATTENTION: "0" }, "ok", "9.0", false],
    ["Hopper, MOE8_SM90_DENSE=all", { MOE8_SM90_DENSE: "all" }, "ok", "9.0", false],
    ["Hopper, MOE8_SM90_DENSE=none", { MOE8_SM90_DENSE: "none" }, "ok", "9.0", false],
    ["Hopper, MOE8_SM90_KMAJOR=0", { MOE8_SM90_KMAJOR: "0" }, "ok", "9.0", false],
    ["Hopper, MOE8_SM90_BN=256", { MOE8_SM90_BN: "256" }, "ok", "9.0", false],
    ["Hopper, MOE8_SM90_RING=4", { MOE8_SM90_RING: "4" }, "ok", "9.0", false],
    [
      "Hopper, MOE8_SM90_WGRAD_STAGED=0 on 3 CTAs",
      { MOE8_SM90_WGRAD_STAGED: "0", MOE8_SM90_CTAS: "3" },
      "ok",
      "9.0",
      false,
    ],
    ["Hopper, MOE8_SM90_WGRAD_STAGED=checked", { MOE8_SM90_WGRAD_STAGED: "checked" }, "ok", "9.0", false],
    ["Hopper, MOE8_SM90_WGRAD_STAGED=halves", { MOE8_SM90_WGRAD_STAGED: "halves" }, "ok", "9.0", false],
    ["Hopper, MOE8_SM90_WGRAD_STAGED=turns", { MOE8_SM90_WGRAD_STAGED: "turns" }, "ok", "9.0", false],
    ["Hopper, MOE8_SM90_WGRAD_ORDER=experts", { MOE8_SM90_WGRAD_ORDER: "experts" }, "ok", "9.0", false],
    ["Hopper, MOE8_SM90_FPROP=plain", { MOE8_SM90_FPROP: "plain" }, "ok", "9.0", false],
    ["Hopper, MOE8_SM90_WGRAD_STAGED=1", { MOE8_SM90_WGRAD_STAGED: "1" }, "ok", "9.0", false],
    [
      "Hopper, MOE8_SM90_BN=256 MOE8_SM90_PINGPONG=0 MOE8_SM90_WGRAD_STAGED=0",
      { MOE8_SM90_BN: "256", MOE8_SM90_PINGPONG: "0", MOE8_SM90_WGRAD_STAGED: "0" },
      "ok",
      "9.0",
      false,
    ],
    [
      "Hopper, 128-wide sm90 tiles on 3 CTAs",
      { MOE8_SM90_BN: "128", MOE8_SM90_WGRAD_BN: "128", MOE8_SM90_CTAS: "3" },
      "ok",
      "9.0",
      false,
    ],
  ];
  /** sm90 GEMM launches per configuration: the dense FP8 GEMMs add to the experts' under `all`. */
  const sm90Launches = new Map<string, number>();
  for (const [name, env, mode, capability, misaligned] of configs)
    it(`launches valid kernels for every op (${name})`, async () => {
      for (const [k, v] of Object.entries(env)) vi.stubEnv(k, v);
      config.lt = mode;
      config.computeCapability = capability;
      launchedNow.clear();
      config.misalign = misaligned;
      const first = log.length;
      await everyOp(new CudaBackend() as Backend);
      vi.unstubAllEnvs();
      expect(problems).toEqual([]);
      const sm90Log = log
        .slice(first)
        .filter((l) => l.kernel.startsWith("gemm_sm90.") && !l.kernel.includes("transpose"));
      sm90Launches.set(name, sm90Log.length);
      // The persistent kernels' grid: one CTA per SM (the fake reports 132), or MOE8_SM90_CTAS.
      for (const l of sm90Log) expect(l.gx).toBe(env.MOE8_SM90_CTAS ? 3 : 132);
      // Every sm90 kernel (Fprop/Dgrad and Wgrad entries) on a Hopper GPU with aligned buffers, and
      // Wgrad's transpose only where the quantisers do not write the K-major layout; none where
      // turned off or on other GPUs.
      const sm90 = [...launchedNow].filter((k) => k.startsWith("gemm_sm90."));
      const transposed = launchedNow.has("gemm_sm90.sm90_coltile_transpose");
      if (capability !== "9.0" || env.MOE8_SM90_GEMM) expect(sm90).toEqual([]);
      else if (!misaligned) {
        // Fprop/Dgrad: 128 x 128 (up to 128 groups BF16 stores on the 6-stage ring, the rest on the
        // 5-stage one, unless MOE8_SM90_RING=4; 130 groups on the 4-stage one) unless
        // MOE8_SM90_BN=256; Wgrad: by N (128 and 256 in everyOp) unless MOE8_SM90_WGRAD_BN forces one,
        // the 256-wide entries (Fprop/Dgrad under MOE8_SM90_BN=256, the Wgrad under
        // MOE8_SM90_WGRAD_STAGED=0) taking turns unless MOE8_SM90_PINGPONG=0; the 256-wide Wgrad
        // with staged scales unless MOE8_SM90_WGRAD_STAGED says otherwise.
        const wide = env.MOE8_SM90_PINGPONG === "0" ? "256" : "256_pingpong";
        const staged = env.MOE8_SM90_WGRAD_STAGED;
        const wideWgrad =
          {
            "0": wide,
            checked: "256_staged_checked",
            halves: "256_halves",
            turns: "256_turns",
            "1": "256_staged",
          }[staged ?? ""] ?? "256_lean";
        const wgrad = (env.MOE8_SM90_WGRAD_BN ? [env.MOE8_SM90_WGRAD_BN] : ["128", "256"]).map(
          (w) => `128x${w === "256" ? wideWgrad : w}`,
        );
        const fpropDgrad =
          env.MOE8_SM90_BN === "256"
            ? [`128x${wide}`]
            : env.MOE8_SM90_RING === "4"
              ? ["128x128"]
              : [
                  `128x128_bf16${fpropSuffix(env.MOE8_SM90_FPROP)}`,
                  `128x128_e128${fpropSuffix(env.MOE8_SM90_FPROP)}`,
                  "128x128",
                ];
        // (FP8 outputs take their own entry whatever the tile settings.)
        const want = [
          ...[...fpropDgrad, "128x128_fp8out"].map((t) => `gemm_sm90.gemm_sm90_fp8_grouped_${t}`),
          ...wgrad.map((w) => `gemm_sm90.gemm_sm90_fp8_wgrad_${w}`),
          ...(env.MOE8_SM90_KMAJOR ? ["gemm_sm90.sm90_coltile_transpose"] : []),
        ];
        expect(sm90.sort()).toEqual(want.sort());
        expect(transposed).toBe(!!env.MOE8_SM90_KMAJOR);
      }
      // Column tiles read in row-major form (read, copy, the tiled GEMMs) only where stored K-major.
      expect(launchedNow.has("quant.coltile_kmajor_rows")).toBe(
        capability === "9.0" && !env.MOE8_SM90_GEMM && !env.MOE8_SM90_KMAJOR,
      );
      // The Hopper attention kernels (forward, dq, dk/dv for each head shape of flash_sm90.cu).
      const fa3 = [...launchedNow].filter((k) => k.startsWith("flash_sm90."));
      const fa3Entries = Object.keys(KERNELS.flash_sm90).length;
      if (capability !== "9.0" || env.MOE8_SM90_ATTENTION) expect(fa3).toEqual([]);
      else if (!misaligned) expect(fa3.length).toBe(fa3Entries);
    });

  it("MOE8_SM90_DENSE moves the dense FP8 GEMMs onto the sm90 kernels (all >= auto > none)", () => {
    const [all, auto, none] = [
      "Hopper, MOE8_SM90_DENSE=all",
      "Hopper: the sm90 GEMMs",
      "Hopper, MOE8_SM90_DENSE=none",
    ].map((k) => sm90Launches.get(k)!);
    expect(none).toBeGreaterThan(0); // the experts' GEMMs
    expect(auto).toBeGreaterThan(none);
    expect(all).toBeGreaterThanOrEqual(auto); // auto takes every role today (gemm-sm90.ts)
    vi.stubEnv("MOE8_SM90_DENSE", "some");
    expect(() => new CudaBackend()).toThrow(/MOE8_SM90_DENSE="some": expected auto, all or none/);
    vi.unstubAllEnvs();
    for (const [name, value, why] of [
      ["MOE8_SM90_BN", "64", "expected 128 or 256"],
      ["MOE8_SM90_WGRAD_BN", "wide", "expected 128 or 256"],
      ["MOE8_SM90_CTAS", "0", "expected a positive integer"],
      ["MOE8_SM90_RING", "6", "expected deep or 4"],
      ["MOE8_SM90_PINGPONG", "yes", "expected 0 or 1"],
      ["MOE8_SM90_FPROP", "fast", "expected early or plain"],
      ["MOE8_SM90_WGRAD_STAGED", "on", "expected 0, 1, checked, halves, turns or lean"],
      ["MOE8_SM90_WGRAD_ORDER", "random", "expected sorted or experts"],
    ]) {
      vi.stubEnv(name, value);
      expect(() => new CudaBackend()).toThrow(`${name}="${value}": ${why}`);
      vi.unstubAllEnvs();
    }
  });

  it("column tiles stored K-major on Hopper: the kernels that write them say so, writing into them is refused", () => {
    config.computeCapability = "9.0";
    config.misalign = false;
    const b = new CudaBackend() as Backend;
    const x = b.upload(seq(300 * 64), [300, 64]);
    const first = log.length;
    const c = b.quantize(x, { group: "column-tile" });
    const [quant] = log.slice(first).filter((l) => l.kernel === "quant.quant_coltile");
    // kpitch, quant_coltile's last parameter: three 128-token chunks.
    expect(quant.args.getBigInt64(10 * 8, true)).toBe(384n);
    expect(() => b.write(c, new Uint8Array(300 * 64))).toThrow(/stored K-major/);
    // e5m2 (the sm90 Wgrad takes E4M3 only) and a width the 16-byte chunks cannot hold stay row-major.
    b.write(b.quantize(x, { group: "column-tile", format: "e5m2" }), new Uint8Array(300 * 64));
    b.write(
      b.quantize(b.upload(seq(300 * 24), [300, 24]), { group: "column-tile" }),
      new Uint8Array(300 * 24),
    );
    config.computeCapability = "8.9";
  });

  it("the experts' Wgrad into a gradient that holds zeros (accumulateZero) writes on Hopper, adds otherwise", () => {
    config.computeCapability = "9.0";
    config.misalign = false;
    const b = new CudaBackend() as Backend;
    const offs = b.upload(Int32Array.from([0, 10, 10, 64]), [4], "i32");
    const cs = (cols: number) =>
      b.quantize(b.upload(seq(64 * cols), [64, cols]), { group: "column-tile", segments: offs });
    const [dy, x] = [cs(32), cs(256)];
    const grad = b.zeros([3, 32, 256]);
    /** The Wgrad launch a call makes (tA, tB, tC at 0, 128, 256; then 8-byte slots). */
    const wgradArgs = (accumulateZero: boolean) => {
      const first = log.length;
      const o = { precision: "fp8", segment: "k", transA: true, accumulate: grad, accumulateZero } as const;
      expect(b.groupedMatmul(dy, x, offs, o)).toBe(grad);
      const [wgrad] = log
        .slice(first)
        .filter((l) => l.kernel.startsWith("gemm_sm90.gemm_sm90_fp8_wgrad_128x256"));
      return wgrad.args;
    };
    expect(wgradArgs(true).getInt32(440, true)).toBe(0);
    expect(wgradArgs(false).getInt32(440, true)).toBe(1);
    config.computeCapability = "8.9";
  });

  it("the experts' Wgrad takes its tiles largest expert first unless MOE8_SM90_WGRAD_ORDER=experts", () => {
    config.computeCapability = "9.0";
    config.misalign = false;
    for (const [order, sorted] of [
      [undefined, 1],
      ["sorted", 1],
      ["experts", 0],
    ] as const) {
      if (order) vi.stubEnv("MOE8_SM90_WGRAD_ORDER", order);
      const b = new CudaBackend() as Backend;
      vi.unstubAllEnvs();
      const offs = b.upload(Int32Array.from([0, 10, 10, 64]), [4], "i32");
      const cs = (cols: number) =>
        b.quantize(b.upload(seq(64 * cols), [64, cols]), { group: "column-tile", segments: offs });
      const first = log.length;
      b.groupedMatmul(cs(32), cs(256), offs, { precision: "fp8", segment: "k", transA: true });
      const [wgrad] = log
        .slice(first)
        .filter((l) => l.kernel.startsWith("gemm_sm90.gemm_sm90_fp8_wgrad_128x256"));
      // (accumulate at 440, outMode at 448, sorted at 456)
      expect(wgrad.args.getInt32(456, true), `MOE8_SM90_WGRAD_ORDER=${order}`).toBe(sorted);
    }
    config.computeCapability = "8.9";
  });

  it("a dense Wgrad on cuBLASLt into a gradient that holds zeros writes it (beta 0), adds otherwise", () => {
    config.misalign = false;
    const b = new CudaBackend() as Backend;
    const [dy, x] = [b.upload(seq(64 * 32), [64, 32]), b.upload(seq(64 * 48), [64, 48])];
    const grad = b.zeros([32, 48]);
    for (const precision of ["f32", "bf16"] as const)
      for (const accumulateZero of [true, false]) {
        fake.ltCalls.length = 0;
        expect(b.matmul(dy, x, { transA: true, precision, accumulate: grad, accumulateZero })).toBe(grad);
        expect(fake.ltCalls, `${precision}, accumulateZero ${accumulateZero}`).toEqual([
          { cType: "f32", accumulate: !accumulateZero },
        ]);
      }
  });

  // The device tables of the multi-tensor ops, read back from the fake's uploads and walked as the
  // kernels walk them (optim.cu's table_row: each block takes the last row whose first block is at
  // or before it): every element of every tensor is visited once, with its tensor's flags.
  it("AdamW and the gradient norm: one launch each over all tensors, every element once", () => {
    config.misalign = false;
    const b = new CudaBackend() as Backend;
    const { ADAMW_ROW, ADAMW_CHUNK, ADAMW_M_BF16, ADAMW_V_BF16, ADAMW_DECAY, SUMSQ_ROW } = DEFINES.optim;
    const sizes = [5, 0, ADAMW_CHUNK, ADAMW_CHUNK + 1, 3 * ADAMW_CHUNK - 7, 1, 600_000, 2048 * 256 + 3];
    const slots = sizes.map((n, i) => ({
      p: b.zeros([n]),
      g: b.zeros([n]),
      m: b.zeros([n], i % 2 ? "bf16" : "f32"),
      v: b.zeros([n], i % 3 ? "bf16" : "f32"),
      decay: i % 4 !== 1,
    }));
    const ptr = (t: Tensor) => (t.storage as { ptr: number }).ptr;
    /** Each table row's [start, end) spans, from walking every block of the launch. */
    const walk = (
      l: (typeof log)[number],
      width: number,
      first: number,
      chunk: (row: number[]) => number,
    ) => {
      const tab = uploads.get(Number(l.args.getBigUint64(0, true)))!;
      const T = l.args.getInt32(8, true);
      const rows = Array.from({ length: T }, (_, r) =>
        Array.from({ length: width }, (_, j) => Number(tab.getBigInt64((r * width + j) * 8, true))),
      );
      const spans: [number, number][][] = rows.map(() => []);
      for (let block = 0; block < l.gx; block++) {
        let [lo, hi] = [0, T - 1];
        while (lo < hi) {
          const mid = (lo + hi + 1) >> 1;
          if (rows[mid][first] <= block) lo = mid;
          else hi = mid - 1;
        }
        const r = rows[lo];
        const start = (block - r[first]) * chunk(r);
        spans[lo].push([start, Math.min(start + chunk(r), r[width === ADAMW_ROW ? 4 : 1])]);
      }
      return { rows, spans };
    };
    const once = (spans: [number, number][], n: number) => {
      let at = 0;
      for (const [s, e] of spans) {
        expect(s).toBe(at);
        expect(e).toBeGreaterThan(s);
        at = e;
      }
      expect(at).toBe(n);
    };

    const adamw = b.prepareAdamW(slots);
    log.length = 0;
    adamw.update({
      lr: 1e-3,
      beta1: 0.9,
      beta2: 0.95,
      eps: 1e-8,
      weightDecay: 0.1,
      step: 1,
      gradScale: b.zeros([1]),
    });
    expect(log.map((l) => l.kernel)).toEqual(["optim.adamw_multi"]);
    const a = walk(log[0], ADAMW_ROW, 5, () => ADAMW_CHUNK);
    const live = slots.filter((s) => s.p.size > 0);
    expect(a.rows.length).toBe(live.length);
    live.forEach((s, i) => {
      const flags =
        (s.m.dtype === "bf16" ? ADAMW_M_BF16 : 0) |
        (s.v.dtype === "bf16" ? ADAMW_V_BF16 : 0) |
        (s.decay ? ADAMW_DECAY : 0);
      expect(a.rows[i].slice(0, 5)).toEqual([ptr(s.p), ptr(s.g), ptr(s.m), ptr(s.v), s.p.size]);
      expect(a.rows[i][6]).toBe(flags);
      once(a.spans[i], s.p.size);
    });
    adamw.dispose();
    expect(() => adamw.update({} as never)).toThrow(/after dispose/);

    const grads = slots.map((s) => s.g);
    const clip = b.prepareClipScale(grads);
    log.length = 0;
    clip.clipScale(1);
    expect(log.map((l) => l.kernel)).toEqual(["optim.sumsq_multi", "optim.clip_final"]);
    const c = walk(log[0], SUMSQ_ROW, 2, (r) => r[3]);
    grads.forEach((g, i) => {
      expect(c.rows[i].slice(0, 2)).toEqual([ptr(g), g.size]);
      if (g.size > 0) once(c.spans[i], g.size);
      else expect(c.spans[i]).toEqual([[0, 0]]); // one partial of 0, as the per-tensor launches had
    });
    expect(log[1].args.getInt32(8, true), "clip_final's partials").toBe(log[0].gx);
    clip.dispose();
    expect(problems).toEqual([]);
  });

  it("launches every kernel of the table from some op", () => {
    expect([...table.keys()].filter((k) => !launched.has(k))).toEqual([]);
  });
});
