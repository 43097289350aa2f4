// The kernel signature table (src/cuda/kernels.generated.ts) is what the .cu declarations say, the
// generator reads what NVRTC compiles (macros, typedefs) and refuses what it cannot type, and the
// launch encoder writes exactly the slots the table declares. scripts/nvrtc-check.py (nvrtc.test.ts)
// checks the same table against the compiled PTX.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { GENERATED_PATH, parseKernelSources, renderTable } from "../scripts/kernel-signatures.ts";
import { KERNELS } from "../src/cuda/kernels.generated.ts";
import { ArgEncoder, type KernelSignature } from "../src/cuda-backend/launch.ts";

const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** A kernel directory with a minimal common.cuh and the given modules. */
function sources(files: Record<string, string>): string {
  const dir = mkdtempSync(join(tmpdir(), "moe8-kernels-"));
  dirs.push(dir);
  writeFileSync(
    join(dir, "common.cuh"),
    'typedef unsigned int u32;\ntypedef long long i64;\n#define KERNEL extern "C" __global__\n#define G_ONE 1\n',
  );
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text);
  return dir;
}

describe("kernel signature table", () => {
  it("is up to date with the .cu declarations (else: bun packages/kernels/scripts/kernel-signatures.ts)", () => {
    const fresh = renderTable(parseKernelSources());
    expect(
      readFileSync(GENERATED_PATH, "utf8") === fresh,
      "kernels.generated.ts is stale: regenerate it",
    ).toBe(true);
  });

  it("lists every module's kernels with typed parameters and the shared constants", () => {
    expect(Object.keys(KERNELS)).toEqual(
      expect.arrayContaining([
        "attention",
        "elementwise",
        "flash",
        "gemm",
        "gemm16",
        "gemm_sm90",
        "moe",
        "nn",
        "optim",
        "quant",
      ]),
    );
    expect(KERNELS.elementwise.add_into_f32.params).toEqual([
      ["dst", "u64"],
      ["src", "u64"],
      ["alpha", "f64"],
      ["n", "u64"],
    ]);
    // Instantiated by macros with ## pasting: FLASH_SHAPE in flash.cu, GEMM_FP8_LAYOUT in gemm.cu.
    expect(KERNELS.flash.flash_fwd_64_64.params.map(([n]) => n)).toEqual([
      "q",
      "k",
      "v",
      "o",
      "lse",
      "T",
      "H",
      "scale",
    ]);
    expect(KERNELS.flash.flash_fwd_64_64.maxThreads).toBe(128);
    expect(KERNELS.gemm.gemm_fp8_tt_e5m2_e4m3.params).toHaveLength(17);
    // The Hopper GEMM's tensor maps are by-value 128-byte parameters.
    expect(KERNELS.gemm_sm90.gemm_sm90_fp8_grouped_128x256.params.slice(0, 4)).toEqual([
      ["tA", "tmap"],
      ["tB", "tmap"],
      ["tC", "tmap"],
      ["As", "u64"],
    ]);
    expect(KERNELS.gemm_sm90.gemm_sm90_fp8_grouped_128x256.maxThreads).toBe(384);
  });

  it("expands kernel macros, follows typedefs and reads __launch_bounds__ (after __cluster_dims__)", () => {
    const dir = sources({
      "m.cu": `#define THREADS 64
// A comment with KERNEL void fake(int x) in it.
KERNEL void __launch_bounds__(THREADS) plain(const float* __restrict__ x, u32 n, i64 big, int k, float f, double d) {}
#define PAIR(A, B) \\
  KERNEL void pair_##A##_##B(const u16* p, int v) { body<A, B>(p, v); } \\
  KERNEL void __launch_bounds__(256, 2) other_##A(unsigned u) {}
PAIR(1, 2)
PAIR(3, 4)
KERNEL void __cluster_dims__(2, 1, 1) __launch_bounds__(THREADS, 1) clustered(int x) {}
`,
    });
    const parsed = parseKernelSources(dir);
    expect(parsed.modules.get("m")).toEqual([
      {
        name: "plain",
        maxThreads: 64,
        params: [
          ["x", "u64"],
          ["n", "u32"],
          ["big", "u64"],
          ["k", "i32"],
          ["f", "f32"],
          ["d", "f64"],
        ],
      },
      {
        name: "pair_1_2",
        maxThreads: null,
        params: [
          ["p", "u64"],
          ["v", "i32"],
        ],
      },
      { name: "other_1", maxThreads: 256, params: [["u", "u32"]] },
      {
        name: "pair_3_4",
        maxThreads: null,
        params: [
          ["p", "u64"],
          ["v", "i32"],
        ],
      },
      { name: "other_3", maxThreads: 256, params: [["u", "u32"]] },
      { name: "clustered", maxThreads: 64, params: [["x", "i32"]] },
    ]);
    expect(parsed.defines.get("common")).toEqual([["G_ONE", 1]]);
    expect(parsed.defines.get("m")).toEqual([["THREADS", 64]]);
  });

  it("follows a macro that declares its kernels through another kernel macro", () => {
    const dir = sources({
      "w.cu": `#define ENTRY(NAME, N) \\
  KERNEL void __launch_bounds__(128, 1) NAME(const float* x, int n) { body<N>(x, n); }
#define ENTRY_DEFAULT(NAME) ENTRY(NAME, 4)
ENTRY(direct, 2)
ENTRY_DEFAULT(wrapped)
`,
    });
    expect(
      parseKernelSources(dir)
        .modules.get("w")
        ?.map((k) => [k.name, k.maxThreads]),
    ).toEqual([
      ["direct", 128],
      ["wrapped", 128],
    ]);
  });

  it("refuses a parameter type with no argument kind, an unreadable declaration and a duplicate", () => {
    expect(() => parseKernelSources(sources({ "a.cu": "KERNEL void k(short s) {}\n" }))).toThrow(
      /a\.cu: k: parameter "short s" has type short/,
    );
    expect(() => parseKernelSources(sources({ "b.cu": "KERNEL void k(float (*f)(int)) {}\n" }))).toThrow(
      /b\.cu: cannot read the kernel declaration/,
    );
    expect(() => parseKernelSources(sources({ "c.cu": "KERNEL void k(int) {}\n" }))).toThrow(
      /type and name needed/,
    );
    expect(() =>
      parseKernelSources(sources({ "d.cu": "KERNEL void k(int a) {}\nKERNEL void k(int b) {}\n" })),
    ).toThrow(/declared twice/);
  });

  it("types a const __grid_constant__ CUtensorMap as a tensor map and refuses one passed otherwise", () => {
    const map = "struct CUtensorMap { unsigned long long w[16]; };\n";
    const ok = parseKernelSources(
      sources({ "t.cu": `${map}KERNEL void k(const __grid_constant__ CUtensorMap m, int n) {}\n` }),
    );
    expect(ok.modules.get("t")?.[0].params).toEqual([
      ["m", "tmap"],
      ["n", "i32"],
    ]);
    expect(() =>
      parseKernelSources(sources({ "u.cu": `${map}KERNEL void k(const CUtensorMap m) {}\n` })),
    ).toThrow(/must be a const __grid_constant__ parameter/);
  });
});

