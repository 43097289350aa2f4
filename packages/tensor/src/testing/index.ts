export { Rng } from "../random.ts";
export { type AdamwRun, type AdamwStepsOptions, adamwSteps } from "./adamw.ts";
export { localGroup } from "./local-collectives.ts";
export { attentionForwardBackward, ODD_SIZES, opSuite } from "./op-suite.ts";
export { type GemmCall, type QuantizeCall, RecordingBackend } from "./recording.ts";
export { relErr } from "./rel-err.ts";
export { tempDir } from "./temp-dir.ts";
