// The shared op suite on the cuda backend, against the ts reference. Runs where a GPU is present
// (skipped elsewhere, unless MOE8_REQUIRE_CUDA=1, which makes a missing GPU a failure). With
// MOE8_POISON=1 every new device buffer is filled with NaN bytes first, so an output an op forgets
// to write shows up as a mismatch.
import { opSuite } from "@moe8/tensor/testing";
import { describe, expect, it } from "vitest";
import { CudaBackend } from "../src/cuda-backend.ts";
import { loadNative } from "../src/index.ts";

function cudaStatus(): { ok: boolean; reason: string } {
  const s = loadNative();
  if (!s.addon) return { ok: false, reason: `native addon not loaded: ${s.reason}` };
  if (typeof s.addon.cudaInfo !== "function") return { ok: false, reason: "addon built without CUDA" };
  const i = s.addon.cudaInfo();
  return { ok: i.available, reason: i.reason ?? "" };
}

const status = cudaStatus();
const required = process.env.MOE8_REQUIRE_CUDA === "1";

if (status.ok) {
  opSuite("cuda", () => new CudaBackend());

  describe("cuda backend specifics", () => {
    it("reports device memory and frees tensors explicitly", async () => {
      const be = new CudaBackend();
      const before = be.memoryStats().allocated;
      const t = be.upload(new Float32Array(1000).fill(1.5), [1000]);
      expect(be.memoryStats().allocated).toBeGreaterThan(before);
      expect(be.peakMemory()).toBeGreaterThanOrEqual(be.memoryStats().allocated);
      expect(Array.from((await t.read()).slice(0, 2))).toEqual([1.5, 1.5]);
      t.dispose();
      expect(be.memoryStats().allocated).toBe(before);
    });

    it("is deterministic: the same inputs give the same bits twice", async () => {
      const be = new CudaBackend();
      const run = () =>
        be.scope(async () => {
          const x = be.upload(
            Float32Array.from({ length: 4096 }, (_, i) => Math.sin(i) * 3),
            [64, 64],
          );
          const ids = be.upload(
            Int32Array.from({ length: 64 }, (_, i) => (i * 7) % 16),
            [64],
            "i32",
          );
          const r = be.router(
            be.matmul(x, be.upload(new Float32Array(64 * 16).fill(0.01), [64, 16]), { precision: "f32" }),
            be.zeros([16]),
            2,
            1,
          );
          const p = be.moePermute(x, r.topIdx, 16);
          const dE = be.zeros([16, 64]);
          be.embeddingBackward(dE, x, ids);
          return [
            await be.sum(x).read(),
            await p.slot.read(),
            await dE.read(),
            await be.clipScale([x, dE], 1).norm.read(),
          ];
        });
      expect(await run()).toEqual(await run());
    });
  });
} else {
  describe("cuda op suite", () => {
    it.skipIf(!required)(`needs a GPU (${status.reason})`, () => {
      throw new Error(`MOE8_REQUIRE_CUDA=1 but the cuda backend is unavailable: ${status.reason}`);
    });
  });
}
