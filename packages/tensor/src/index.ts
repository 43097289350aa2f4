export * from "./backend.ts";
export { f32, f32OrBf16, HostLifetimes, host, i32, rowSpan, sameShape, u8 } from "./host.ts";
export {
  type GemmPrecision,
  type GemmSite,
  type GemmSpec,
  Linear,
  type LinearPrecision,
  operandQuant,
  QuantMemo,
} from "./layers/linear.ts";
export { Param } from "./layers/param.ts";
export { Fp8FlowCounter, type GemmRole, PrecisionTrace, type TraceEntry } from "./layers/trace.ts";
export { type QuantInfo, Tensor } from "./tensor.ts";
export { Rng, relErr } from "./testing/random.ts";
export { gemmDims, TsBackend } from "./ts/backend.ts";
export { batchDims, scaleCount } from "./ts/linear.ts";
export * from "./types.ts";
