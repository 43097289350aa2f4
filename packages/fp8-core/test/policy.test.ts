import { describe, expect, it } from "vitest";
import {
  describePolicy,
  GEMM_PACKAGES,
  GEMM_ROLES,
  type GemmPrecision,
  type LinearPrecision,
  PolicyError,
  PRESET_NAMES,
  type PrecisionPolicy,
  parsePolicy,
  policyFromJson,
  policyToJson,
  presetPolicy,
} from "../src/index.ts";

const gemmsOf = (p: LinearPrecision) => GEMM_ROLES.map((r) => p[r].precision);
const formatsOf = (p: LinearPrecision) => GEMM_ROLES.map((r) => p[r].format);
const all = (x: GemmPrecision) => [x, x, x];

/** The error a call throws: must be a one-line PolicyError named UsageError. */
function failure(f: () => unknown): string {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(PolicyError);
    expect((e as Error).name).toBe("UsageError");
    expect((e as Error).message).not.toContain("\n");
    return (e as Error).message;
  }
  throw new Error("expected a PolicyError");
}

describe("presets", () => {
  it("fp32: everything f32", () => {
    const p = presetPolicy("fp32");
    for (const name of GEMM_PACKAGES) {
      expect(gemmsOf(p[name])).toEqual(all("f32"));
      expect(p[name].outputs).toBe("f32");
    }
    expect(p.optimizer).toEqual({ moments: "f32", master: "f32" });
  });

  it("bf16: BF16 GEMMs, BF16 outputs and moments, f32 master", () => {
    const p = presetPolicy("bf16");
    for (const name of GEMM_PACKAGES) {
      expect(gemmsOf(p[name])).toEqual(all("bf16"));
      expect(p[name].outputs).toBe("bf16");
    }
    expect(p.optimizer).toEqual({ moments: "bf16", master: "f32" });
  });

  for (const name of ["fp8", "fp8-tensorwise", "fp8-unscaled"] as const)
    it(`${name}: the Linears in ${name}, E4M3, head BF16, the rest as bf16`, () => {
      const p = presetPolicy(name);
      expect(p.preset).toBe(name);
      for (const pkg of ["attention", "moe-layers"] as const) {
        expect(gemmsOf(p[pkg])).toEqual(all(name));
        expect(formatsOf(p[pkg])).toEqual(["e4m3", "e4m3", "e4m3"]);
        expect(p[pkg]).toMatchObject({
          cacheActivations: "fp8",
          pow2Scales: false,
          promotion: 128,
          eps: 1e-12,
          outputs: "bf16",
        });
      }
      expect(gemmsOf(p.model)).toEqual(all("bf16"));
      expect(p.model.outputs).toBe("bf16");
      expect(p.optimizer).toEqual({ moments: "bf16", master: "f32" });
    });

  it("the default is fp8; presets are fresh copies", () => {
    expect(parsePolicy()).toEqual(presetPolicy("fp8"));
    expect(parsePolicy({ preset: "bf16" })).toEqual(presetPolicy("bf16"));
    const p = presetPolicy("fp8");
    p.attention.fprop.precision = "f32";
    expect(presetPolicy("fp8").attention.fprop.precision).toBe("fp8");
    expect(PRESET_NAMES).toEqual(["fp32", "bf16", "fp8", "fp8-tensorwise", "fp8-unscaled"]);
  });
});

