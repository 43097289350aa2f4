// Extending a finished or interrupted run: `--resume RUN --steps N` goes on to step N with the
// learning rate continuing as docs/model.md ("Changing a run's length") says; every other flag
// that would change what a step computes is refused, naming it.
import { readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { cli, QUICK, tmp } from "./helpers.ts";

const metrics = (dir: string) =>
  readFileSync(join(dir, "metrics.jsonl"), "utf8")
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l));
const LR = 1e-2;
const FLOOR = LR * 0.1; // minLrRatio's default

describe("--resume RUN --steps N", () => {
  it("a finished cosine run of 4 steps goes on to 6 at its floor; steps 1..6 once each", () => {
    const run = join(tmp("extend"), "run");
    const first = cli([
      "train",
      ...QUICK,
      "--backend",
      "cpu",
      "--steps",
      "4",
      "--lr",
      String(LR),
      "--warmup",
      "1",
      "--out",
      run,
    ]);
    expect(first.status, first.stderr).toBe(0);
    const more = cli(["train", "--resume", run, "--steps", "6", "--eval-every", "3", "--keep-last", "1"]);
    expect(more.status, more.stderr).toBe(0);
    expect(more.stderr).toMatch(/now has 6 steps \(it had 4\)/);
    const m = metrics(run);
    expect(m.map((r) => r.step)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(m[3].lr).toBeCloseTo(FLOOR, 15); // the cosine ended at its floor ...
    expect([m[4].lr, m[5].lr]).toEqual([m[3].lr, m[3].lr]); // ... and stays there
    expect(m[5].val_loss).toBeTypeOf("number"); // --eval-every 3 took effect (step 6)
    expect(m.every((r) => Number.isFinite(r.loss))).toBe(true);
    const cfg = JSON.parse(readFileSync(join(run, "config.json"), "utf8"));
    expect([cfg.steps, cfg.evalEvery, cfg.keepLast]).toEqual([6, 3, 1]);
    const state = JSON.parse(readFileSync(join(run, "checkpoints/step-6/trainer-state.json"), "utf8"));
    expect(state.schedule_from).toEqual({ step: 4, lr: m[3].lr });
  });

  it("cosine interrupted mid-way: re-stretched from step 4's learning rate to the floor at the new end", () => {
    const run = join(tmp("extend-cos"), "run");
    const flags = ["--lr", String(LR), "--warmup", "1", "--save-every", "4", "--keep-last", "5"];
    const first = cli(["train", ...QUICK, "--backend", "cpu", ...flags, "--steps", "8", "--out", run]);
    expect(first.status, first.stderr).toBe(0);
    rmSync(join(run, "checkpoints/step-8"), { recursive: true }); // killed after step 4's checkpoint
    const at4 = metrics(run)[3].lr;
    const more = cli(["train", "--resume", run, "--steps", "12"]);
    expect(more.status, more.stderr).toBe(0);
    const m = metrics(run);
    expect(m.map((r) => r.step)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    for (let step = 5; step <= 12; step++)
      expect(m[step - 1].lr, `step ${step}`).toBeCloseTo(
        FLOOR + (at4 - FLOOR) * 0.5 * (1 + Math.cos((Math.PI * (step - 4)) / 8)),
        15,
      );
  });

  it("WSD interrupted at its peak: the stable phase goes on and the decay moves to the new end", () => {
    const run = join(tmp("extend-wsd"), "run");
    const wsd = [
      "--schedule",
      "wsd",
      "--lr",
      String(LR),
      "--warmup",
      "1",
      "--save-every",
      "4",
      "--keep-last",
      "5",
    ];
    const first = cli(["train", ...QUICK, "--backend", "cpu", ...wsd, "--steps", "5", "--out", run]);
    expect(first.status, first.stderr).toBe(0);
    // Killed after step 4's checkpoint: step 5's checkpoint never existed, its metrics line did.
    rmSync(join(run, "checkpoints/step-5"), { recursive: true });
    const more = cli(["train", "--resume", run, "--steps", "10"]);
    expect(more.status, more.stderr).toBe(0);
    const m = metrics(run);
    expect(m.map((r) => r.step)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    // 10 steps with 20% decay: the peak through step 8, then a straight line to the floor at 10.
    expect(m.slice(0, 8).map((r) => r.lr)).toEqual(Array(8).fill(LR));
    expect(m[8].lr).toBeCloseTo((LR + FLOOR) / 2, 15);
    expect(m[9].lr).toBeCloseTo(FLOOR, 15);
  });

  it("flags that change what a step computes are refused, naming the flag; nothing is written", () => {
    const run = join(tmp("extend-bad"), "run");
    expect(cli(["train", ...QUICK, "--backend", "cpu", "--steps", "2", "--out", run]).status).toBe(0);
    const before = readFileSync(join(run, "metrics.jsonl"), "utf8");
    for (const [flags, want] of [
      [["--lr", "1e-3"], /--lr cannot be changed/],
      [["--grad-accum", "2"], /--grad-accum cannot be changed/],
      [["--precision.attention=bf16"], /--precision.attention cannot be changed/],
      [["--steps", "1"], /--steps 1: the run has already done 2 steps/],
      [["--steps", "0"], /--steps 0: /],
      [["--keep-last", "0"], /--keep-last 0: /],
    ] as [string[], RegExp][]) {
      const r = cli(["train", "--resume", run, ...flags]);
      expect(r.status, flags.join(" ")).toBe(2);
      expect(r.stderr.trim().split("\n"), flags.join(" ")).toHaveLength(1);
      expect(r.stderr, flags.join(" ")).toMatch(want);
    }
    expect(readFileSync(join(run, "metrics.jsonl"), "utf8")).toBe(before);
  });
});
