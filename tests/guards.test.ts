// Numerical guards: a non-finite loss or gradient norm skips the update and is logged; after
// --max-bad-steps consecutive bad steps the run stops with a clear message, and the last good
// checkpoint is intact. The trigger is real: a learning rate of 1e30 makes the next forward overflow.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { expect, it } from "vitest";
import { cli, tmp } from "./helpers.ts";

it("skips non-finite steps, then stops after K of them with the good checkpoint intact", () => {
  const run = join(tmp("nan"), "run");
  const r = cli([
    "train",
    "--lr",
    "1e30",
    "--clip",
    "0",
    "--warmup",
    "0",
    "--steps",
    "30",
    "--max-bad-steps",
    "3",
    "--save-every",
    "1",
    "--batch-size",
    "2",
    "--seq-len",
    "32",
    "--eval-every",
    "0",
    "--out",
    run,
  ]);
  expect(r.status).toBe(2);
  expect(r.stderr).toMatch(/step 2: non-finite loss \(NaN\) or gradient norm \(NaN\); update skipped/);
  expect(r.stderr.trim().split("\n").at(-1)).toBe(
    "error: 3 consecutive steps with a non-finite loss or gradient; stopping (the last good checkpoint is intact)",
  );
  const rows = readFileSync(join(run, "metrics.jsonl"), "utf8")
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l));
  expect(rows.map((x) => !!x.skipped)).toEqual([false, true, true, true]);
  expect(existsSync(join(run, "checkpoints", "step-1"))).toBe(true);
  expect(existsSync(join(run, "checkpoints", "step-2"))).toBe(false); // no checkpoint of a skipped step
  const e = cli([
    "eval",
    "--checkpoint",
    join(run, "checkpoints", "step-1"),
    "--data",
    "datasets/default",
    "--batches",
    "1",
    "--json",
  ]);
  expect(e.status, e.stderr).toBe(0);
}, 120_000);
