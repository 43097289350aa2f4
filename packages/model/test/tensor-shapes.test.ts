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
  const shapes = model
    .namedTensors()
    .map(({ name, tensor, expert }): [string, number[]] => [
      name,
      expert === undefined ? [...tensor.shape] : tensor.shape.slice(1),
    ]);
  model.dispose();
  return shapes;
}

describe("checkpointTensorShapes", () => {
  for (const [what, cfg] of [
    ["dense and MoE layers, shared experts", { ...MICRO, first_k_dense_replace: 1 }],
    ["q LoRA, no shared experts", { ...MICRO, q_lora_rank: 6, n_shared_experts: 0 }],
  ] as const)
    it(`matches the model's tensors: ${what}`, () => {
      const want = modelShapes(cfg);
      const got = [...checkpointTensorShapes(cfg)].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
      expect(got).toEqual(want);
    });
});
