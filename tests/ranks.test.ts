// Data-parallel ranks through the CLI (`moe8 train --ranks N`, apps/trainer/src/dist): N processes
// on one machine, each stepping on 1/N of every batch and keeping 1/N of the optimiser state
// (ZeRO-1), train as one process does up to the order of f32 sums; their checkpoint resumes under another N; a worker that dies stops the run with a line
// naming it and the checkpoint to resume from; and a split that does not divide the batch is refused.
import { existsSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { readSafetensors } from "../apps/trainer/src/run/safetensors.ts";
import { cli, lastStep, metricsOf, started, tmp, until, weightDiffs } from "./helpers.ts";

// fp32: under FP8 each rank's Wgrad column tiles (128 tokens) would cover other tokens than one
// process's, so their scales legitimately differ (as with --grad-accum).
const LR = 1e-3;
const FLAGS = [
  "--backend",
  "cpu",
  "--precision",
  "fp32",
  "--batch-size",
  "8",
  "--seq-len",
  "32",
  "--lr",
  String(LR),
];
const MORE = [
  "--warmup",
  "0",
  "--eval-every",
  "2",
  "--save-every",
  "2",
  "--log-every",
  "1000",
  "--check-every",
  "2",
];

function run(ranks: number, steps = 4, env: Record<string, string> = {}, extra: string[] = []) {
  const out = join(tmp(`ranks${ranks}`), "run");
  const r = cli(
    ["train", ...FLAGS, ...MORE, "--steps", String(steps), "--ranks", String(ranks), ...extra, "--out", out],
    {
      RAYON_NUM_THREADS: "1",
      ...env,
    },
  );
  return { out, r };
}

/**
 * N ranks' first four steps against one process's (metrics a, b): losses, norms and loads, the
 * validation loss; the step-4 checkpoints' weights (wa, wb) with the same names, for the caller.
 */
function expectAsOneProcess(
  a: ReturnType<typeof metricsOf>,
  b: ReturnType<typeof metricsOf>,
  n: number,
  oneOut: string,
  manyOut: string,
) {
  for (let i = 0; i < 4; i++) {
    // The loss is a mean over 256 tokens summed in another order: a few f32 ulps.
    expect(Math.abs(b[i].loss - a[i].loss), `${n} ranks, step ${i + 1} loss`).toBeLessThan(4e-6);
    expect(Math.abs(b[i].grad_norm - a[i].grad_norm) / a[i].grad_norm).toBeLessThan(5e-5);
    // The step's integer loads are summed over the ranks: the same counts.
    expect(b[i].load_max_over_mean_by_layer).toEqual(a[i].load_max_over_mean_by_layer);
  }
  expect(Math.abs(b[1].val_loss - a[1].val_loss)).toBeLessThan(4e-6);
  const wa = readSafetensors(join(oneOut, "checkpoints/step-4/model.safetensors")).tensors;
  const wb = readSafetensors(join(manyOut, "checkpoints/step-4/model.safetensors")).tensors;
  expect([...wb.keys()]).toEqual([...wa.keys()]);
  return { wa, wb };
}

/** `train` with `flags` exits 2 with one line on stderr matching `want`. */
function refusedInOneLine(out: string, flags: readonly string[], want: RegExp) {
  const r = cli(["train", ...FLAGS, "--steps", "2", ...flags, "--out", out], { RAYON_NUM_THREADS: "1" });
  expect(r.status, r.stderr).toBe(2);
  expect(r.stderr.trim().split("\n")).toHaveLength(1);
  expect(r.stderr).toMatch(want);
  // Refused before anything is written: no run folder left behind.
  expect(existsSync(out), `${flags.join(" ")} left ${out}`).toBe(false);
}

describe("--ranks", () => {
  it("2 and 4 ranks train as one process: losses, norms, loads, biases and weights", () => {
    const one = run(1);
    expect(one.r.status, one.r.stderr).toBe(0);
    for (const n of [2, 4]) {
      const many = run(n);
      expect(many.r.status, many.r.stderr).toBe(0);
      expect(many.r.stdout).toContain(`on cpu x ${n} ranks`);
      // ZeRO-1: the leader keeps about 1/N of the moments (whole parameters, balanced by size).
      const [held, all] = /rank 0 holds (\d+) of (\d+) values/.exec(many.r.stdout)!.slice(1).map(Number);
      expect(held / all).toBeGreaterThan(0.5 / n);
      expect(held / all).toBeLessThan(1.5 / n);
      const [a, b] = [metricsOf(one.out), metricsOf(many.out)];
      expect(b.map((m) => m.step)).toEqual([1, 2, 3, 4]);
      const { wa, wb } = expectAsOneProcess(a, b, n, one.out, many.out);
      const { maxDiff, beyondFraction, biases } = weightDiffs(wa, wb, 1e-4 * LR);
      // The bias update is a function of the summed integer loads: bit for bit.
      for (const { name, x, y } of biases) expect([...y], name).toEqual([...x]);
      // As with --grad-accum: AdamW's update lr g / (|g| + eps) moves by up to ~1e-2 of lr where a
      // gradient's terms cancel to within eps; elsewhere the weights agree to 1e-4 of lr, and a rank
      // whose rows were lost or counted twice would move every weight by ~lr.
      expect(maxDiff).toBeLessThan(2e-2 * LR);
      expect(beyondFraction).toBeLessThan(1e-3);
    }
  }, 240_000);

  it("a checkpoint of 2 ranks resumes on 1 (and the other way round)", () => {
    const two = run(2);
    expect(two.r.status, two.r.stderr).toBe(0);
    const r = cli(["train", "--resume", two.out, "--steps", "6", "--ranks", "1"], { RAYON_NUM_THREADS: "1" });
    expect(r.status, r.stderr).toBe(0);
    const one = run(1, 2);
    expect(one.r.status, one.r.stderr).toBe(0);
    const back = cli(["train", "--resume", one.out, "--steps", "4", "--ranks", "2"], {
      RAYON_NUM_THREADS: "1",
    });
    expect(back.status, back.stderr).toBe(0);
    expect(metricsOf(two.out).map((m) => m.step)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(metricsOf(one.out).map((m) => m.step)).toEqual([1, 2, 3, 4]);
  }, 240_000);

  it("a worker that dies stops the run, naming it and the checkpoint to resume from", () => {
    const { out, r } = run(2, 6, { MOE8_FAULT_RANK_EXIT: "1:4" });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(
      /rank 1 \(process \d+\) exited with code 3: the run stopped at step 3; --resume \S+ continues it from \S+step-2/,
    );
    const again = cli(["train", "--resume", out, "--ranks", "2"], { RAYON_NUM_THREADS: "1" });
    expect(again.status, again.stderr).toBe(0);
    expect(metricsOf(out).at(-1)?.step).toBe(6);
  }, 240_000);

  it("Ctrl-C (SIGINT to the whole process group) stops the ranks with a checkpoint, exit 0", async () => {
    const out = join(tmp("ranks-sigint"), "run");
    const a = started(
      ["train", ...FLAGS, ...MORE, "--steps", "200", "--seq-len", "64", "--ranks", "2", "--out", out],
      { RAYON_NUM_THREADS: "1" },
      true,
    );
    await until(() => lastStep(out) >= 2 || a.out.done);
    process.kill(-a.child.pid!, "SIGINT");
    expect(await a.exit, a.out.stderr).toEqual({ code: 0, signal: null });
    const stopped = Number(/stopped at step (\d+)/.exec(a.out.stdout)?.[1]);
    expect(stopped).toBeGreaterThanOrEqual(2);
    expect(stopped).toBeLessThan(200);
    const again = cli(["train", "--resume", out, "--steps", String(stopped + 2), "--ranks", "2"], {
      RAYON_NUM_THREADS: "1",
    });
    expect(again.status, again.stderr).toBe(0);
  }, 120_000);

  it("the replica check stops a run whose ranks' weights differ, naming the rank", () => {
    const { r } = run(2, 6, { MOE8_FAULT_RANK_CORRUPT: "1:3" });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/replica check at step 4: the weights of rank 1 differ from rank 0's/);
  }, 120_000);

  // Under FP8 (the MoE layers' tokens travel to their experts as FP8 tiles under --expert-parallel)
  // the ranks train as one process to within the quantisation of their own gradients (a rank's
  // Wgrad column tiles cover its tokens only), and a logged step's FP8 range counts are summed over
  // the ranks (each counts its own quantisations), not the leader's alone.
  it("under FP8: 2 ranks (data and expert parallel) train as one process; range counts summed over the ranks, exchanges timed", () => {
    const flags = (n: number, out: string, extra: string[] = []) => [
      "train",
      ...FLAGS.map((f) => (f === "fp32" ? "fp8" : f)),
      "--warmup",
      "0",
      "--eval-every",
      "0",
      "--log-every",
      "1",
      "--fp8-stats-every",
      "1",
      "--steps",
      "2",
      "--ranks",
      String(n),
      ...extra,
      "--out",
      out,
    ];
    const runs = [
      ["one", 1, []],
      ["data", 2, []],
      ["experts", 2, ["--expert-parallel"]],
    ] as const;
    const m = runs.map(([name, n, extra]) => {
      const out = join(tmp(`ranks-fp8-${name}`), "run");
      const r = cli(flags(n, out, [...extra]), { RAYON_NUM_THREADS: "1" });
      expect(r.status, r.stderr).toBe(0);
      return metricsOf(out);
    });
    const [one, ...many] = m;
    for (const [i, b] of many.entries()) {
      const what = runs[i + 1][0];
      for (let s = 0; s < 2; s++) {
        expect(Math.abs(b[s].loss - one[s].loss), `${what}, step ${s + 1} loss`).toBeLessThan(1e-3);
        // (The first step's routing is the same weights' on the same tokens: the same loads.)
        if (s === 0)
          expect(b[s].load_max_over_mean_by_layer, what).toEqual(one[s].load_max_over_mean_by_layer);
        // One process counts ~1,400 underflows a step; the leader alone counted ~800.
        expect(b[s].fp8_underflow / one[s].fp8_underflow, `${what}, step ${s + 1}`).toBeGreaterThan(0.85);
        expect(b[s].fp8_underflow / one[s].fp8_underflow, `${what}, step ${s + 1}`).toBeLessThan(1.15);
        // The token exchanges' time on logged steps (every step here), under expert parallelism only.
        if (what === "experts") expect(b[s].expert_exchange_ms).toBeGreaterThan(0);
        else expect(b[s].expert_exchange_ms).toBeUndefined();
      }
    }
    expect(one[0].expert_exchange_ms).toBeUndefined();
  }, 240_000);

  it("refuses a split that does not divide the batch, and a bad count, in one line (exit 2)", () => {
    for (const [ranks, want] of [
      ["3", /--ranks 3: the batch of 8 sequences does not split into 3 ranks/],
      ["0", /--ranks 0: use an integer from 1 to 64/],
    ] as const) {
      const { r, out } = run(Number(ranks));
      expect(r.status, r.stderr).toBe(2);
      expect(existsSync(out), `--ranks ${ranks} left ${out}`).toBe(false);
      expect(r.stderr.trim().split("\n")).toHaveLength(1);
      expect(r.stderr).toMatch(want);
    }
  }, 60_000);

  // --expert-parallel: each rank holds 1/N of every MoE layer's experts, the tokens go to their
  // experts' ranks and back; the run is one process's to f32 re-association, the leader evaluates a
  // whole copy, and the checkpoint (every rank's experts gathered) resumes under any N.
  it("--expert-parallel: 2 and 4 ranks train as one process, and the checkpoint resumes under another N", () => {
    const one = run(1);
    expect(one.r.status, one.r.stderr).toBe(0);
    const a = metricsOf(one.out);
    for (const n of [2, 4]) {
      const ep = run(n, 4, {}, ["--expert-parallel"]);
      expect(ep.r.status, ep.r.stderr).toBe(0);
      expect(ep.r.stdout).toContain(`on cpu x ${n} ranks (experts split over the ranks`);
      const { wa, wb } = expectAsOneProcess(a, metricsOf(ep.out), n, one.out, ep.out);
      const { maxDiff } = weightDiffs(wa, wb, 1e-4 * LR);
      expect(maxDiff).toBeLessThan(2e-2 * LR);
    }
    // 2 expert-parallel ranks' checkpoint resumed by one process, and one process's by 2 ranks.
    const ep = run(2, 4, {}, ["--expert-parallel"]);
    const r1 = cli(["train", "--resume", ep.out, "--steps", "6"], { RAYON_NUM_THREADS: "1" });
    expect(r1.status, r1.stderr).toBe(0);
    const r2 = cli(["train", "--resume", one.out, "--steps", "6", "--ranks", "2", "--expert-parallel"], {
      RAYON_NUM_THREADS: "1",
    });
    expect(r2.status, r2.stderr).toBe(0);
    const [x, y] = [metricsOf(ep.out), metricsOf(one.out)];
    for (const i of [4, 5]) expect(Math.abs(x[i].loss - y[i].loss), `step ${i + 1}`).toBeLessThan(4e-6);
  }, 240_000);

  // --expert-parallel P below the rank count: expert groups of P consecutive ranks, each holding
  // every expert once, tokens exchanged within a group, the experts' gradients summed over the
  // groups; the checkpoint (the first group's experts) resumes under another layout, and the replica
  // check compares each rank's experts with its first replica's.
  it("--expert-parallel 2 on 4 ranks: two expert groups train as one process, resume under another layout, and are checked", () => {
    const one = run(1);
    expect(one.r.status, one.r.stderr).toBe(0);
    const ep = run(4, 4, {}, ["--expert-parallel", "2"]);
    expect(ep.r.status, ep.r.stderr).toBe(0);
    expect(ep.r.stdout).toContain("on cpu x 4 ranks (experts split over 2 expert groups of 2 ranks");
    const { wa, wb } = expectAsOneProcess(metricsOf(one.out), metricsOf(ep.out), 4, one.out, ep.out);
    expect(weightDiffs(wa, wb, 1e-4 * LR).maxDiff).toBeLessThan(2e-2 * LR);
    // Its checkpoint resumed with the experts over 2 ranks, and one process's under 4 in groups of 2.
    const env = { RAYON_NUM_THREADS: "1" };
    const r2 = cli(["train", "--resume", ep.out, "--steps", "6", "--ranks", "2", "--expert-parallel"], env);
    expect(r2.status, r2.stderr).toBe(0);
    const r4 = cli(
      ["train", "--resume", one.out, "--steps", "6", "--ranks", "4", "--expert-parallel", "2"],
      env,
    );
    expect(r4.status, r4.stderr).toBe(0);
    const [x, y] = [metricsOf(ep.out), metricsOf(one.out)];
    for (const i of [4, 5]) expect(Math.abs(x[i].loss - y[i].loss), `step ${i + 1}`).toBeLessThan(4e-6);
    // Rank 3's experts changed after step 3: its replica (rank 1) holds the others.
    const bad = run(4, 6, { MOE8_FAULT_RANK_CORRUPT_EXPERT: "3:3" }, ["--expert-parallel", "2"]);
    expect(bad.r.status).toBe(1);
    expect(bad.r.stderr).toMatch(/replica check at step 4: the experts of rank 3 differ from rank 1's/);
  }, 300_000);

  it("--expert-parallel: refused in one line without ranks, or with experts that do not split (exit 2)", () => {
    const out = join(tmp("ep"), "run");
    for (const [flags, want] of [
      [
        ["--expert-parallel"],
        /--expert-parallel splits the routed experts over the ranks: give --ranks N or --gpus N/,
      ],
      [
        ["--expert-parallel", "--ranks", "4", "--model.n_routed_experts", "6"],
        /--expert-parallel: the 6 routed experts of a layer do not split over 4 ranks/,
      ],
      [
        ["--expert-parallel", "3", "--ranks", "4"],
        /--expert-parallel 3: expert groups of 3 ranks do not divide 4 ranks \(use a divisor of 4\)/,
      ],
      [
        ["--expert-parallel", "4", "--ranks", "2"],
        /--expert-parallel 4: expert groups of 4 ranks do not divide 2 ranks/,
      ],
    ] as const)
      refusedInOneLine(out, flags, want);
  }, 60_000);

  it("--gpus: refused in one line without the cuda backend, beside --ranks, or with a bad count (exit 2)", () => {
    const out = join(tmp("gpus"), "run");
    for (const [flags, want] of [
      [["--gpus", "2"], /--gpus 2 runs on the cuda backend: add --backend cuda/],
      [["--gpus", "all"], /--gpus all runs on the cuda backend: add --backend cuda/],
      [["--gpus", "2", "--ranks", "2"], /--gpus and --ranks: give one/],
      [["--gpus", "0"], /--gpus 0: use an integer from 1 to 64, or all/],
    ] as const)
      refusedInOneLine(out, flags, want);
  }, 60_000);
});
