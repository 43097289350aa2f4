// A model restored from a checkpoint directory for eval and sample.

import { UsageError } from "@moe8/fp8-core";
import { DeepSeekModel, fromHfConfig, type ModelConfig } from "@moe8/model";
import type { Backend } from "@moe8/tensor";
import { readCheckpoint } from "./checkpoint.ts";
import type { TrainConfig } from "./config.ts";
import { policyOf } from "./session.ts";

export function loadModel(dir: string, backend: Backend, precision?: string) {
  const ck = readCheckpoint(dir, false);
  let modelCfg: ModelConfig;
  try {
    modelCfg = fromHfConfig(ck.config);
  } catch (e) {
    throw new UsageError(`checkpoint ${dir}: ${(e as Error).message}`);
  }
  const train = ck.state.train_config as TrainConfig;
  const policy = policyOf({
    precision: precision ?? train.precision,
    precisionOverrides: precision ? {} : train.precisionOverrides,
  });
  const model = new DeepSeekModel(backend, modelCfg, policy, 0);
  try {
    model.loadStateDict((n) => ck.model.get(n));
  } catch (e) {
    model.dispose();
    throw new UsageError(`checkpoint ${dir}: ${(e as Error).message}`);
  }
  return { model, train, state: ck.state };
}
