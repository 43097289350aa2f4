// The shared op suite on the cpu backend with the SIMD dispatch forced to the baseline (scalar)
// kernels, and outputs poisoned as in cpu-op-suite.test.ts. vitest runs each test file in its own
// process, so the variables are seen at load time.
process.env.MOE8_SIMD = "scalar";
process.env.MOE8_POISON = "1";

export {};

const { opSuite } = await import("@moe8/tensor/testing");
const { CpuBackend } = await import("../src/cpu-backend.ts");
const { loadNative } = await import("../src/index.ts");

if (loadNative().addon?.info().simd !== "scalar") throw new Error("MOE8_SIMD=scalar was not honoured");
opSuite("cpu (MOE8_SIMD=scalar)", () => new CpuBackend());
