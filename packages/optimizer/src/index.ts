export {
  ADAMW_DEFAULTS,
  AdamW,
  type AdamWConfig,
  type OptimizerShard,
  type SplitParams,
  shardOwners,
} from "./adamw.ts";
export { learningRate, type ScheduleConfig } from "./schedule.ts";
