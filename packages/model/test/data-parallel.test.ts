// Data parallelism's arithmetic, with 2 and 4 ranks simulated in one process (localGroup):
// each rank trains a replica on its slice of the same global batch, and the step sums gradients,
// losses and expert loads over the ranks. Against one rank training the whole batch: the per-step
// losses and gradient norms agree to f32 re-association (the batch's mean is summed in another
// order), the first step's expert loads exactly, and the replicas never drift apart (every rank
// holds the same bits). fp32, so that no quantisation group spans two ranks' rows (under fp8 the
// 128-token column tiles of Wgrad would). With the optimiser state sharded (ZeRO-1: gradients
// reduced to their owners, the global norm assembled from the shards' norms) the run is the same up
// to that norm's re-association, the replicas again identical, and each rank holds its share of the
// state.
import { presetPolicy } from "@moe8/fp8-core";
import { ADAMW_DEFAULTS, AdamW } from "@moe8/optimizer";
import {
  type Backend,
  type Collectives,
  type Param,
  SINGLE_PROCESS,
  type Tensor,
  TsBackend,
} from "@moe8/tensor";
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
  /** The MTP loss of each step (multi-token prediction only). */
  mtpLosses: number[];
  norms: number[];
  loads: number[][][];
  weights: Float32Array[];
  /** Optimiser state elements this rank holds. */
  state: number;
  /** The whole group's optimiser state after the last step (AdamW.gatherState). */
  gathered: Map<string, Float32Array>;
  /** The model's checkpoint tensors after the last step (the balancing biases too). */
  dict: Map<string, { shape: number[]; data: Float32Array }>;
}

/** Where a run starts over from, as a checkpoint holds it: model tensors, optimiser state, step. */
interface Start {
  dict: Map<string, { shape: number[]; data: Float32Array }>;
  state: Map<string, Float32Array>;
  step: number;
}

/**
 * `ranks` replicas, each on its own backend, training steps `first` .. `first + steps - 1` (batch 100
 * + step) on their slices of one batch, from the seed's initialisation or from `start`.
 */
async function train(
  ranks: number,
  accum = 1,
  zero1 = false,
  start: Start | null = null,
  first = 0,
  steps = STEPS,
  noise = 0,
  expertParallel: boolean | number = false,
  cfg = MICRO,
): Promise<Run[]> {
  const group: Collectives[] = ranks === 1 ? [SINGLE_PROCESS] : localGroup(ranks);
  // Expert parallelism over P < ranks: expert groups of P consecutive ranks, and each rank's
  // replicas (the ranks holding its experts) split off the group, as the trainer does.
  const P = expertParallel === true ? ranks : expertParallel === false ? 1 : expertParallel;
  const groups = await Promise.all(
    group.map(async (g) =>
      P === 1
        ? {}
        : P === ranks
          ? { expertGroup: g }
          : { expertGroup: await g.split(Math.floor(g.rank / P)), expertReplicas: await g.split(g.rank % P) },
    ),
  );
  const replicas = group.map((g, q) => {
    const b: Backend = new TsBackend();
    const model = new DeepSeekModel(b, cfg, presetPolicy("fp32"), 11, groups[q]);
    const opt = new AdamW(
      b,
      model.params,
      ADAMW_DEFAULTS,
      zero1 ? { rank: g.rank, size: g.size } : null,
      model.expertSplit,
    );
    if (start) {
      model.loadStateDict((n) => start.dict.get(n));
      opt.loadState(start.step, (n) => start.state.get(n));
    }
    const run: Run = {
      ...{ losses: [], mtpLosses: [], norms: [], loads: [], weights: [], state: opt.stateElements },
      ...{ gathered: new Map(), dict: new Map() },
    };
    return { g, b, model, opt, run };
  });
  const rows = (BATCH / ranks) * SEQ;
  for (let s = first; s < first + steps; s++)
    await Promise.all(
      replicas.map(async ({ g, b, model, opt, run }) => {
        const all = batchOf(b, cfg, BATCH, SEQ, 100 + s);
        const ids = b.rows(all.ids, g.rank * rows, rows);
        const targets = b.rows(all.targets, g.rank * rows, rows);
        const shape = { batch: BATCH / ranks, seq: SEQ };
        const routerNoise = noise > 0 ? { scale: noise, seed: 7919 * (s + 1) } : undefined;
        const r = await trainStep(model, opt, ids, targets, shape, 1e-2, {
          collectives: g,
          accum,
          routerNoise,
        });
        run.losses.push(r.loss);
        if (r.mtpLoss !== undefined) run.mtpLosses.push(r.mtpLoss);
        run.norms.push(r.gradNorm);
        run.loads.push(r.load.map((l) => l.counts));
      }),
    );
  for (const { model, run } of replicas)
    for (const p of model.params) run.weights.push(((await p.value.read()) as Float32Array).slice());
  await Promise.all(
    replicas.map(async ({ g, model, opt, run }) => {
      run.gathered = await opt.gatherState(g);
      run.dict = await model.stateDict();
    }),
  );
  return replicas.map((r) => r.run);
}

