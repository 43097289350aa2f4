// gemmPlan: the recipe's operand groups and formats per GEMM role, the coarse fp8 controls, and the
// policy settings (format overrides, pow2Scales, eps) reaching the operands they are meant for.
import { describe, expect, it } from "vitest";
import { describeOperands, gemmPlan, type LinearPrecision, parsePolicy, presetPolicy } from "../src/index.ts";

const pkg = (preset: string, overrides: [string, string][] = []): LinearPrecision =>
  parsePolicy({ preset, overrides: overrides.map(([k, v]) => [`precision.${k}`, v]) })["moe-layers"];

describe("gemmPlan", () => {
  it("fp8: x and dy in 1x128 tiles, W in 128x128 blocks, the Wgrad operands in 128x1 column tiles", () => {
    const p = pkg("fp8");
    const q = (group: string, format = "e4m3") => ({ group, format, pow2Scales: false, eps: 1e-12 });
    expect(gemmPlan("fprop", p)).toEqual({
      role: "fprop",
      precision: "fp8",
      kernel: "fp8",
      a: { tensor: "x", trans: false, quant: q("tile") },
      b: { tensor: "w", trans: true, quant: q("block") },
    });
    expect(gemmPlan("dgrad", p)).toMatchObject({
      a: { tensor: "dy", trans: false, quant: q("tile") },
      b: { tensor: "w", trans: false, quant: q("block") },
    });
    expect(gemmPlan("wgrad", p)).toMatchObject({
      a: { tensor: "dy", trans: true, quant: q("column-tile") },
      b: { tensor: "x", trans: false, quant: q("column-tile") },
    });
  });

  it("formats: the gradient format reaches dy only; the weight format reaches both Fprop operands", () => {
    const grads = pkg("fp8", [["gradients", "e5m2"]]);
    expect(describeOperands(gemmPlan("fprop", grads))).toBe("x tile/e4m3, w block/e4m3");
    expect(describeOperands(gemmPlan("dgrad", grads))).toBe("dy tile/e5m2, w block/e4m3");
    expect(describeOperands(gemmPlan("wgrad", grads))).toBe("dy column-tile/e5m2, x column-tile/e4m3");
    const fprop = pkg("fp8", [["moe-layers.fprop.format", "e5m2"]]);
    expect(describeOperands(gemmPlan("fprop", fprop))).toBe("x tile/e5m2, w block/e5m2");
    expect(describeOperands(gemmPlan("dgrad", fprop))).toBe("dy tile/e4m3, w block/e4m3");
  });

  it("pow2Scales and eps reach the fine-grained operands", () => {
    const p = pkg("fp8", [
      ["pow2Scales", "true"],
      ["eps", "1e-6"],
    ]);
    expect(gemmPlan("wgrad", p).b.quant).toEqual({
      group: "column-tile",
      format: "e4m3",
      pow2Scales: true,
      eps: 1e-6,
    });
    expect(describeOperands(gemmPlan("fprop", p))).toBe("x tile/e4m3/pow2, w block/e4m3/pow2");
  });

  it("fp8-tensorwise: one amax scale per tensor; fp8-unscaled: scale 1; both run the fp8 kernel", () => {
    const tw = gemmPlan("wgrad", pkg("fp8-tensorwise"));
    expect(tw.kernel).toBe("fp8");
    expect([tw.a.quant, tw.b.quant]).toEqual([
      { group: "tensor", format: "e4m3" },
      { group: "tensor", format: "e4m3" },
    ]);
    const un = gemmPlan("fprop", pkg("fp8-unscaled"));
    expect([un.kernel, un.a.quant, un.b.quant]).toEqual([
      "fp8",
      { group: "tensor", format: "e4m3", unit: true },
      { group: "tensor", format: "e4m3", unit: true },
    ]);
  });

  it("f32 and bf16 quantise nothing and run their own kernel", () => {
    for (const preset of ["fp32", "bf16"]) {
      const p = gemmPlan("dgrad", presetPolicy(preset).attention);
      expect(p.kernel).toBe(preset === "fp32" ? "f32" : "bf16");
      expect([p.a.quant, p.b.quant]).toEqual([null, null]);
      expect(describeOperands(p)).toBe("");
    }
    const mixed = pkg("fp8", [["moe-layers.wgrad", "bf16"]]);
    expect(gemmPlan("wgrad", mixed)).toMatchObject({ precision: "bf16", kernel: "bf16", a: { quant: null } });
    expect(gemmPlan("fprop", mixed).kernel).toBe("fp8");
  });
});
