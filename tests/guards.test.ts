// Numerical guards: a non-finite loss or gradient norm skips the update and is logged; after
// --max-bad-steps consecutive bad steps the run stops with a clear message, and the last good
// checkpoint is intact. The trigger is real: weights of 1e30 (what one step at a learning rate of
// 1e30 made before such rates were refused), put into a checkpoint whose checksums match, make the
// next forward overflow.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { expect, it } from "vitest";
import { editJson, editTensors } from "./checkpoint-tools.ts";
import { cli, tmp } from "./helpers.ts";

it("skips non-finite steps, then stops after K of them with the good checkpoint intact", () => {
  const run = join(tmp("nan"), "run");
  const flags = ["--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--clip", "0"];
  const r0 = cli(["train", "--steps", "1", ...flags, "--out", run]);
  expect(r0.status, r0.stderr).toBe(0);
  const ck = join(run, "checkpoints", "step-1");
  editTensors(ck, "model.safetensors", (tensors) => {
    for (const t of tensors.values()) {
      const w = t.data as Float32Array;
      for (let i = 0; i < w.length; i++) w[i] *= 1e32;
    }
  });
  editJson(ck, "trainer-state.json", (s) =>
    Object.assign(s.train_config as object, { steps: 30, maxBadSteps: 3, saveEvery: 1 }),
  );
  const r = cli(["train", "--resume", run]);
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
  expect(existsSync(ck)).toBe(true);
  expect(existsSync(join(run, "checkpoints", "step-2"))).toBe(false); // no checkpoint of a skipped step
  expect(existsSync(join(run, ".lock"))).toBe(false); // released on the way out
  const e = cli(["eval", "--checkpoint", ck, "--data", "datasets/default", "--batches", "1", "--json"]);
  expect(e.status, e.stderr).toBe(0);
}, 120_000);
