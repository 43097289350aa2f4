// Gradient accumulation through the CLI: `--batch-size 8 --grad-accum 4` (four micro-batches of 2
// sequences) trains as `--batch-size 8` in one piece does, up to the order of f32 sums.
import { readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { readSafetensors } from "../apps/trainer/src/run/safetensors.ts";
import { cli, metricsOf, tmp, weightDiffs } from "./helpers.ts";

// fp32: under FP8 the Wgrad column tiles (128 tokens) of a micro-batch of 64 tokens cover other
// tokens than the whole batch's, so their scales legitimately differ.
const LR = 1e-3;
const FLAGS = ["--backend", "cpu", "--precision", "fp32", "--steps", "4", "--seq-len", "32"];
const MORE = [
  "--lr",
  String(LR),
  "--warmup",
  "0",
  "--eval-every",
  "2",
  "--save-every",
  "0",
  "--log-every",
  "1000",
];

function run(accum: number): string {
  const out = join(tmp(`accum${accum}`), "run");
  const r = cli([
    "train",
    ...FLAGS,
    ...MORE,
    "--batch-size",
    "8",
    "--grad-accum",
    String(accum),
    "--out",
    out,
  ]);
  expect(r.status, r.stderr).toBe(0);
  return out;
}

const weights = (dir: string) => readSafetensors(join(dir, "checkpoints/step-4/model.safetensors")).tensors;

describe("--grad-accum", () => {
  it("4 micro-batches of 2 equal one batch of 8: losses, grad norms, loads and weights", () => {
    const whole = run(1);
    const accum = run(4);
    expect(readFileSync(join(accum, "config.json"), "utf8")).toContain('"gradAccum": 4');
    const [a, b] = [metricsOf(whole), metricsOf(accum)];
    expect(b.map((m) => m.step)).toEqual([1, 2, 3, 4]);
    // The step's loss is a mean over 256 tokens summed in another order: a few f32 ulps (5.4 has
    // an ulp of 4.8e-7; 4e-6 is 8 ulps; measured: 0 or 1 ulp). Taking one micro-batch's loss for
    // the step's would be off by ~1e-2, and a gradient not scaled by 1/K shows in the norm (4x).
    for (let i = 0; i < 4; i++) {
      expect(Math.abs(b[i].loss - a[i].loss), `step ${i + 1} loss`).toBeLessThan(4e-6);
      expect(Math.abs(b[i].grad_norm - a[i].grad_norm) / a[i].grad_norm).toBeLessThan(5e-5);
      // Integer loads of the whole step: the routing is the same, so the counts are exactly equal.
      expect(b[i].load_max_over_mean_by_layer).toEqual(a[i].load_max_over_mean_by_layer);
      expect(b[i].load_idle_experts).toBe(a[i].load_idle_experts);
    }
    expect(Math.abs(b[1].val_loss - a[1].val_loss)).toBeLessThan(4e-6);
    const [wa, wb] = [weights(whole), weights(accum)];
    expect([...wb.keys()]).toEqual([...wa.keys()]);
    const { maxDiff, beyondFraction, biases } = weightDiffs(wa, wb, 1e-4 * LR);
    for (const { name, x, y } of biases) {
      // The bias update is a function of the step's integer loads alone, so with the loads summed
      // over the micro-batches it is bit for bit the one-batch run's; one micro-batch's loads (a
      // quarter of the tokens) would move it differently by ~1e-2 a step.
      expect(Math.max(...x.map(Math.abs)), name).toBeGreaterThan(1e-3);
      expect([...y], name).toEqual([...x]);
    }
    // AdamW's first update is lr * g / (|g| + eps) with eps 1e-8: for a gradient whose terms cancel
    // to within eps, the f32 summation order (~1e-7 of the terms' magnitude) moves the update by up
    // to ~1e-2 of lr (measured: 9e-3). Everywhere else the weights agree to 1e-4 of lr; a missing
    // or repeated micro-batch moves every weight by ~lr.
    expect(maxDiff).toBeLessThan(2e-2 * LR);
    expect(beyondFraction).toBeLessThan(1e-3);
  }, 120_000);

  it("a resumed run keeps its micro-batches and repeats the lost steps bit for bit", () => {
    const run = join(tmp("accum-resume"), "run");
    const flags = [
      "--backend",
      "cpu",
      "--steps",
      "4",
      "--seq-len",
      "32",
      "--batch-size",
      "8",
      "--grad-accum",
      "4",
    ];
    const r = cli([
      "train",
      ...flags,
      "--eval-every",
      "0",
      "--save-every",
      "2",
      "--keep-last",
      "3",
      "--out",
      run,
    ]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain("(4 micro-batches of 2 x 32)");
    const before = metricsOf(run);
    // Killed after step 2's checkpoint: steps 3 and 4 are done again from it.
    rmSync(join(run, "checkpoints/step-4"), { recursive: true });
    const again = cli(["train", "--resume", run]);
    expect(again.status, again.stderr).toBe(0);
    expect(again.stdout).toContain("(4 micro-batches of 2 x 32)");
    expect(metricsOf(run).map((m) => [m.step, m.loss, m.grad_norm])).toEqual(
      before.map((m) => [m.step, m.loss, m.grad_norm]),
    );
  });

  it("a batch that the micro-batches do not divide is exit 2, nothing written", () => {
    const out = join(tmp("accum-bad"), "run");
    const r = cli(["train", ...FLAGS, "--batch-size", "6", "--grad-accum", "4", "--out", out]);
    expect(r.status).toBe(2);
    expect(r.stderr.trim().split("\n")).toHaveLength(1);
    expect(r.stderr).toMatch(/--grad-accum 4: .*batch of 6/);
    const zero = cli(["train", ...FLAGS, "--grad-accum", "0", "--out", out]);
    expect(zero.status).toBe(2);
    expect(zero.stderr).toMatch(/--grad-accum 0/);
  });
});
