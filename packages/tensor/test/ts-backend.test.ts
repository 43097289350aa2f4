import { TsBackend } from "../src/index.ts";
import { opSuite } from "../src/testing/index.ts";

opSuite("ts", () => new TsBackend());
