// The precision types are @moe8/fp8-core's, re-exported for the packages that import them from here.
export type { GemmPrecision, GemmRole, GemmSpec, LinearPrecision } from "@moe8/fp8-core";
export * from "./backend.ts";
export {
  type Collectives,
  type CollectiveValues,
  checkSplitColor,
  collectivesOver,
  type Exchange,
  type OpenExchange,
  SINGLE_PROCESS,
} from "./collectives.ts";
export {
  f32,
  f32OrBf16,
  fromWordsLayout,
  HostLifetimes,
  host,
  i32,
  rowScales,
  rowSpan,
  sameShape,
  swigluWidth,
  u8,
  wordsLayout,
} from "./host.ts";
export { Linear, type LinearOptions, type QuantisedGrad, QuantMemo } from "./layers/linear.ts";
export { Param, type ParamOptions } from "./layers/param.ts";
export { Fp8FlowCounter, PrecisionTrace, type TraceEntry } from "./layers/trace.ts";
export { Rng } from "./random.ts";
export { type QuantInfo, Tensor } from "./tensor.ts";
export { relErr } from "./testing/rel-err.ts";
export { gemmDims, TsBackend } from "./ts/backend.ts";
export { batchDims, scaleCount } from "./ts/linear.ts";
export * from "./types.ts";