describe("launch argument encoding", () => {
  const sig = {
    module: "m",
    name: "k",
    maxThreads: null,
    params: [
      ["p", "u64"],
      ["i", "i32"],
      ["u", "u32"],
      ["f", "f32"],
      ["d", "f64"],
    ],
  } as const satisfies KernelSignature;

  it("writes one zero-padded little-endian 8-byte slot per parameter, in declaration order", () => {
    const { bytes, offsets } = new ArgEncoder().encode(sig, {
      d: 0.1,
      f: 1.5,
      u: 4000000000,
      i: -2,
      p: 2 ** 40 + 3,
    });
    expect(offsets).toBeNull();
    const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    expect(bytes.byteLength).toBe(40);
    expect(v.getBigUint64(0, true)).toBe(2n ** 40n + 3n);
    expect([v.getInt32(8, true), v.getUint32(12, true)]).toEqual([-2, 0]);
    expect([v.getUint32(16, true), v.getUint32(20, true)]).toEqual([4000000000, 0]);
    expect([v.getFloat32(24, true), v.getUint32(28, true)]).toEqual([1.5, 0]);
    expect(v.getFloat64(32, true)).toBe(0.1);
  });

  it("rejects a value its kind cannot hold, and missing or unknown names", () => {
    const e = new ArgEncoder();
    const ok = { p: 0, i: 0, u: 0, f: 0, d: 0 };
    expect(() => e.encode(sig, { ...ok, i: 2.5 })).toThrow(/m\.k: argument i = 2\.5 is not an i32/);
    expect(() => e.encode(sig, { ...ok, i: 2 ** 31 })).toThrow(/argument i/);
    expect(() => e.encode(sig, { ...ok, u: -1 })).toThrow(/argument u = -1 is not a u32/);
    expect(() => e.encode(sig, { ...ok, p: -8 })).toThrow(/argument p/);
    expect(() => e.encode(sig, { ...ok, p: 2 ** 53 })).toThrow(/below 2\^53/);
    const { d: _, ...missing } = ok;
    expect(() => e.encode(sig, missing as typeof ok)).toThrow(/m\.k: missing d/);
    expect(() => e.encode(sig, { ...ok, extra: 1 } as typeof ok)).toThrow(/m\.k: no parameter extra/);
  });

  it("places a tensor map's 128 bytes at a 64-byte boundary and says where each parameter starts", () => {
    const tsig = {
      module: "m",
      name: "t",
      maxThreads: null,
      params: [
        ["n", "i32"],
        ["map", "tmap"],
        ["p", "u64"],
      ],
    } as const satisfies KernelSignature;
    const map = Uint8Array.from({ length: 128 }, (_, i) => i + 1);
    const { bytes, offsets } = new ArgEncoder().encode(tsig, { n: 7, map, p: 2 ** 33 });
    expect(offsets).toEqual([0, 64, 192]);
    expect(bytes.byteLength).toBe(200);
    const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    expect(v.getInt32(0, true)).toBe(7);
    expect(Array.from(bytes.subarray(64, 192))).toEqual(Array.from(map));
    expect(v.getBigUint64(192, true)).toBe(2n ** 33n);
    expect(() => new ArgEncoder().encode(tsig, { n: 7, map: new Uint8Array(64), p: 0 })).toThrow(
      /argument map = 64 bytes is not a tensor map/,
    );
  });
});
