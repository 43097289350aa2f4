// (The expert load statistics the step reports, for evaluations that report them too.)
export { type LoadStats, loadStats } from "@moe8/moe-layers";
export {
  CONFIGS,
  countParams,
  type ModelConfig,
  mtpLossWeight,
  routerNoiseAt,
  routerNoiseSeed,
  STEP_SHAPES,
} from "./config.ts";
export { type GenerateOptions, generate, generateByRecompute } from "./generate.ts";
export { fromHfConfig, hfConfig, hfConfigText } from "./hf.ts";
export { KvCacheDecoder } from "./kv-decode.ts";
export { type BatchShape, DeepSeekModel, type StepLosses } from "./model.ts";
export {
  drawToken,
  hfGenerationConfig,
  nextTokenProbs,
  SAMPLING_DEFAULTS,
  type SamplingOptions,
} from "./sampling.ts";
export { generateSpeculative, type SpeculativeStats, verifyDraft } from "./speculative.ts";
export { type StepBatch, StepRunner, type StepRunnerOptions } from "./step-runner.ts";
export { checkpointTensorShapes } from "./tensor-shapes.ts";
export { type StepOptions, type StepResult, trainStep } from "./train-step.ts";
