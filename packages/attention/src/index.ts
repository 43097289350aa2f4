export {
  type AttentionPrecision,
  type InitFn,
  MLA,
  type MlaConfig,
  type MlaOptions,
  type StepShape,
} from "./mla.ts";
