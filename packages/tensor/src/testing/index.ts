export { attentionForwardBackward, ODD_SIZES, opSuite } from "./op-suite.ts";
export { Rng, relErr } from "./random.ts";