describe("overrides", () => {
  const parse = (...overrides: [string, string][]) => parsePolicy({ preset: "fp8", overrides });

  it("a package's precision sets its three GEMM roles; a role or its format singly", () => {
    const p = parse(
      ["precision.attention", "bf16"],
      ["precision.moe-layers.wgrad", "bf16"],
      ["precision.model.fprop", "fp8"],
    );
    expect(gemmsOf(p.attention)).toEqual(all("bf16"));
    expect(gemmsOf(p["moe-layers"])).toEqual(["fp8", "fp8", "bf16"]);
    expect(gemmsOf(p.model)).toEqual(["fp8", "bf16", "bf16"]);
    const q = parse(
      ["precision.attention.fprop.precision", "fp8-tensorwise"],
      ["precision.moe-layers.dgrad.format", "e5m2"],
    );
    expect(q.attention.fprop).toEqual({ precision: "fp8-tensorwise", format: "e4m3" });
    expect(formatsOf(q["moe-layers"])).toEqual(["e4m3", "e5m2", "e4m3"]);
    expect(formatsOf(parse(["precision.attention.format", "e5m2"]).attention)).toEqual([
      "e5m2",
      "e5m2",
      "e5m2",
    ]);
  });

  it("later overrides win; a bare `precision` key or leading dashes are accepted", () => {
    const p = parse(["precision.attention", "bf16"], ["--precision.attention.wgrad", "fp8"]);
    expect(gemmsOf(p.attention)).toEqual(["bf16", "bf16", "fp8"]);
    const q = parsePolicy({
      overrides: [
        ["precision.attention", "f32"],
        ["precision", "bf16"],
      ],
    });
    expect(q.preset).toBe("bf16");
    expect(gemmsOf(q.attention)).toEqual(all("f32"));
  });

  it("gradient format, globally and per package", () => {
    const p = parse(["precision.gradients", "e5m2"]);
    for (const name of GEMM_PACKAGES) expect(formatsOf(p[name])).toEqual(["e4m3", "e5m2", "e5m2"]);
    const q = parse(["precision.moe-layers.gradients", "e5m2"]);
    expect(formatsOf(q["moe-layers"])).toEqual(["e4m3", "e5m2", "e5m2"]);
    expect(formatsOf(q.attention)).toEqual(["e4m3", "e4m3", "e4m3"]);
  });

  it("cache, pow2 scales, promotion, eps, outputs, optimizer", () => {
    const p = parse(
      ["precision.moe-layers.cacheActivations", "bf16"],
      ["precision.pow2Scales", "true"],
      ["precision.attention.pow2Scales", "false"],
      ["precision.promotion", "256"],
      ["precision.model.promotion", "64"],
      ["precision.eps", "1e-10"],
      ["precision.attention.outputs", "f32"],
      ["precision.optimizer.moments", "f32"],
      ["precision.optimizer.master", "f32"],
    );
    expect(p["moe-layers"].cacheActivations).toBe("bf16");
    expect(p.attention.cacheActivations).toBe("fp8");
    expect([p.attention.pow2Scales, p["moe-layers"].pow2Scales, p.model.pow2Scales]).toEqual([
      false,
      true,
      true,
    ]);
    expect([p.attention.promotion, p["moe-layers"].promotion, p.model.promotion]).toEqual([256, 256, 64]);
    expect(p.model.eps).toBe(1e-10);
    expect(p.attention.outputs).toBe("f32");
    expect(p["moe-layers"].outputs).toBe("bf16");
    expect(p.optimizer).toEqual({ moments: "f32", master: "f32" });
    expect(parse(["precision.cacheActivations", "bf16"]).model.cacheActivations).toBe("bf16");
  });
});

describe("JSON", () => {
  it("reads the policy's shape with optional fields", () => {
    const p = policyFromJson({
      preset: "fp8",
      "moe-layers": { wgrad: "bf16", dgrad: { format: "e5m2" }, promotion: 256, pow2Scales: true },
      attention: "bf16",
      optimizer: { moments: "f32" },
      gradients: "e5m2",
    });
    expect(gemmsOf(p["moe-layers"])).toEqual(["fp8", "fp8", "bf16"]);
    expect(formatsOf(p["moe-layers"])).toEqual(["e4m3", "e5m2", "e5m2"]);
    expect(p["moe-layers"]).toMatchObject({ promotion: 256, pow2Scales: true });
    expect(gemmsOf(p.attention)).toEqual(all("bf16"));
    expect(p.optimizer.moments).toBe("f32");
    expect(policyFromJson({})).toEqual(presetPolicy("fp8"));
  });

  it("round-trips every preset and an overridden policy through JSON text", () => {
    const policies: PrecisionPolicy[] = PRESET_NAMES.map((n) => presetPolicy(n));
    policies.push(
      parsePolicy({
        preset: "fp32",
        overrides: [
          ["precision.moe-layers.wgrad", "fp8"],
          ["precision.gradients", "e5m2"],
          ["precision.pow2Scales", "true"],
          ["precision.attention.promotion", "512"],
          ["precision.optimizer.moments", "bf16"],
          ["precision.eps", "1e-9"],
        ],
      }),
    );
    for (const p of policies) {
      const text = JSON.stringify(policyToJson(p));
      expect(policyFromJson(JSON.parse(text))).toEqual(p);
    }
  });

  it("rejects bad JSON shapes", () => {
    expect(failure(() => policyFromJson([]))).toMatch(/^precision: expected a JSON object/);
    expect(failure(() => policyFromJson({ preset: 3 }))).toBe("precision.preset: expected a string (got 3)");
    expect(failure(() => policyFromJson({ attention: { fprop: null } }))).toMatch(
      /^precision.attention.fprop: expected/,
    );
    expect(failure(() => policyFromJson({ "moe-layers": { wgrad: "bf17" } }))).toBe(
      'precision.moe-layers.wgrad: unknown precision "bf17" (allowed: f32, bf16, fp8, fp8-tensorwise, fp8-unscaled)',
    );
  });
});

