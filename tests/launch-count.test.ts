// How many kernel launches (and cuBLASLt calls) one training step of `small`'s shape issues on a
// Hopper GPU, and what the host's own work per step costs, measured without a GPU: the cuda
// backend runs against the fake addon of packages/kernels/test/fake-cuda.ts (the cuda dry run's),
// which counts the launches and checks each against the signature table. The counts are a ratchet for issue 18 (fewer, fused launches; one graph per step): a change
// that issues more launches fails here and must say why by raising the budget. The host times are
// printed, not asserted (machine-dependent): the JavaScript side of a step, which is all the host
// would do if the GPU were infinitely fast. Three layers (one dense, two MoE) keep it quick; a step
// of the eight-layer model issues about 1,761 (fp8) and 1,308 (bf16) launches. The optimiser's part
// is three launches whatever the number of parameters (the gradient norm two, AdamW one): before the
// multi-tensor kernels it was one per parameter for each, plus one (741 and 578 with three layers,
// 1,981 and 1,528 with eight).
import { presetPolicy } from "@moe8/fp8-core";
import { CONFIGS, DeepSeekModel, StepRunner, trainStep } from "@moe8/model";
import { ADAMW_DEFAULTS, AdamW } from "@moe8/optimizer";
import { type Backend, SINGLE_PROCESS } from "@moe8/tensor";
import { describe, expect, it, vi } from "vitest";
import { createFakeCuda } from "../packages/kernels/test/fake-cuda.ts";

// The cuda dry run's fake: it also checks every launch against the signature table.
const fake = createFakeCuda({ computeCapability: "9.0", misalign: false, lt: "ok" });
vi.mock("../packages/kernels/src/index.ts", async (original) => ({
  ...(await original<typeof import("../packages/kernels/src/index.ts")>()),
  loadNative: () => ({ loaded: true, reason: null, addon: fake.addon }),
}));
const { CudaBackend } = await import("../packages/kernels/src/cuda-backend.ts");

/**
 * The budget: launches per step of the three-layer model, as of this file's last change (q/k/v and
 * the logits stored as BF16 by their producers, MLA's backward concatenating instead of zeroing and
 * adding, a weight's codes and scales transposed together, RoPE in one pass: 532 -> 429 fp8,
 * 451 -> 428 bf16; RMSNorm's backward in two launches instead of three and adding into the
 * residual's and the norm weight's gradients itself, MLA's k and kv_b's gradient concatenated from
 * their sources' heads in place: 397 fp8, 396 bf16; the MoE combine adding the shared experts'
 * output and the residual, RoPE's table kept: 381 fp8, 380 bf16; the head's weight cast once for all
 * its chunks, the dense MLPs' gate|up stored in BF16 by their GEMM: 371 fp8, 367 bf16; the experts' output
 * gradient quantised by the combine's backward, every MLP's gate|up gradient by SwiGLU's: 364 fp8;
 * MLA's q and kv_b gradients by the inverse rotation and the concatenation: 358 fp8; each FP8
 * weight's transpose for its Dgrad written by the launch that quantises it: 333 fp8; each of those
 * producers (SwiGLU, RoPE, the concatenation) writing both quantised copies in one kernel: 322 fp8;
 * RMSNorm and SwiGLU's forward handing the next projection its FP8 input in the same kernel: 310 fp8).
 */
const BUDGET = { fp8: 310, bf16: 367 };

describe("launches per training step (small's shape, 3 layers, fake Hopper GPU)", () => {
  for (const precision of ["fp8", "bf16"] as const)
    it(`${precision}: at most ${BUDGET[precision]}`, async () => {
      const b = new CudaBackend() as Backend;
      const m = new DeepSeekModel(b, { ...CONFIGS.small, num_hidden_layers: 3 }, presetPolicy(precision), 1);
      const opt = new AdamW(b, m.params, ADAMW_DEFAULTS);
      const [B, T] = [8, 2048];
      const ids = b.upload(
        Int32Array.from({ length: B * T }, (_, i) => (i * 7) % 256),
        [B * T],
        "i32",
      );
      const targets = b.upload(
        Int32Array.from({ length: B * T }, (_, i) => (i * 5) % 256),
        [B * T],
        "i32",
      );
      const counts: number[] = [];
      const ms: number[] = [];
      for (let s = 0; s < 3; s++) {
        fake.launches = 0;
        const t0 = performance.now();
        await trainStep(m, opt, ids, targets, { batch: B, seq: T }, 1e-4);
        ms.push(performance.now() - t0);
        counts.push(fake.launches);
      }
      console.log(`${precision}: ${counts[2]} launches, host ${ms[2].toFixed(1)} ms per warm step`);
      // The first step also makes the tables kept for the backend's life (RoPE's cosines and sines).
      expect(counts[1], "every warm step issues the same launches").toBe(counts[2]);
      expect(counts[0], "the first step's one-time tables").toBeLessThanOrEqual(counts[1] + 4);
      expect(fake.problems, "launches the signature table refuses").toEqual([]);
      expect(counts[2]).toBeLessThanOrEqual(BUDGET[precision]);
      expect(counts[2], "the fake counted nothing").toBeGreaterThan(BUDGET[precision] / 2);
    }, 120_000);
});