/** The model's parameter count (tensors), from a replica. */
const MICRO_PARAMS = () => new DeepSeekModel(new TsBackend(), MICRO, presetPolicy("fp32"), 11).params.length;

function maxRelDiff(a: number[], b: number[]): number {
  return Math.max(...a.map((x, i) => Math.abs(x - b[i]) / Math.abs(b[i])));
}

/** The largest element difference of two tensors over the largest magnitude of the second. */
function tensorRelDiff(a: Float32Array, b: Float32Array): number {
  expect(a.length).toBe(b.length);
  let d = 0;
  let m = 0;
  for (let i = 0; i < b.length; i++) {
    d = Math.max(d, Math.abs(a[i] - b[i]));
    m = Math.max(m, Math.abs(b[i]));
  }
  return d / Math.max(m, 1e-30);
}

/** The Frobenius norm of the difference of two tensors over the second's. */
function frobeniusRelDiff(a: Float32Array, b: Float32Array): number {
  let d = 0;
  let n = 0;
  for (let i = 0; i < b.length; i++) {
    d += (a[i] - b[i]) ** 2;
    n += b[i] ** 2;
  }
  return Math.sqrt(d / Math.max(n, 1e-30));
}

/** Every rank of a run holds the same numbers and weights, bit for bit. */
function expectReplicasIdentical(runs: Run[], what: string) {
  for (const r of runs.slice(1)) {
    expect(r.losses, what).toEqual(runs[0].losses);
    expect(r.norms, what).toEqual(runs[0].norms);
    r.weights.forEach((w, i) => {
      expect(w, `${what}: parameter ${i}`).toEqual(runs[0].weights[i]);
    });
  }
}

/** Which of the model's parameters (in order) are stacked expert weights. */
function expertFlags(): boolean[] {
  const whole = new DeepSeekModel(new TsBackend(), MICRO, presetPolicy("fp32"), 11);
  const isExpert = whole.params.map((p) => /\.mlp\.experts\./.test(p.name));
  expect(isExpert.some((x) => x)).toBe(true);
  return isExpert;
}

/**
 * A run with the experts split over expert groups of P ranks against one process's: the losses and
 * norms to f32 re-association and the same on every rank, the replicated weights the same on every
 * rank and one process's within 1e-3, rank q's experts slice q % P of one process's within 1e-3.
 */
