// A model restored from a checkpoint directory for eval and sample. The checkpoint is verified
// (checksums, trainer-state.json, finite f32 tensors), its config.json is held to the same bounds
// as a training config, its tensors must be exactly the model's, and the memory the model needs is
// checked before it is built.
import { join } from "node:path";
import { UsageError } from "@moe8/fp8-core";
import { DeepSeekModel, fromHfConfig, type ModelConfig } from "@moe8/model";
import type { Backend } from "@moe8/tensor";
import { checkTensorSet, readCheckpoint } from "./checkpoint.ts";
import { checkModelConfig } from "./config.ts";
import { checkMemory, memoryNeed } from "./memory.ts";
import { policyOf } from "./session.ts";

/** The model's tensors by checkpoint name with their checkpoint shapes (an expert's slice per expert). */
export function modelShapes(model: DeepSeekModel): Map<string, number[]> {
  return new Map(model.namedTensors().map(({ name, shape }) => [name, shape]));
}

/** A checkpoint's model config (its config.json), held to the bounds a config file is held to. */
export function checkpointModelConfig(dir: string, config: Record<string, unknown>): ModelConfig {
  let cfg: ModelConfig;
  try {
    cfg = fromHfConfig(config);
  } catch (e) {
    throw new UsageError(`checkpoint ${dir}: ${(e as Error).message}`);
  }
  checkModelConfig(cfg, `checkpoint ${dir}: config.json`);
  return cfg;
}

export function loadModel(
  dir: string,
  backend: Backend,
  opts: {
    precision?: string;
    shape: (train: { batchSize: number; seqLen: number }) => { batch: number; seq: number };
  },
) {
  const ck = readCheckpoint(dir, false);
  const modelCfg = checkpointModelConfig(dir, ck.config);
  const train = ck.state.train_config;
  const shape = opts.shape(train);
  checkMemory(
    memoryNeed(modelCfg, shape, null),
    backend.name,
    `this model on ${shape.batch} x ${shape.seq} tokens`,
  );
  const policy = policyOf({
    precision: opts.precision ?? train.precision,
    precisionOverrides: opts.precision ? {} : train.precisionOverrides,
  });
  const model = new DeepSeekModel(backend, modelCfg, policy, 0);
  try {
    checkTensorSet(join(dir, "model.safetensors"), ck.model, modelShapes(model));
    model.loadStateDict((n) => ck.model.get(n));
  } catch (e) {
    model.dispose();
    throw e;
  }
  return { model, train, state: ck.state };
}
