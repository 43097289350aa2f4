export { combine, type Dispatched, dispatch, type ExpertExchange } from "./expert-parallel.ts";
export { type InitFn, SwiGluMlp, type SwiGluMlpOptions } from "./mlp.ts";
export { type LoadStats, loadStats, MoELayer, type MoELayerOptions, type MoeConfig } from "./moe.ts";