function expectExpertsSplitAsOne(runs: Run[], one: Run, isExpert: boolean[], P: number, what: string) {
  expect(maxRelDiff(runs[0].losses, one.losses), what).toBeLessThan(1e-5);
  expect(maxRelDiff(runs[0].norms, one.norms), what).toBeLessThan(5e-4);
  for (const r of runs) {
    expect(r.losses, what).toEqual(runs[0].losses);
    expect(r.norms, what).toEqual(runs[0].norms);
  }
  runs.forEach((r, q) => {
    r.weights.forEach((w, i) => {
      if (!isExpert[i]) {
        expect(w, `${what}: parameter ${i}`).toEqual(runs[0].weights[i]);
        expect(tensorRelDiff(w, one.weights[i]), `${what}: parameter ${i}`).toBeLessThan(1e-3);
        return;
      }
      const n = one.weights[i].length / P;
      const s = q % P;
      expect(w.length).toBe(n);
      expect(
        tensorRelDiff(w, one.weights[i].slice(s * n, (s + 1) * n)),
        `${what}: rank ${q}, parameter ${i}`,
      ).toBeLessThan(1e-3);
    });
  });
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
      expectReplicasIdentical(runs, what);
      // Against one rank: the same step up to the order of the f32 sums. AdamW's first steps divide
      // each gradient by its own magnitude, so an element whose gradient is near 0 (~1e-8 here)
      // moves by an amount that depends on those last bits: the third step's norm differs by ~2e-4.
      expect(maxRelDiff(runs[0].losses, one.losses), what).toBeLessThan(1e-5);
      expect(maxRelDiff(runs[0].norms, one.norms), what).toBeLessThan(5e-4);
      expect(runs[0].loads[0], what).toEqual(one.loads[0]);
    }
  }, 120_000);

  // Router noise is drawn by each token's index in the step's whole batch: ranks and micro-batches
  // route every token as one pass over the batch does.
  it("router noise: 2 and 4 ranks and micro-batches train as 1 rank, and the noise changes the run", async () => {
    const [plain] = await train(1);
    const [one] = await train(1, 1, false, null, 0, STEPS, 1.5);
    expect(maxRelDiff(one.losses, plain.losses)).toBeGreaterThan(1e-4);
    expect(one.loads[0]).not.toEqual(plain.loads[0]);
    for (const [ranks, accum] of [
      [1, 2],
      [2, 1],
      [4, 2],
    ] as const) {
      const runs = await train(ranks, accum, false, null, 0, STEPS, 1.5);
      const what = `${ranks} ranks, ${accum} micro-batches`;
      expect(maxRelDiff(runs[0].losses, one.losses), what).toBeLessThan(1e-5);
      expect(maxRelDiff(runs[0].norms, one.norms), what).toBeLessThan(5e-4);
      expect(runs[0].loads[0], what).toEqual(one.loads[0]);
    }
  }, 120_000);

  it("ZeRO-1: each rank holds about 1/N of the optimiser state and trains as the unsharded ranks do", async () => {
    const [one] = await train(1);
    for (const ranks of [2, 4]) {
      const plain = await train(ranks);
      const sharded = await train(ranks, 1, true);
      const what = `${ranks} ranks sharded`;
      expectReplicasIdentical(sharded, what);
      // The first step's loss comes before any update: the same bits. The rest differ only by the
      // norm's sum of squares taken shard by shard (the clip factor's last bits).
      expect(sharded[0].losses[0], what).toBe(plain[0].losses[0]);
      expect(maxRelDiff(sharded[0].losses, plain[0].losses), what).toBeLessThan(1e-5);
      expect(maxRelDiff(sharded[0].norms, plain[0].norms), what).toBeLessThan(5e-4);
      expect(maxRelDiff(sharded[0].norms, one.norms), what).toBeLessThan(5e-4);
      sharded[0].weights.forEach((w, i) => {
        expect(tensorRelDiff(w, plain[0].weights[i]), `${what}: parameter ${i}`).toBeLessThan(1e-3);
      });
      // The shards partition the state: together the whole, each within one parameter of 1/N.
      const states = sharded.map((r) => r.state);
      expect(states.reduce((a, x) => a + x, 0)).toBe(one.state);
      const largest = 2 * Math.max(...one.weights.map((w) => w.length));
      for (const st of states) expect(Math.abs(st - one.state / ranks)).toBeLessThanOrEqual(largest);
    }
  }, 120_000);

  it("ZeRO-1's state gathers into one checkpoint that resumes under another number of ranks", async () => {
    // 2 ranks sharded: every rank gathers the whole state (the same bits on both), the unsharded
    // run's up to the clip factor's last bits (an expert's second moment moves more where those bits
    // flip a token's routing: compared as a whole, not element by element).
    const plain = await train(2);
    const sharded = await train(2, 1, true);
    const whole = (r: Run) => [...r.gathered.entries()].sort(([a], [b]) => a.localeCompare(b));
    expect(plain[0].gathered.size).toBe(2 * MICRO_PARAMS());
    expect(whole(sharded[1])).toEqual(whole(sharded[0]));
    for (const [name, v] of whole(sharded[0]))
      expect(frobeniusRelDiff(v, plain[0].gathered.get(name)!), name).toBeLessThan(1e-2);
    // Resumed from it for two more steps: sharded or not, 2 or 4 ranks, as 2 plain ranks carrying
    // on from it (the first step's loss bit for bit under the same rank count; to f32
    // re-association else). And the unsharded run resumed from its own checkpoint is the run that
    // never stopped, bit for bit.
    const start: Start = { dict: sharded[0].dict, state: sharded[0].gathered, step: STEPS };
    const fromPlain: Start = { dict: plain[0].dict, state: plain[0].gathered, step: STEPS };
    const go = (ranks: number, zero1: boolean, from = start) => train(ranks, 1, zero1, from, STEPS, 2);
    const on = await train(2, 1, false, null, 0, STEPS + 2);
    const [resumed, two, twoSharded, four, fourSharded] = await Promise.all([
      go(2, false, fromPlain),
      go(2, false),
      go(2, true),
      go(4, false),
      go(4, true),
    ]);
    expect(resumed[0].losses).toEqual(on[0].losses.slice(STEPS));
    expect(resumed[0].weights).toEqual(on[0].weights);
    expectReplicasIdentical(twoSharded, "2 ranks sharded, resumed");
    expectReplicasIdentical(fourSharded, "4 ranks sharded, resumed");
    expect(twoSharded[0].losses[0]).toBe(two[0].losses[0]);
    expect(fourSharded[0].losses[0]).toBe(four[0].losses[0]);
    for (const [runs, base] of [
      [twoSharded, two],
      [fourSharded, four],
      [four, two],
    ] as const) {
      expect(maxRelDiff(runs[0].losses, base[0].losses)).toBeLessThan(1e-5);
      runs[0].weights.forEach((w, i) => {
        expect(tensorRelDiff(w, base[0].weights[i]), `parameter ${i}`).toBeLessThan(1e-3);
      });
    }
  }, 120_000);

  // The buckets a data-parallel step starts reducing during the backward pass: every parameter in
  // exactly one, each handed over only once its gradient is final (the values at the call are the
  // values after the whole backward pass), in the order the backward pass finishes them.
  it("gradient buckets: every parameter once, each final when handed over", async () => {
    const b = new TsBackend();
    const model = new DeepSeekModel(b, MICRO, presetPolicy("fp32"), 11);
    const flat = model.gradBuckets.flat();
    expect(new Set(flat).size).toBe(flat.length);
    expect(new Set(flat)).toEqual(new Set(model.params));
    const { ids, targets } = batchOf(b, MICRO, BATCH, SEQ, 100);
    const seen: { params: Param[]; grads: Tensor[] }[] = [];
    for (const p of model.params) p.zeroGrad();
    // A copy made at the call holds the gradient as of then, in stream order on any backend.
    model.lossAndGrad(ids, targets, { batch: BATCH, seq: SEQ }, 1, (params) => {
      seen.push({ params, grads: params.map((p) => b.copy(p.grad)) });
    });
    expect(seen.map((x) => x.params)).toEqual(model.gradBuckets);
    for (const { params, grads } of seen)
      for (const [i, p] of params.entries()) {
        const now = (await p.grad.read()) as Float32Array;
        expect(await grads[i].read(), p.name).toEqual(now);
        expect(now.some((v) => v !== 0)).toBe(true);
      }
  });

  // Expert parallelism over the data-parallel group: each rank trains on its slice of the batch and
  // holds a quarter (half) of every MoE layer's experts; tokens travel to their experts' ranks and
  // back. Against one process: the same losses and norms to f32 re-association, the replicated
  // weights the same on every rank and the experts' weights the matching slices of one process's.
  it("expert parallel: 2 and 4 ranks train as 1 rank, each holding its slice of the experts", async () => {
    const [one] = await train(1);
    const isExpert = expertFlags();
    for (const [ranks, accum, zero1] of [
      [2, 1, false],
      [4, 1, false],
      [2, 2, false],
      [2, 1, true],
      [4, 2, true],
    ] as const) {
      const runs = await train(ranks, accum, zero1, null, 0, STEPS, 0, true);
      const what = `${ranks} ranks, ${accum} micro-batches, expert parallel${zero1 ? ", ZeRO-1" : ""}`;
      expect(runs[0].losses[0], what).toBe(one.losses[0]);
      expectExpertsSplitAsOne(runs, one, isExpert, ranks, what);
    }
  }, 120_000);

  // The checkpoint of an expert-parallel run: every rank's stateDict is the whole model as one
  // process names it (each rank's experts gathered), and a whole model's dict loads into the ranks,
  // each taking its own experts.
  it("expert parallel: the state dict gathers every rank's experts, and loads back into the ranks", async () => {
    const [one] = await train(1);
    // (With ZeRO-1 too: the replicated parameters' moments sharded, the experts' split.)
    const runs = await train(2, 1, true, null, 0, STEPS, 0, true);
    const names = [...one.dict.keys()];
    for (const r of runs) {
      expect([...r.dict.keys()]).toEqual(names);
      for (const n of names) {
        expect(r.dict.get(n)!.data, n).toEqual(runs[0].dict.get(n)!.data);
        expect(tensorRelDiff(r.dict.get(n)!.data, one.dict.get(n)!.data), n).toBeLessThan(1e-3);
      }
    }
    // One process's dict loaded into 2 ranks: each holds its slice, and their dict is the same dict.
    const back = await Promise.all(
      localGroup(2).map(async (g) => {
        const m = new DeepSeekModel(new TsBackend(), MICRO, presetPolicy("fp32"), 5, { expertGroup: g });
        m.loadStateDict((n) => one.dict.get(n));
        return m.stateDict();
      }),
    );
    for (const d of back) for (const n of names) expect(d.get(n)!.data, n).toEqual(one.dict.get(n)!.data);
    // The optimiser's moments the same way: gathered whole (every rank the same), and resumed from
    // one process's checkpoint under 2 ranks, the run goes on as one process's does.
    const moments = [...one.gathered.keys()].sort();
    for (const r of runs) {
      expect([...r.gathered.keys()].sort()).toEqual(moments);
      for (const n of moments) {
        expect(r.gathered.get(n), n).toEqual(runs[0].gathered.get(n));
        expect(frobeniusRelDiff(r.gathered.get(n)!, one.gathered.get(n)!), n).toBeLessThan(1e-2);
      }
    }
    const start: Start = { dict: one.dict, state: one.gathered, step: STEPS };
    const [on] = await train(1, 1, false, null, 0, STEPS + 2);
    const resumed = await train(2, 1, false, start, STEPS, 2, 0, true);
    expect(resumed[0].losses[0]).toBeCloseTo(on.losses[STEPS], 5);
    expect(maxRelDiff(resumed[0].losses, on.losses.slice(STEPS))).toBeLessThan(1e-5);
  }, 60_000);

  // Expert parallelism over part of the ranks (expert groups x data-parallel replicas): 4 ranks in
  // two expert groups of 2, each rank holding half of the experts, its tokens travelling within its
  // expert group only, the experts' gradients summed over the two groups. Against one process, as
  // above; and every rank's experts the same bits as its replica's in the other group.
  it("expert parallel over part of the ranks: 4 ranks in 2 expert groups train as 1 rank", async () => {
    const [one] = await train(1);
    const isExpert = expertFlags();
    for (const [accum, zero1] of [
      [1, false],
      [2, true],
    ] as const) {
      const runs = await train(4, accum, zero1, null, 0, STEPS, 0, 2);
      const what = `4 ranks, expert groups of 2, ${accum} micro-batches${zero1 ? ", ZeRO-1" : ""}`;
      expectExpertsSplitAsOne(runs, one, isExpert, 2, what);
      expect(runs[0].loads[0], what).toEqual(one.loads[0]);
      // Rank q's experts: the same bits as its replica q ^ 2's in the other group.
      runs.forEach((r, q) => {
        r.weights.forEach((w, i) => {
          if (isExpert[i]) expect(w, `${what}: rank ${q}, parameter ${i}`).toEqual(runs[q ^ 2].weights[i]);
        });
      });
      // The checkpoint: the whole model and the whole optimiser state on every rank (the same bits),
      // one process's up to re-association.
      for (const r of runs)
        for (const [n, t] of one.dict) {
          expect(r.dict.get(n)!.data, n).toEqual(runs[0].dict.get(n)!.data);
          expect(tensorRelDiff(r.dict.get(n)!.data, t.data), n).toBeLessThan(1e-3);
        }
      for (const r of runs) {
        expect([...r.gathered.keys()].sort()).toEqual([...one.gathered.keys()].sort());
        for (const [n, v] of one.gathered) {
          expect(r.gathered.get(n), n).toEqual(runs[0].gathered.get(n));
          expect(frobeniusRelDiff(r.gathered.get(n)!, v), n).toBeLessThan(1e-2);
        }
      }
      // ZeRO-1: the replicated parameters' moments over all 4 ranks, the experts' over the 2 of an
      // expert group (each group holding them all): together one process's state and one more copy
      // of the experts'.
      if (zero1) {
        const expertState = 2 * one.weights.reduce((n, w, i) => n + (isExpert[i] ? w.length : 0), 0);
        expect(runs.reduce((n, r) => n + r.state, 0)).toBe(one.state + expertState);
      }
    }
    // Resumed from one process's checkpoint under 4 ranks in expert groups of 2: as one process goes on.
    const start: Start = { dict: one.dict, state: one.gathered, step: STEPS };
    const [on] = await train(1, 1, false, null, 0, STEPS + 2);
    const resumed = await train(4, 1, true, start, STEPS, 2, 0, 2);
    expect(maxRelDiff(resumed[0].losses, on.losses.slice(STEPS))).toBeLessThan(1e-5);
  }, 120_000);

  // Multi-token prediction: its loss is a mean over every position but each sequence's last, and the
  // ranks hold whole sequences, so 2 ranks (with micro-batches, ZeRO-1, or the experts of its MoE
  // block split too) and 4 in two expert groups train as one process does.
  it("multi-token prediction: 2 and 4 ranks, micro-batches, ZeRO-1 and expert parallelism train as 1 rank", async () => {
    const cfg = { ...MICRO, num_nextn_predict_layers: 1 };
    const [one] = await train(1, 1, false, null, 0, STEPS, 0, false, cfg);
    expect(one.mtpLosses.length).toBe(STEPS);
    expect(one.mtpLosses.every((x) => Number.isFinite(x) && x > 0)).toBe(true);
    for (const [ranks, accum, zero1, ep] of [
      [2, 1, false, false],
      [2, 2, true, false],
      [2, 1, false, true],
      [4, 1, true, 2],
    ] as const) {
      const runs = await train(ranks, accum, zero1, null, 0, STEPS, 0, ep, cfg);
      const what = `${ranks} ranks, ${accum} micro-batches${zero1 ? ", ZeRO-1" : ""}${ep ? `, expert parallel (${ep})` : ""}`;
      for (const r of runs) expect(r.mtpLosses, what).toEqual(runs[0].mtpLosses);
      expect(maxRelDiff(runs[0].losses, one.losses), what).toBeLessThan(1e-5);
      expect(maxRelDiff(runs[0].mtpLosses, one.mtpLosses), what).toBeLessThan(1e-5);
      expect(maxRelDiff(runs[0].norms, one.norms), what).toBeLessThan(5e-4);
      expect(runs[0].loads[0], what).toEqual(one.loads[0]);
    }
  }, 120_000);

  it("gradient buckets with multi-token prediction: every parameter once, each final when handed over", async () => {
    const b = new TsBackend();
    const model = new DeepSeekModel(b, { ...MICRO, num_nextn_predict_layers: 1 }, presetPolicy("fp32"), 11);
    const flat = model.gradBuckets.flat();
    expect(new Set(flat).size).toBe(flat.length);
    expect(new Set(flat)).toEqual(new Set(model.params));
    const { ids, targets } = batchOf(b, model.cfg, BATCH, SEQ, 100);
    const seen: { params: Param[]; grads: Tensor[] }[] = [];
    model.zeroGrad();
    model.lossAndGrad(ids, targets, { batch: BATCH, seq: SEQ }, 1, (params) => {
      seen.push({ params, grads: params.map((p) => b.copy(p.grad)) });
    });
    expect(seen.map((x) => x.params)).toEqual(model.gradBuckets);
    for (const { params, grads } of seen)
      for (const [i, p] of params.entries())
        expect(await grads[i].read(), p.name).toEqual(await p.grad.read());
  });

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