/** small with `layers` layers and a graph-replaying StepRunner on the fake Hopper GPU, and a batch of `batch` x 2048. */
function graphRunner(layers: number, batch: number) {
  const b = new CudaBackend() as Backend;
  const m = new DeepSeekModel(b, { ...CONFIGS.small, num_hidden_layers: layers }, presetPolicy("fp8"), 1);
  const runner = new StepRunner(
    m,
    new AdamW(b, m.params, ADAMW_DEFAULTS),
    { batch, seq: 2048 },
    { graph: true },
  );
  const rows = {
    ids: Int32Array.from({ length: batch * 2048 }, (_, i) => (i * 7) % 256),
    targets: Int32Array.from({ length: batch * 2048 }, (_, i) => (i * 5) % 256),
  };
  return { b, m, runner, rows };
}

/** One step of `runner`: the launches it issued itself and the graph replays it enqueued. */
async function countedStep(runner: StepRunner, rows: { ids: Int32Array; targets: Int32Array }) {
  fake.launches = 0;
  fake.graphLaunches = 0;
  await runner.step(rows, 1e-4);
  return { launches: fake.launches, replays: fake.graphLaunches };
}

describe("the step replayed from a CUDA graph (small's shape, 3 layers, fake Hopper GPU)", () => {
  it("records the eager step's forward and backward once, then one replay and the update a step", async () => {
    const { m, runner, rows: batch } = graphRunner(3, 8);
    const issued: number[] = [];
    const host: number[] = [];
    for (let s = 0; s < 4; s++) {
      const c = await countedStep(runner, batch);
      issued.push(c.launches);
      host.push(runner.lastHostMs);
      expect(c.replays, `step ${s + 1}'s replays`).toBe(s === 0 ? 0 : 1);
    }
    const update = 1 + m.moeLayers.length; // AdamW, and each MoE layer's bias
    console.log(
      `graph: ${issued[0]} launches eager, then ${issued[3]} a replayed step; host ${host[3].toFixed(2)} ms per replayed step (eager ${host[0].toFixed(1)} ms)`,
    );
    expect([runner.captures, runner.replays]).toEqual([1, 3]);
    expect(issued.slice(1)).toEqual([update, update, update]);
    expect(issued[0], "the eager step issues the recorded work itself").toBeGreaterThan(BUDGET.fp8 / 2);
    expect(fake.problems).toEqual([]);
    // A step the graph cannot replay (FP8 range counts) runs uncaptured and keeps the graph.
    fake.launches = 0;
    await runner.step(batch, 1e-4, { fp8Stats: true });
    expect(fake.launches).toBeGreaterThan(issued[0] / 2);
    expect(runner.captures).toBe(1);
    // Router noise: recorded once more with the noise read from a table, which each step rewrites
    // (one upload a step, its seeds), then once more when the noise ends.
    const tables: string[] = [];
    for (const [scale, seed] of [
      [2, 11],
      [1.5, 12],
      [0, 0],
    ]) {
      fake.graphLaunches = 0;
      fake.uploads.clear();
      await runner.step(batch, 1e-4, scale > 0 ? { routerNoise: { scale, seed } } : {});
      expect(fake.graphLaunches).toBe(1);
      tables.push([...fake.uploads.values()].map((v) => new Int32Array(v.buffer).join()).join("|"));
    }
    expect(runner.captures).toBe(3);
    expect(tables[0]).not.toBe(tables[1]);
    expect(fake.problems).toEqual([]);
    runner.dispose();
  }, 120_000);

  it("profileReplayed times the recorded part inside a graph of its own, then the runner records again", async () => {
    const { b, runner, rows: batch } = graphRunner(2, 2);
    await countedStep(runner, batch); // eager (compiles and loads every kernel)
    const recorded = await countedStep(runner, batch); // records, replays, updates
    expect(runner.captures).toBe(1);
    fake.launches = 0;
    fake.graphLaunches = 0;
    const t = await runner.profileReplayed(batch, 2);
    expect(t).not.toBeNull();
    expect(fake.graphLaunches, "its own graph, replayed twice").toBe(2);
    expect(fake.launches, "nothing issued outside the graph").toBe(0);
    expect(fake.timing, "timing off again").toBe("off");
    // (The runner's graph and its outputs were dropped by the first call; a second call leaves as
    // many tensors as it found: the timed graph's outputs are released with it.)
    const live = b.stats().tensors;
    await runner.profileReplayed(batch, 1);
    expect(b.stats().tensors, "the timed graph's outputs released").toBe(live);
    const launches = t!.kernels.reduce((n, k) => n + k.launches, 0);
    expect(t!.nodes, "every recorded launch timed once a replay").toBe(launches);
    expect(launches).toBeGreaterThan(100);
    expect(t!.kernels.some((k) => k.name.startsWith("gemm_sm90.gemm_sm90_fp8_wgrad_"))).toBe(true);
    expect(t!.busyMs).toBeCloseTo(launches / 1000, 6); // the fake's 1 us a launch
    // The runner's own graph was dropped: the next step records it again and replays it.
    const c = await countedStep(runner, batch);
    expect([runner.captures, c.replays]).toEqual([2, 1]);
    expect(c.launches, "the update's launches, as after the first recording").toBe(recorded.launches);
    // Uncaptured timing still refuses a recording (bench --profile's step runs uncaptured).
    fake.addon.cudaKernelTiming(true);
    expect(() => b.captureGraph!(() => null)).toThrow(/timing is on/);
    fake.addon.cudaKernelTiming(false);
    expect(fake.problems).toEqual([]);
    runner.dispose();
  }, 120_000);

  it("a recording that fails leaves the run going uncaptured, with the reason", async () => {
    const { b, runner, rows: batch } = graphRunner(2, 2);
    const live = b.stats().tensors;
    fake.failCaptureEnd = true;
    const errors = vi.spyOn(console, "error").mockImplementation(() => {});
    try {
      const launches: number[] = [];
      for (let s = 0; s < 3; s++) {
        const c = await countedStep(runner, batch);
        launches.push(c.launches);
        expect(c.replays).toBe(0);
      }
      expect(runner.graphError).toMatch(/STREAM_CAPTURE_INVALIDATED/);
      expect(errors).toHaveBeenCalledTimes(1);
      expect([runner.captures, runner.replays]).toEqual([0, 0]);
      expect(launches[2], "uncaptured steps issue their launches themselves").toBe(launches[1]);
    } finally {
      fake.failCaptureEnd = false;
      errors.mockRestore();
      runner.dispose();
    }
    expect(b.stats().tensors, "the failed recording's outputs were released").toBe(live);
  }, 120_000);
});

