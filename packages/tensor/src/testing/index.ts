export { Rng } from "../random.ts";
export { attentionForwardBackward, ODD_SIZES, opSuite } from "./op-suite.ts";
export { relErr } from "./rel-err.ts";
