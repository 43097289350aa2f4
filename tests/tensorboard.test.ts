// TensorBoard event files, read back with the `tensorboard` Python package's own reader
// (EventAccumulator): every scalar equals metrics.jsonl's value (as the f32 an event stores), for a
// run killed and resumed (a second event file) and extended with --steps; a run with multi-token
// prediction, so that its loss is among them.
import { spawnSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { SCALARS } from "../apps/trainer/src/run/tensorboard.ts";
import { cli, lastStep, QUICK, started, tmp, until } from "./helpers.ts";

const READ_EVENTS = `
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
`;

/** Each tag's [step, value] pairs, as TensorBoard reads the folder. */
function readEvents(dir: string): Record<string, [number, number][]> {
  const r = spawnSync("python3", ["-c", READ_EVENTS, dir], { encoding: "utf8" });
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout);
}

/** metrics.jsonl as TensorBoard should show it: each scalar's [step, value as f32] pairs. */
function expected(run: string): Record<string, [number, number][]> {
  const out: Record<string, [number, number][]> = {};
  for (const line of readFileSync(join(run, "metrics.jsonl"), "utf8").trim().split("\n")) {
    const m = JSON.parse(line);
    for (const k of SCALARS) {
      if (typeof m[k] !== "number") continue;
      out[k] ??= [];
      out[k].push([m.step, Math.fround(m[k])]);
    }
  }
  return out;
}

const eventFiles = (dir: string) => readdirSync(dir).filter((n) => n.startsWith("events.out.tfevents."));
const FLAGS = [...QUICK, "--backend", "cpu", "--eval-every", "4", "--save-every", "4"];

describe("TensorBoard", () => {
  it("killed, resumed and extended: the scalars equal metrics.jsonl's, steps once each", async () => {
    const run = join(tmp("tb"), "run");
    // With the multi-token prediction module, so that every scalar (its loss too) is written.
    const a = started([
      "train",
      ...FLAGS,
      "--steps",
      "40",
      "--model.num_nextn_predict_layers",
      "1",
      "--out",
      run,
    ]);
    await until(() => lastStep(run) >= 10 || a.out.done);
    a.child.kill("SIGKILL"); // past step 8's checkpoint: the steps after it are logged twice
    expect((await a.exit).signal).toBe("SIGKILL");
    const b = cli(["train", "--resume", run]);
    expect(b.status, b.stderr).toBe(0);
    const c = cli(["train", "--resume", run, "--steps", "44"]);
    expect(c.status, c.stderr).toBe(0);
    const tb = join(run, "tensorboard");
    expect(eventFiles(tb)).toHaveLength(3);
    const got = readEvents(tb);
    const want = expected(run);
    expect(Object.keys(got).sort()).toEqual([...SCALARS].sort());
    expect(want.loss.map(([s]) => s)).toEqual(Array.from({ length: 44 }, (_, i) => i + 1));
    for (const k of SCALARS) expect(got[k], k).toEqual(want[k]);
  }, 120_000);

  it("--tensorboard DIR writes there, --tensorboard off writes none, a file is refused", () => {
    const root = tmp("tb-where");
    const elsewhere = join(root, "tb");
    const r = cli(["train", ...FLAGS, "--steps", "2", "--tensorboard", elsewhere, "--out", join(root, "a")]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain(`tensorboard ${elsewhere}`);
    expect(existsSync(join(root, "a", "tensorboard"))).toBe(false);
    expect(readEvents(elsewhere).loss).toEqual(expected(join(root, "a")).loss);
    const off = cli(["train", ...FLAGS, "--steps", "2", "--tensorboard", "off", "--out", join(root, "b")]);
    expect(off.status, off.stderr).toBe(0);
    expect(readdirSync(join(root, "b"))).not.toContain("tensorboard");
    writeFileSync(join(root, "file"), "");
    const bad = cli([
      "train",
      ...FLAGS,
      "--steps",
      "2",
      "--tensorboard",
      join(root, "file"),
      "--out",
      join(root, "c"),
    ]);
    expect(bad.status).toBe(2);
    expect(bad.stderr.trim()).toBe(`error: --tensorboard ${join(root, "file")}: exists and is not a folder`);
    expect(existsSync(join(root, "c"))).toBe(false);
  }, 60_000);
});
