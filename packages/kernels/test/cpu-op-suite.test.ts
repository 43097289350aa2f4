// The shared op suite on the native cpu backend, against the ts reference.
import { opSuite } from "@moe8/tensor/testing";
import { CpuBackend } from "../src/cpu-backend.ts";

opSuite("cpu", () => new CpuBackend());
