// The cpu backend's buffer pool (packages/kernels/src/cpu-pool.ts) under real training steps: once
// warm, a step takes every buffer it needs from the pool (no new memory from the OS), and a buffer
// handed back is never still in use (poisoned released storage changes no number, now that released
// memory is really reused).
import { presetPolicy } from "@moe8/fp8-core";
import { availableBackends, CpuBackend } from "@moe8/kernels";
import { CONFIGS, DeepSeekModel, type ModelConfig, trainStep } from "@moe8/model";
import { ADAMW_DEFAULTS, AdamW } from "@moe8/optimizer";
import { Rng } from "@moe8/tensor";
import { afterEach, describe, expect, it } from "vitest";

const CFG: ModelConfig = {
  ...CONFIGS.tiny,
  vocab_size: 64,
  hidden_size: 32,
  num_hidden_layers: 2,
  num_attention_heads: 2,
  kv_lora_rank: 16,
  intermediate_size: 64,
  moe_intermediate_size: 16,
  n_routed_experts: 4,
  num_experts_per_tok: 2,
};
const B = 4;
const T = 48;

/** A cpu model and optimiser, and a function running one step on fresh random tokens. */
function session(preset: string) {
  const b = new CpuBackend();
  const m = new DeepSeekModel(b, CFG, presetPolicy(preset), 3);
  const opt = new AdamW(b, m.params, { ...ADAMW_DEFAULTS, moments: "bf16" });
  const rng = new Rng(11);
  const step = async () => {
    const ids = b.upload(rng.ints(B * T, CFG.vocab_size), [B * T], "i32");
    const tg = b.upload(rng.ints(B * T, CFG.vocab_size), [B * T], "i32");
    const r = await trainStep(m, opt, ids, tg, { batch: B, seq: T }, 1e-2);
    ids.dispose();
    tg.dispose();
    return r;
  };
  return { b, m, step };
}

describe.runIf(availableBackends().includes("cpu"))("cpu buffer pool in training steps", () => {
  afterEach(() => {
    delete process.env.MOE8_POISON;
  });

  for (const preset of ["fp8", "bf16", "fp32"])
    it(`${preset}: a warm step allocates nothing new`, async () => {
      const { b, step } = session(preset);
      await step();
      await step();
      const warm = b.poolStats();
      const live = b.stats();
      for (let i = 0; i < 3; i++) await step();
      const after = b.poolStats();
      expect(after.misses, "pool misses in steady-state steps").toBe(warm.misses);
      expect(after.ownedBytes).toBe(warm.ownedBytes);
      // The steps did take their buffers from the pool (over a hundred per step in every preset).
      expect(after.hits - warm.hits).toBeGreaterThan(3 * 100);
      expect(b.stats()).toEqual(live);
    });

  it("a fresh backend's first step misses: the counters see real allocations", async () => {
    const { b, step } = session("fp8");
    const before = b.poolStats();
    await step();
    expect(b.poolStats().misses).toBeGreaterThan(before.misses);
  });

  it("poisoned released storage changes no loss or weight (no buffer is used after release)", async () => {
    const run = async () => {
      const { m, step } = session("fp8");
      const out: number[] = [];
      for (let s = 0; s < 3; s++) {
        const r = await step();
        out.push(r.loss, r.totalLoss, r.gradNorm);
      }
      for (const p of m.params) out.push(...((await p.value.read()) as Float32Array));
      return out;
    };
    const clean = await run();
    process.env.MOE8_POISON = "1";
    const poisoned = await run();
    expect(poisoned.every(Number.isFinite)).toBe(true);
    expect(poisoned).toEqual(clean);
  });
});
