export { ADAMW_DEFAULTS, AdamW, type AdamWConfig } from "./adamw.ts";
export { learningRate, type ScheduleConfig } from "./schedule.ts";
