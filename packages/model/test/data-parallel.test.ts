// Data parallelism's arithmetic, with 2 and 4 ranks simulated in one process (localGroup):
// each rank trains a replica on its slice of the same global batch, and the step sums gradients,
// losses and expert loads over the ranks. Against one rank training the whole batch: the per-step
// losses and gradient norms agree to f32 re-association (the batch's mean is summed in another
// order), the first step's expert loads exactly, and the replicas never drift apart (every rank
// holds the same bits). fp32, so that no quantisation group spans two ranks' rows (under fp8 the
// 128-token column tiles of Wgrad would). With the optimiser state sharded (ZeRO-1) the run is the
// same bit for bit, and each rank holds its share of the state.
import { presetPolicy } from "@moe8/fp8-core";
import { ADAMW_DEFAULTS, AdamW } from "@moe8/optimizer";
import { type Backend, type Collectives, SINGLE_PROCESS, TsBackend } from "@moe8/tensor";
import { localGroup } from "@moe8/tensor/testing";
import { describe, expect, it } from "vitest";
import { DeepSeekModel } from "../src/model.ts";
import { trainStep } from "../src/train-step.ts";
import { batchOf, MICRO } from "./helpers.ts";

const BATCH = 8;
const SEQ = 8;
const STEPS = 3;

interface Run {
  losses: number[];
  norms: number[];
  loads: number[][][];
  weights: Float32Array[];
  /** Optimiser state elements this rank holds. */
  state: number;
}

/** `ranks` replicas, each on its own backend, training STEPS steps on their slices of one batch. */
async function train(ranks: number, accum = 1, zero1 = false): Promise<Run[]> {
  const group: Collectives[] = ranks === 1 ? [SINGLE_PROCESS] : localGroup(ranks);
  const replicas = group.map((g) => {
    const b: Backend = new TsBackend();
    const model = new DeepSeekModel(b, MICRO, presetPolicy("fp32"), 11);
    const opt = new AdamW(b, model.params, ADAMW_DEFAULTS, zero1 ? { rank: g.rank, size: g.size } : null);
    const run: Run = { losses: [], norms: [], loads: [], weights: [], state: opt.stateElements };
    return { g, b, model, opt, run };
  });
  const rows = (BATCH / ranks) * SEQ;
  for (let s = 0; s < STEPS; s++)
    await Promise.all(
      replicas.map(async ({ g, b, model, opt, run }) => {
        const all = batchOf(b, MICRO, BATCH, SEQ, 100 + s);
        const ids = b.rows(all.ids, g.rank * rows, rows);
        const targets = b.rows(all.targets, g.rank * rows, rows);
        const shape = { batch: BATCH / ranks, seq: SEQ };
        const r = await trainStep(model, opt, ids, targets, shape, 1e-2, { collectives: g, accum });
        run.losses.push(r.loss);
        run.norms.push(r.gradNorm);
        run.loads.push(r.load.map((l) => l.counts));
      }),
    );
  for (const { model, run } of replicas)
    for (const p of model.params) run.weights.push(((await p.value.read()) as Float32Array).slice());
  return replicas.map((r) => r.run);
}

function maxRelDiff(a: number[], b: number[]): number {
  return Math.max(...a.map((x, i) => Math.abs(x - b[i]) / Math.abs(b[i])));
}

describe("data parallel: ranks summed through the collectives", () => {
  it("2 and 4 ranks train as 1 rank on the whole batch, and the replicas stay identical", async () => {
    const [one] = await train(1);
    for (const [ranks, accum] of [
      [2, 1],
      [4, 1],
      [2, 2],
    ] as const) {
      const runs = await train(ranks, accum);
      const what = `${ranks} ranks, ${accum} micro-batches`;
      // Every rank reports the same numbers and holds the same weights, bit for bit.
      for (const r of runs.slice(1)) {
        expect(r.losses, what).toEqual(runs[0].losses);
        expect(r.norms, what).toEqual(runs[0].norms);
        r.weights.forEach((w, i) => {
          expect(w, `${what}: parameter ${i}`).toEqual(runs[0].weights[i]);
        });
      }
      // Against one rank: the same step up to the order of the f32 sums. AdamW's first steps divide
      // each gradient by its own magnitude, so an element whose gradient is near 0 (~1e-8 here)
      // moves by an amount that depends on those last bits: the third step's norm differs by ~2e-4.
      expect(maxRelDiff(runs[0].losses, one.losses), what).toBeLessThan(1e-5);
      expect(maxRelDiff(runs[0].norms, one.norms), what).toBeLessThan(5e-4);
      expect(runs[0].loads[0], what).toEqual(one.loads[0]);
    }
  }, 120_000);

  it("ZeRO-1: each rank holds about 1/N of the optimiser state and training is bit for bit the same", async () => {
    const [one] = await train(1);
    for (const ranks of [2, 4]) {
      const plain = await train(ranks);
      const sharded = await train(ranks, 1, true);
      for (const r of sharded) {
        expect(r.losses).toEqual(plain[0].losses);
        expect(r.norms).toEqual(plain[0].norms);
        r.weights.forEach((w, i) => {
          expect(w, `${ranks} ranks: parameter ${i}`).toEqual(plain[0].weights[i]);
        });
      }
      // The shards partition the state: together the whole, each within one parameter of 1/N.
      const states = sharded.map((r) => r.state);
      expect(states.reduce((a, x) => a + x, 0)).toBe(one.state);
      const largest = 2 * Math.max(...one.weights.map((w) => w.length));
      for (const st of states) expect(Math.abs(st - one.state / ranks)).toBeLessThanOrEqual(largest);
    }
  }, 120_000);

  it("a rank that passes other tensors is an error, not a hang", async () => {
    const [a, b] = localGroup(2);
    const be = new TsBackend();
    const results = await Promise.allSettled([
      a.allReduceSum([be.zeros([4])]),
      b.allReduceSum([be.zeros([5])]),
    ]);
    expect(results.some((r) => r.status === "rejected")).toBe(true);
  });
});
