// Runs on the cpu backend are bit-for-bit repeatable (docs/runtime.md rule 7): the same call twice gives
// identical bits, for the ops whose parallel reductions could otherwise depend on thread timing.
import type { Backend, Tensor } from "@moe8/tensor";
import { adamwSteps, attentionForwardBackward, Rng } from "@moe8/tensor/testing";
import { describe, expect, it } from "vitest";
import { CpuBackend } from "../src/cpu-backend.ts";
import { createBackend, requireNative } from "../src/index.ts";

const be: Backend = new CpuBackend();

async function bits(f: () => Tensor[]): Promise<Uint32Array[]> {
  return be.scope(async () => {
    const out: Uint32Array[] = [];
    for (const t of f()) {
      const a = await t.read();
      out.push(new Uint32Array(a.buffer.slice(a.byteOffset, a.byteOffset + a.byteLength)));
    }
    return out;
  });
}

async function twice(f: () => Tensor[]) {
  const a = await bits(f);
  const b = await bits(f);
  expect(a.length).toBe(b.length);
  for (let i = 0; i < a.length; i++)
    expect(Buffer.compare(Buffer.from(a[i].buffer), Buffer.from(b[i].buffer))).toBe(0);
}

describe("cpu backend determinism", () => {
  const rng = new Rng(7);

  it("attention forward and backward (f32 and bf16) are bit-identical across runs", async () => {
    const run = attentionForwardBackward(rng, 4, 200, 4, 48, 32);
    for (const precision of ["f32", "bf16"] as const) await twice(() => Object.values(run(precision)(be)));
  });

  it("gemm (f32, bf16, fp8) is bit-identical across runs", async () => {
    const [M, N, K] = [300, 200, 260];
    const a = rng.normals(M * K);
    const b = rng.normals(N * K);
    await twice(() => {
      const A = be.upload(a, [M, K]);
      const Bm = be.upload(b, [N, K]);
      return [
        be.matmul(A, Bm, { transB: true, precision: "f32" }),
        be.matmul(A, Bm, { transB: true, precision: "bf16", outBf16: true }),
        be.matmul(be.quantize(A, { group: "tile" }), be.quantize(Bm, { group: "block" }), {
          transB: true,
          precision: "fp8",
        }),
      ];
    });
  });

  it("adamw, clipScale, rmsnorm backward, embedding backward and sums are bit-identical across runs", async () => {
    const n = 200_000;
    const p = rng.normals(n);
    const g = rng.normals(n);
    const x = rng.normals(2048 * 128);
    const ids = rng.ints(2048, 256);
    const w0 = rng.normals(128);
    await twice(() => {
      const G = be.upload(g, [n]);
      const clip = be.clipScale([G, be.upload(x, [2048, 128])], 1);
      const out: Tensor[] = [clip.norm, clip.scale, be.sum(G)];
      const runs = adamwSteps(be, {
        param: () => be.upload(p, [n]),
        grad: G,
        gradScale: clip.scale,
        lr: 1e-3,
        steps: 3,
      });
      for (const r of [runs.f32, runs.bf16]) out.push(r.p, r.m, r.v);
      const X = be.upload(x, [2048, 128]);
      const w = be.upload(w0, [128]);
      const { rstd } = be.rmsnorm(X, w, 1e-6);
      const bw = be.rmsnormBackward(X, X, w, rstd);
      const dE = be.zeros([256, 128]);
      be.embeddingBackward(dE, X, be.upload(ids, [2048], "i32"));
      out.push(bw.dx, bw.dw, dE);
      return out;
    });
  });

  it("createBackend('cpu') and 'auto' give the native backend", () => {
    expect(createBackend("cpu").name).toBe("cpu");
    expect(createBackend("auto").name).toBe("cpu");
    expect(createBackend("ts").name).toBe("ts");
    expect(() => createBackend("cuda")).toThrow(expect.objectContaining({ name: "UsageError" }));
  });
});

/**
 * The digests of test/simd-fingerprint.ts computed in a child process under `MOE8_SIMD=level`
 * (empty: the widest level) and `env`.
 */
async function childFingerprint(
  level: string,
  env: Record<string, string> = {},
): Promise<{ simd: string; threads: number; digest: string; gemm: string }> {
  const { execFileSync } = await import("node:child_process");
  const { fileURLToPath } = await import("node:url");
  const script = fileURLToPath(new URL("./simd-fingerprint.ts", import.meta.url));
  const out = execFileSync(process.execPath, ["--import", "tsx", script], {
    env: { ...process.env, MOE8_SIMD: level, ...env },
    encoding: "utf8",
  });
  return JSON.parse(out.trim().split("\n").at(-1)!);
}

describe("cpu backend thread counts", () => {
  // Attention splits its work by (batch, head, query block), the GEMMs by tiles of C, the
  // reductions by fixed blocks: none of it depends on how many threads take the pieces.
  it("one thread and three compute the bits of the default pool, attention and GEMMs included", async () => {
    const { fingerprint, gemmFingerprint } = await import("./simd-fingerprint.ts");
    const [digest, gemm] = [await fingerprint(), await gemmFingerprint()];
    for (const threads of ["1", "3"]) {
      const child = await childFingerprint("", { RAYON_NUM_THREADS: threads });
      expect(child.threads).toBe(Number(threads));
      expect(child.digest).toBe(digest);
      expect(child.gemm).toBe(gemm);
    }
  });
});

describe("cpu backend SIMD levels", () => {
  it("the baseline (MOE8_SIMD=scalar) kernels compute the same bits as the dispatched SIMD ones", async () => {
    const { fingerprint } = await import("./simd-fingerprint.ts");
    const child = await childFingerprint("scalar");
    expect(child.simd).toBe("scalar");
    expect(child.digest).toBe(await fingerprint());
  });

  // The packed BF16/FP8 GEMM of AVX2 machines (kernel256.rs) against AVX-512's (kernel512.rs):
  // the same sums in the same order, so a laptop reproduces this machine's losses bit for bit.
  it.runIf(requireNative().info().simd === "avx512f")(
    "the AVX2 kernels (MOE8_SIMD=avx2) compute the same bits as the AVX-512 ones, GEMMs included",
    async () => {
      const { fingerprint, gemmFingerprint } = await import("./simd-fingerprint.ts");
      const child = await childFingerprint("avx2");
      expect(child.simd).toBe("avx2+fma");
      expect(child.digest).toBe(await fingerprint());
      expect(child.gemm).toBe(await gemmFingerprint());
    },
  );
});