describe("the optimiser's launches (tiny's shape, fake Hopper GPU)", () => {
  it("the gradient norm in two launches and AdamW in one, for any number of parameters", async () => {
    const b = new CudaBackend() as Backend;
    for (const layers of [1, 4])
      for (const shard of [null, { rank: 1, size: 2 }]) {
        const m = new DeepSeekModel(
          b,
          { ...CONFIGS.tiny, num_hidden_layers: layers },
          presetPolicy("fp8"),
          1,
        );
        const opt = new AdamW(b, m.params, ADAMW_DEFAULTS, shard);
        fake.launches = 0;
        // Sharded: the shard's norm in two launches, then the ranks' norms combined by the clip
        // op's two (the vector's zeroing and row copy are memory operations, not kernels; the
        // all-reduce is the group's, a no-op double here).
        const group = { ...SINGLE_PROCESS, rank: 1, size: 2 };
        const { scale } = shard ? await opt.shardedGradNorm(group) : opt.gradNorm();
        const norm = fake.launches;
        fake.launches = 0;
        opt.update(1e-4, scale);
        const what = shard ? ", ZeRO-1 rank 1 of 2" : "";
        console.log(
          `${m.params.length} parameters${what}: gradient norm ${norm} launches, AdamW ${fake.launches}`,
        );
        expect([norm, fake.launches]).toEqual([shard ? 2 + 2 : 2, 1]);
        opt.dispose();
      }
  });
});
