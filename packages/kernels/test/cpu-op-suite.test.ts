// The shared op suite on the native cpu backend, against the ts reference. With MOE8_POISON=1 the
// backend's outputs start as NaN bytes instead of whatever the buffer pool held, so an element a
// kernel leaves unwritten fails the comparison (as the cuda suite runs in scripts/gpu-check.sh).
process.env.MOE8_POISON = "1";

export {};

const { opSuite } = await import("@moe8/tensor/testing");
const { CpuBackend } = await import("../src/cpu-backend.ts");

opSuite("cpu", () => new CpuBackend());
