export { createMlaKvCache, disposeMlaKvCache, type MlaKvCache, mlaExtend } from "./decode.ts";
export {
  type AttentionPrecision,
  type InitFn,
  MLA,
  type MlaConfig,
  type MlaOptions,
  type StepShape,
} from "./mla.ts";
