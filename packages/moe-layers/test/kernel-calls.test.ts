// Precision overrides reach the kernels: a Linear and an MoE layer run forward and backward on a
// recording ts backend under a policy parsed from command-line style keys (as `train` parses them),
// and the formats and groups of every quantisation and GEMM operand are checked per role.
import { parsePolicy } from "@moe8/fp8-core";
import { Linear, Param, PrecisionTrace, Rng } from "@moe8/tensor";
import { type GemmCall, RecordingBackend } from "@moe8/tensor/testing";
import { describe, expect, it } from "vitest";
import { MoELayer, type MoeConfig } from "../src/moe.ts";

const policy = (flags: [string, string][]) => parsePolicy({ preset: "fp8", overrides: flags });
/** --precision.gradients=e5m2 and the Fprop format (x and W) of every GEMM package set to E5M2. */
const OVERRIDES: [string, string][] = [
  ["--precision.gradients", "e5m2"],
  ["--precision.attention.fprop.format", "e5m2"],
  ["--precision.moe-layers.fprop.format", "e5m2"],
];

/** The GEMM role of a call, from its layout (y = x W^T, dx = dy W, dW = dy^T x). */
const role = (c: GemmCall) => (c.transA ? "wgrad" : c.transB ? "fprop" : "dgrad");

describe("precision overrides reach the kernel calls", () => {
  it("a Linear: the Fprop format reaches x and W, the gradient format reaches dy in Dgrad and Wgrad", async () => {
    const b = new RecordingBackend();
    const rng = new Rng(1);
    const [T, IN, OUT] = [130, 136, 72];
    const w = Param.create(b, { name: "w", init: rng.normals(OUT * IN, 0.1), shape: [OUT, IN], decay: true });
    const trace = new PrecisionTrace();
    const lin = new Linear(w, {
      precision: policy(OVERRIDES).attention,
      pkg: "attention",
      layer: "l",
      trace,
    });
    await b.scope(async () => {
      lin.forward(b.upload(rng.normals(T * IN), [T, IN]));
      lin.backward(b.upload(rng.normals(T * OUT), [T, OUT]));
    });
    const fp8 = { op: "matmul", precision: "fp8", promotion: 128 };
    expect(b.gemmCalls).toEqual([
      { ...fp8, transA: false, transB: true, a: "tile/e5m2", b: "block/e5m2" },
      { ...fp8, transA: false, transB: false, a: "tile/e5m2", b: "block/e4m3" },
      { ...fp8, transA: true, transB: false, a: "column-tile/e5m2", b: "column-tile/e4m3" },
    ]);
    const q = { pow2Scales: false, unit: false, eps: 1e-12, segments: false };
    expect(b.quantizeCalls).toEqual([
      { op: "quantize", group: "tile", format: "e5m2", ...q }, // x
      { op: "quantize", group: "block", format: "e5m2", ...q }, // W for Fprop
      { op: "quantize", group: "block", format: "e4m3", ...q }, // W for Dgrad: not Fprop's copy
      { op: "quantize", group: "tile", format: "e5m2", ...q }, // dy for Dgrad
      { op: "quantize", group: "column-tile", format: "e5m2", ...q }, // dy for Wgrad
      { op: "requantize", group: "column-tile", format: "e4m3", ...q }, // x from its FP8 cache
    ]);
    expect(trace.format()).toMatch(/\nattention fprop +x tile\/e5m2, w block\/e5m2\n/);

    // Without the Fprop override both Fprop operands stay E4M3, and Dgrad reuses Fprop's W copy.
    b.clearCalls();
    lin.precision = policy([["--precision.gradients", "e5m2"]]).attention;
    await b.scope(async () => {
      lin.forward(b.upload(rng.normals(T * IN), [T, IN]));
      lin.backward(b.upload(rng.normals(T * OUT), [T, OUT]));
    });
    expect(b.gemmCalls.map((c) => [role(c), c.a, c.b])).toEqual([
      ["fprop", "tile/e4m3", "block/e4m3"],
      ["dgrad", "tile/e5m2", "block/e4m3"],
      ["wgrad", "column-tile/e5m2", "column-tile/e4m3"],
    ]);
    expect(b.quantizeCalls.filter((c) => c.group === "block")).toHaveLength(1);
    w.dispose();
  });

  it("an MoE layer: the grouped expert GEMMs and the shared experts follow the same plan; the router stays f32", async () => {
    const b = new RecordingBackend();
    const rng = new Rng(2);
    const cfg: MoeConfig = {
      hidden_size: 16,
      moe_intermediate_size: 8,
      n_routed_experts: 4,
      num_experts_per_tok: 2,
      n_shared_experts: 1,
      routed_scaling_factor: 1.5,
      bias_update_speed: 0.001,
      bias_update_rule: "sign",
      seq_aux_alpha: 0.1,
    };
    const m = new MoELayer(b, {
      cfg,
      prefix: "moe",
      precision: policy([...OVERRIDES, ["--precision.pow2Scales", "true"]])["moe-layers"],
      init: (n) => rng.normals(n, 0.3),
    });
    await b.scope(async () => {
      m.forward(b.upload(rng.normals(24 * 16), [24, 16]), 2, 12);
      m.backward(b.upload(rng.normals(24 * 16), [24, 16]));
    });
    const seen = (op: GemmCall["op"], precision: string) =>
      [
        ...new Set(
          b.gemmCalls
            .filter((c) => c.op === op && c.precision === precision)
            .map((c) => `${role(c)} ${c.a} ${c.b}`),
        ),
      ].sort();
    // Routed experts: one grouped GEMM per projection (gate|up fused, down) and role; Wgrad's column
    // tiles restart per expert.
    expect(b.gemmCalls.filter((c) => c.op === "groupedMatmul")).toHaveLength(6);
    expect(seen("groupedMatmul", "fp8")).toEqual([
      "dgrad tile/e5m2 block/e4m3",
      "fprop tile/e5m2 block/e5m2",
      "wgrad column-tile/e5m2/segments column-tile/e4m3/segments",
    ]);
    expect(seen("matmul", "fp8")).toEqual([
      "dgrad tile/e5m2 block/e4m3",
      "fprop tile/e5m2 block/e5m2",
      "wgrad column-tile/e5m2 column-tile/e4m3",
    ]);
    // The router's GEMMs: f32 on f32 operands, whatever the policy.
    expect(seen("matmul", "f32")).toEqual(["dgrad f32 f32", "fprop f32 f32", "wgrad f32 f32"]);
    // pow2Scales reaches every quantisation.
    expect(b.quantizeCalls.length).toBeGreaterThan(0);
    expect(b.quantizeCalls.every((c) => c.pow2Scales && !c.unit)).toBe(true);
    for (const p of m.params) p.dispose();
    m.bias.dispose();
  });
});
