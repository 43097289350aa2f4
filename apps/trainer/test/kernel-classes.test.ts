// The kernel classes of `bench step --profile` on cuda: every kernel the cuda backend launches has
// a class other than "other", and the classes add up to the step's GPU time.
import { cudaKernelNames } from "@moe8/kernels";
import { describe, expect, it } from "vitest";
import { byKernelClass, kernelClass } from "../src/commands/bench/kernel-classes.ts";

describe("kernel classes", () => {
  it("names each kernel of the table and cuBLASLt's by what it does", () => {
    const names = cudaKernelNames();
    expect(names.length).toBeGreaterThan(100);
    for (const name of names) expect(kernelClass(name), name).not.toBe("other");
    expect(kernelClass("cublasLt.E4m3xE4m3.Vec128xVec128")).toBe("gemm");
    expect(kernelClass("gemm_sm90.gemm_sm90_fp8_grouped_128x128")).toBe("gemm");
    expect(kernelClass("gemm_sm90.sm90_coltile_transpose")).toBe("quantisation");
    expect(kernelClass("quant.requant_coltile")).toBe("quantisation");
    expect(kernelClass("elementwise.f32_to_bf16_x4")).toBe("bf16 conversion");
    expect(kernelClass("elementwise.add_f32")).toBe("elementwise");
    expect(kernelClass("flash_sm90.fa3_dkdv_96_64")).toBe("attention");
    expect(kernelClass("optim.adamw_multi")).toBe("loss and optimiser");
    expect(kernelClass("something.else")).toBe("other");
  });

  it("sums GPU time and launches per class", () => {
    const rows = byKernelClass([
      { name: "quant.quant_tile128", ms: 1.5, launches: 3 },
      { name: "quant.quant_coltile", ms: 0.25, launches: 1 },
      { name: "moe.gather_rows", ms: 2, launches: 2 },
    ]);
    expect(rows.find((r) => r.class === "quantisation")).toEqual({
      class: "quantisation",
      ms: 1.75,
      launches: 4,
    });
    expect(rows.reduce((s, r) => s + r.ms, 0)).toBeCloseTo(3.75, 10);
    expect(rows.find((r) => r.class === "gemm")).toEqual({ class: "gemm", ms: 0, launches: 0 });
  });
});
