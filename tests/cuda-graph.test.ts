// The training step replayed from a CUDA graph (packages/model/src/step-runner.ts) computes what the
// uncaptured step computes, bit for bit: the same losses and gradient norms every step and the same
// weights after them, through steps the graph cannot replay (FP8 range counts) and a re-recording
// (a tensor made after the recording held across a step) and router noise (each step's seeds and
// width read from a table the runner rewrites). Runs where a GPU is present (skipped
// elsewhere, unless MOE8_REQUIRE_CUDA=1, which makes a missing GPU a failure): the GPU session
// script runs it (scripts/gpu-sm90.sh, step `graph-test`); tests/launch-count.test.ts checks the
// host side without a GPU.
import { createHash } from "node:crypto";
import { presetPolicy } from "@moe8/fp8-core";
import { CudaBackend, loadNative } from "@moe8/kernels";
import { CONFIGS, DeepSeekModel, type ModelConfig, StepRunner } from "@moe8/model";
import { ADAMW_DEFAULTS, AdamW } from "@moe8/optimizer";
import { type Backend, Rng } from "@moe8/tensor";
import { describe, expect, it } from "vitest";

function cudaReason(): string | null {
  const s = loadNative();
  if (!s.addon) return `native addon not loaded: ${s.reason}`;
  if (typeof s.addon.cudaInfo !== "function") return "addon built without CUDA";
  const i = s.addon.cudaInfo();
  return i.available ? null : (i.reason ?? "CUDA unavailable");
}
const reason = cudaReason();
if (reason && process.env.MOE8_REQUIRE_CUDA === "1") throw new Error(`MOE8_REQUIRE_CUDA=1: ${reason}`);

/** Losses, norms and final weights of `steps` steps of one runner, from seed 3. */
async function run(b: Backend, cfg: ModelConfig, shape: { batch: number; seq: number }, graph: boolean) {
  const model = new DeepSeekModel(b, cfg, presetPolicy("fp8"), 3);
  const opt = new AdamW(b, model.params, ADAMW_DEFAULTS);
  const runner = new StepRunner(model, opt, shape, { graph });
  const rng = new Rng(11);
  const n = shape.batch * shape.seq;
  const out: number[][] = [];
  let held = null;
  for (let step = 1; step <= 8; step++) {
    const batch = { ids: rng.ints(n, cfg.vocab_size), targets: rng.ints(n, cfg.vocab_size) };
    // Step 4 logs FP8 range counts (uncaptured); a tensor made before step 5 is held across it;
    // steps 7 and 8 have router noise (recorded again, the noise's seeds and width read from a table).
    if (step === 5) held = b.keep(b.zeros([n], "f32"));
    const routerNoise = step >= 7 ? { scale: 3 - step / 4, seed: 1000 + step } : undefined;
    const r = await runner.step(batch, 1e-3 * step, { fp8Stats: step === 4, routerNoise });
    out.push([r.loss, r.totalLoss, r.gradNorm]);
  }
  held?.dispose();
  // Each parameter's bytes by digest (small's are ~100 million values).
  const weights = await Promise.all(
    model.params.map(async (p) => {
      const v = (await p.value.read()) as Float32Array;
      return createHash("sha256")
        .update(new Uint8Array(v.buffer, v.byteOffset, v.byteLength))
        .digest("hex");
    }),
  );
  const counts = { captures: runner.captures, replays: runner.replays };
  runner.dispose();
  opt.dispose();
  model.dispose();
  return { out, weights, counts };
}

describe.skipIf(reason !== null)("the step replayed from a CUDA graph equals the uncaptured step", () => {
  const cases: [string, ModelConfig, { batch: number; seq: number }][] = [
    ["tiny", CONFIGS.tiny, { batch: 4, seq: 128 }],
    ["small, 2 layers", { ...CONFIGS.small, num_hidden_layers: 2 }, { batch: 2, seq: 2048 }],
  ];
  for (const [name, cfg, shape] of cases)
    it(name, async () => {
      const b = new CudaBackend();
      const eager = await run(b, cfg, shape, false);
      const graphed = await run(b, cfg, shape, true);
      expect(eager.counts).toEqual({ captures: 0, replays: 0 });
      // Step 1 uncaptured, steps 2-3 replayed (2 recorded), 4 uncaptured, 5 re-recorded (the held
      // tensor may sit in the graph's memory) or replayed, 6 replayed, 7 recorded with noise, 8 replayed.
      expect(graphed.counts.replays).toBe(6);
      expect(graphed.out).toEqual(eager.out);
      expect(graphed.weights).toEqual(eager.weights);
    }, 300_000);
});
