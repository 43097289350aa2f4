export { type AttentionPrecision, type InitFn, MLA, type MlaConfig, type StepShape } from "./mla.ts";
