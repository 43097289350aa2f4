// checkpointTensorShapes lists exactly the tensors, with their shapes, that the model itself has.
import { presetPolicy } from "@moe8/fp8-core";
import { TsBackend } from "@moe8/tensor";
import { describe, expect, it } from "vitest";
import type { ModelConfig } from "../src/config.ts";
import { DeepSeekModel } from "../src/model.ts";
import { checkpointTensorShapes } from "../src/tensor-shapes.ts";
import { MICRO } from "./helpers.ts";

function modelShapes(cfg: ModelConfig): [string, number[]][] {
  const model = new DeepSeekModel(new TsBackend(), cfg, presetPolicy("fp32"), 0);
  const shapes = model.namedTensors().map(({ name, shape }): [string, number[]] => [name, shape]);
  model.dispose();
  return shapes;
}

describe("checkpointTensorShapes", () => {
  for (const [what, cfg] of [
    ["dense and MoE layers, shared experts", { ...MICRO, first_k_dense_replace: 1 }],
    ["q LoRA, no shared experts", { ...MICRO, q_lora_rank: 6, n_shared_experts: 0 }],
    ["multi-token prediction (a MoE block)", { ...MICRO, num_nextn_predict_layers: 1 }],
    [
      "multi-token prediction (every trunk layer dense; the module's block is MoE)",
      { ...MICRO, first_k_dense_replace: 2, num_nextn_predict_layers: 1 },
    ],
  ] as const)
    it(`matches the model's tensors: ${what}`, () => {
      const want = modelShapes(cfg);
      const got = [...checkpointTensorShapes(cfg)].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
      expect(got).toEqual(want);
    });
});

describe("namedTensors", () => {
  it("covers every element of every model tensor exactly once (fused gate|up and stacked experts split)", async () => {
    const model = new DeepSeekModel(
      new TsBackend(),
      { ...MICRO, first_k_dense_replace: 1, num_nextn_predict_layers: 1 },
      presetPolicy("fp32"),
      3,
    );
    const hits = new Map<object, Uint8Array>();
    for (const { tensor, shape, offset } of model.namedTensors()) {
      const h = hits.get(tensor) ?? new Uint8Array(tensor.size);
      hits.set(tensor, h);
      for (let i = 0; i < shape.reduce((x, y) => x * y, 1); i++) h[offset + i]++;
    }
    for (const p of model.params) expect(Array.from(new Set(hits.get(p.value))), p.name).toEqual([1]);
    // gate_proj and up_proj of an expert are the two row halves of that expert's fused matrix.
    const state = await model.stateDict();
    const fused = model.params.find((p) => p.name === "model.layers.1.mlp.experts.gate_up_proj.weight")!;
    const [E, rows, cols] = fused.value.shape;
    const all = (await fused.value.read()) as Float32Array;
    const e = E - 1;
    const gate = state.get(`model.layers.1.mlp.experts.${e}.gate_proj.weight`)!;
    const up = state.get(`model.layers.1.mlp.experts.${e}.up_proj.weight`)!;
    expect(gate.shape).toEqual([rows / 2, cols]);
    expect(Array.from(gate.data)).toEqual(
      Array.from(all.subarray(e * rows * cols, (e * rows + rows / 2) * cols)),
    );
    expect(Array.from(up.data)).toEqual(
      Array.from(all.subarray((e * rows + rows / 2) * cols, (e + 1) * rows * cols)),
    );
    // Loading the state back into another model gives the same tensors.
    const other = new DeepSeekModel(
      new TsBackend(),
      { ...MICRO, first_k_dense_replace: 1, num_nextn_predict_layers: 1 },
      presetPolicy("fp32"),
      9,
    );
    other.loadStateDict((n) => state.get(n));
    const again = await other.stateDict();
    for (const [n, t] of state) expect(Array.from(again.get(n)!.data), n).toEqual(Array.from(t.data));
    model.dispose();
    other.dispose();
  });
});
