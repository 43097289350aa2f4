// Fault injection: a run killed with SIGKILL at random points (also while writing a checkpoint) and
// resumed each time ends with per-step losses bit-for-bit equal to an uninterrupted run's, and no
// checkpoint is ever unreadable. Signals (SIGINT, SIGTERM) are tested in tests/reliability.test.ts.
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { Rng } from "@moe8/tensor";
import { describe, expect, it } from "vitest";
import { cli, cliAsync, lastStep, QUICK, tmp } from "./helpers.ts";

const STEPS = 60;
const FLAGS = [
  "--steps",
  String(STEPS),
  "--save-every",
  "3",
  "--keep-last",
  "2",
  "--backend",
  "auto",
  "--precision",
  "fp8",
  ...QUICK,
];

function losses(runDir: string): Map<number, number> {
  const m = new Map<number, number>();
  for (const line of readFileSync(join(runDir, "metrics.jsonl"), "utf8").trim().split("\n")) {
    const j = JSON.parse(line);
    m.set(j.step, j.loss);
  }
  return m;
}

function checkpointsReadable(runDir: string) {
  const root = join(runDir, "checkpoints");
  if (!existsSync(root)) return;
  for (const d of readdirSync(root)) {
    if (!d.startsWith("step-")) continue;
    const r = cli([
      "eval",
      "--checkpoint",
      join(root, d),
      "--data",
      "datasets/default",
      "--batches",
      "1",
      "--json",
    ]);
    expect(r.status, `${d}: ${r.stderr}`).toBe(0);
  }
}

describe("crash safety and exact resume", () => {
  it("kill -9 at random points, resume each time: the same losses as an uninterrupted run", async () => {
    const ref = join(tmp("ref"), "run");
    const r0 = cli(["train", ...FLAGS, "--out", ref]);
    expect(r0.status, r0.stderr).toBe(0);
    const want = losses(ref);
    expect(want.size).toBe(STEPS);

    const run = join(tmp("killed"), "run");
    const rng = new Rng(42);
    let kills = 0;
    let started = false;
    for (let attempt = 0; attempt < 60; attempt++) {
      const args = started ? ["train", "--resume", run] : ["train", ...FLAGS, "--out", run];
      const child = cliAsync(args);
      let err = "";
      child.stderr.on("data", (d) => {
        err += d;
      });
      let exited = false;
      const done = new Promise<number | null>((res) =>
        child.on("exit", (code) => {
          exited = true;
          res(code);
        }),
      );
      // Kill 1-6 steps past where this attempt started, plus 0-250 ms, so the kills land in steps
      // and in checkpoint writes however fast the machine is (a fixed delay let a fast machine
      // finish the run in three attempts).
      const target = lastStep(run) + 1 + Math.floor(rng.next() * 6);
      const extraMs = rng.next() * 250;
      const killer = (async () => {
        while (!exited && lastStep(run) < target) await new Promise((r) => setTimeout(r, 15));
        await new Promise((r) => setTimeout(r, extraMs));
        if (!exited) child.kill("SIGKILL");
      })();
      const code = await done;
      await killer;
      if (existsSync(join(run, "checkpoints"))) started = true;
      if (code === 0) break;
      expect(code === null || code === 137, `unexpected exit ${code}: ${err}`).toBe(true);
      kills++;
      checkpointsReadable(run);
    }
    expect(kills).toBeGreaterThan(2);
    const got = losses(run);
    expect([...got.keys()].sort((a, b) => a - b)).toEqual([...want.keys()].sort((a, b) => a - b));
    for (const [step, loss] of want) expect(got.get(step), `step ${step}`).toBe(loss); // bit for bit
  }, 600_000);
});
