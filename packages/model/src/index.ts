export { CONFIGS, countParams, type ModelConfig, STEP_SHAPES } from "./config.ts";
export { fromHfConfig, hfConfig, hfConfigText } from "./hf.ts";
export { type BatchShape, DeepSeekModel } from "./model.ts";
export { type StepResult, trainStep } from "./train-step.ts";
