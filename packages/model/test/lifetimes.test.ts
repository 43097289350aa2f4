// Tensor lifetimes in a training step: each block's backward frees its temporaries when it ends
// (model.backward's per-block arenas). A tensor used after its release would read recycled memory
// on a device; on the host MOE8_POISON=1 overwrites released storage, so any such use changes the
// step's numbers here.
import { presetPolicy } from "@moe8/fp8-core";
import { ADAMW_DEFAULTS, AdamW } from "@moe8/optimizer";
import { TsBackend } from "@moe8/tensor";
import { afterEach, describe, expect, it } from "vitest";
import { DeepSeekModel } from "../src/model.ts";
import { trainStep } from "../src/train-step.ts";
import { batchOf, MICRO } from "./helpers.ts";

async function twoSteps(preset: "fp8" | "bf16") {
  const b = new TsBackend();
  const m = new DeepSeekModel(b, MICRO, presetPolicy(preset), 3);
  const opt = new AdamW(b, m.params, { ...ADAMW_DEFAULTS, moments: "bf16" });
  const out: number[] = [];
  for (let s = 0; s < 2; s++) {
    const batch = batchOf(b, MICRO, 2, 9, 10 + s);
    const r = await trainStep(m, opt, batch.ids, batch.targets, batch.shape, 1e-2, { fp8Stats: true });
    out.push(r.loss, r.totalLoss, r.gradNorm);
  }
  for (const p of m.params) out.push(...((await p.value.read()) as Float32Array));
  return out;
}

describe("tensor lifetimes in a training step", () => {
  afterEach(() => {
    delete process.env.MOE8_POISON;
  });

  for (const preset of ["fp8", "bf16"] as const)
    it(`nothing is used after release (${preset}: poisoned released storage changes no number)`, async () => {
      const clean = await twoSteps(preset);
      process.env.MOE8_POISON = "1";
      const poisoned = await twoSteps(preset);
      expect(poisoned.every(Number.isFinite)).toBe(true);
      expect(poisoned).toEqual(clean);
    });

  it("peak tensor bytes: tracked across scopes and reset to what is live", () => {
    const b = new TsBackend();
    const base = b.stats().bytes;
    b.resetPeakBytes();
    b.scope(() => {
      b.zeros([1000]);
      b.scope(() => b.zeros([500], "i32"));
      b.zeros([250]);
    });
    expect(b.peakBytes()).toBe(base + 4 * 1500);
    expect(b.stats().bytes).toBe(base);
    b.resetPeakBytes();
    expect(b.peakBytes()).toBe(base);
  });

  it("the poison is real: a tensor read after its release is all NaN", async () => {
    const b = new TsBackend();
    process.env.MOE8_POISON = "1";
    const t = b.upload(Float32Array.of(1, 2, 3), [3]);
    const v = b.reshape(t, [3, 1]);
    t.dispose();
    expect(Array.from((await v.read()) as Float32Array).every(Number.isNaN)).toBe(true);
  });
});
