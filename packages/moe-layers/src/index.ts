export { type InitFn, SwiGluMlp } from "./mlp.ts";
export { type LoadStats, loadStats, MoELayer, type MoeConfig } from "./moe.ts";