describe("bad input: one line naming the key, the value and what is allowed", () => {
  const bad = (key: string, value: string) => failure(() => parsePolicy({ overrides: [[key, value]] }));

  it("unknown preset", () => {
    expect(failure(() => parsePolicy({ preset: "fp16" }))).toBe(
      'precision: unknown preset "fp16" (allowed: fp32, bf16, fp8, fp8-tensorwise, fp8-unscaled)',
    );
    expect(bad("precision", "int8")).toMatch(/^precision: unknown preset "int8"/);
  });

  it("bad precision value", () => {
    expect(bad("precision.attention", "fp9")).toBe(
      'precision.attention: unknown precision "fp9" (allowed: f32, bf16, fp8, fp8-tensorwise, fp8-unscaled)',
    );
    expect(bad("precision.moe-layers.dgrad", "e4m3")).toMatch(
      /^precision.moe-layers.dgrad: unknown precision "e4m3"/,
    );
    expect(bad("precision.moe-layers.dgrad.format", "e3m4")).toBe(
      'precision.moe-layers.dgrad.format: unknown format "e3m4" (allowed: e4m3, e5m2)',
    );
    expect(bad("precision.gradients", "bf16")).toBe(
      'precision.gradients: unknown format "bf16" (allowed: e4m3, e5m2)',
    );
  });

  it("unknown package, role, setting, key", () => {
    expect(bad("precision.atention", "bf16")).toBe(
      'precision.atention: unknown package or setting "atention" (allowed: attention, moe-layers, model, optimizer, gradients, cacheActivations, pow2Scales, promotion, eps)',
    );
    expect(bad("precision.attention.fwd", "fp8")).toBe(
      'precision.attention.fwd: unknown attention setting "fwd" (allowed: fprop, dgrad, wgrad, format, gradients, cacheActivations, pow2Scales, promotion, eps, outputs)',
    );
    expect(bad("precision.attention.fprop.scale", "1")).toBe(
      'precision.attention.fprop.scale: unknown fprop setting "scale" (allowed: precision, format)',
    );
    expect(bad("precision.optimizer.beta", "1")).toBe(
      'precision.optimizer.beta: unknown optimizer setting "beta" (allowed: moments, master)',
    );
    expect(bad("precision.optimizer", "f32")).toBe(
      "precision.optimizer: needs a setting (allowed: moments, master)",
    );
    expect(bad("precision.optimizer.master", "bf16")).toBe(
      'precision.optimizer.master: unknown master precision "bf16" (allowed: f32)',
    );
    expect(bad("precision.attention.pow2Scales.x", "true")).toMatch(
      /^precision.attention.pow2Scales.x: unknown key/,
    );
    expect(bad("batch", "4")).toMatch(/^"batch": unknown key/);
  });

  it("bad boolean, number, cache, outputs, moments", () => {
    expect(bad("precision.pow2Scales", "yes")).toBe(
      'precision.pow2Scales: invalid boolean "yes" (allowed: true, false)',
    );
    expect(bad("precision.attention.pow2Scales", "")).toMatch(/invalid boolean ""/);
    for (const v of ["abc", "", "100", "0", "8192", "128.5", "-128"])
      expect(bad("precision.promotion", v)).toBe(
        `precision.promotion: invalid promotion interval ${JSON.stringify(v)} (allowed: a multiple of 32 from 32 to 4096)`,
      );
    expect(bad("precision.model.eps", "-1")).toMatch(/^precision.model.eps: invalid eps "-1"/);
    expect(bad("precision.cacheActivations", "fp16")).toBe(
      'precision.cacheActivations: unknown cache precision "fp16" (allowed: fp8, bf16)',
    );
    expect(bad("precision.model.outputs", "fp8")).toMatch(
      /unknown output precision "fp8" \(allowed: bf16, f32\)/,
    );
    expect(bad("precision.optimizer.moments", "fp8")).toMatch(
      /unknown moments precision "fp8" \(allowed: bf16, f32\)/,
    );
    expect(bad("precision.attention", "bf16\nfp8")).toContain('"bf16\\nfp8"'); // stays one line
  });
});

describe("describePolicy", () => {
  it("describePolicy is one line naming every package", () => {
    const d = describePolicy(
      parsePolicy({
        overrides: [
          ["precision.moe-layers.wgrad", "bf16"],
          ["precision.gradients", "e5m2"],
        ],
      }),
    );
    expect(d).not.toContain("\n");
    expect(d).toBe(
      "fp8: attention[fprop=fp8 dgrad=fp8/e5m2 wgrad=fp8/e5m2 cache=fp8 pow2=false promotion=128 outputs=bf16] " +
        "moe-layers[fprop=fp8 dgrad=fp8/e5m2 wgrad=bf16 cache=fp8 pow2=false promotion=128 outputs=bf16] " +
        "model[gemm=bf16 cache=fp8 pow2=false promotion=128 outputs=bf16] optimizer[moments=bf16 master=f32]",
    );
    expect(describePolicy(presetPolicy("fp32"))).toMatch(/^fp32: attention\[gemm=f32 /);
  });
});
