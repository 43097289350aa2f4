// Checkpoint pruning: a pruned checkpoint leaves the listing in one rename before its files are
// deleted, and the leftovers of killed runs (unfinished writes, half-deleted directories) go.
import { mkdirSync, mkdtempSync, readdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CONFIGS } from "@moe8/model";
import { describe, expect, it } from "vitest";
import { listCheckpoints, pruneCheckpoints, readCheckpoint, writeCheckpoint } from "../src/run/checkpoint.ts";

describe("checkpoint pruning", () => {
  it("keeps the newest and the best, removes the rest and killed runs' leftovers", () => {
    const run = mkdtempSync(join(tmpdir(), "moe8-prune-"));
    const files = (step: number) => ({
      model: new Map([["w", { shape: [2], data: Float32Array.of(step, -step) }]]),
      optimizer: new Map([["m", { shape: [1], data: Float32Array.of(step) }]]),
      config: CONFIGS.tiny as unknown as Record<string, unknown>,
      state: { step },
    });
    for (const step of [1, 2, 3]) writeCheckpoint(run, step, files(step));
    const root = join(run, "checkpoints");
    // A killed run's half-deleted checkpoint and unfinished write (another process id).
    for (const n of [".del-step-7-999999", ".tmp-step-8-999999"]) {
      mkdirSync(join(root, n));
      writeFileSync(join(root, n, "checksums.json"), "{}");
    }
    pruneCheckpoints(run, 1, 1);
    expect(listCheckpoints(run).map((c) => c.step)).toEqual([3, 1]);
    expect(readdirSync(root).sort()).toEqual(["step-1", "step-3"]);
    for (const c of listCheckpoints(run)) expect(readCheckpoint(c.dir).state.step).toBe(c.step);
  });
});
