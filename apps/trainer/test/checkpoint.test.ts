// Checkpoints on disk: pruning leaves the listing in one rename before files are deleted; start-up
// recovery puts back a checkpoint moved aside for a replacement and removes killed runs' leftovers;
// a failed write names the checkpoint and leaves nothing; trainer-state.json is validated.

import { createHash } from "node:crypto";
import { mkdirSync, readdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { ByteTokenizer } from "@moe8/data";
import { CONFIGS } from "@moe8/model";
import { tempDir } from "@moe8/tensor/testing";
import { describe, expect, it } from "vitest";
import {
  listCheckpoints,
  pruneCheckpoints,
  readCheckpoint,
  recoverCheckpoints,
  writeCheckpoint,
} from "../src/run/checkpoint.ts";
import { DEFAULTS } from "../src/run/config.ts";

const files = (step: number) => ({
  model: new Map([["w", { shape: [2], data: Float32Array.of(step, -step) }]]),
  optimizer: new Map([["m", { shape: [1], data: Float32Array.of(step) }]]),
  config: CONFIGS.tiny as unknown as Record<string, unknown>,
  state: {
    step,
    optimizer_step: step,
    data_cursor: { epoch: 0, docIndex: 0, tokenOffset: step, rngState: [1, 2, 3, 4], dataset: "x" },
    best_val_loss: null,
    best_step: null,
    policy: {},
    train_config: DEFAULTS,
  },
  tokenizer: new ByteTokenizer(),
});

const newRun = () => tempDir("ck");

describe("checkpoints on disk", () => {
  it("pruning keeps the newest and the best; recovery removes killed runs' leftovers", () => {
    const run = newRun();
    for (const step of [1, 2, 3]) writeCheckpoint(run, step, files(step));
    const root = join(run, "checkpoints");
    // A killed run's half-deleted checkpoint and unfinished write (another process id).
    for (const n of [".del-step-7-999999", ".tmp-step-8-999999"]) {
      mkdirSync(join(root, n));
      writeFileSync(join(root, n, "checksums.json"), "{}");
    }
    pruneCheckpoints(run, 1, 1);
    expect(listCheckpoints(run).map((c) => c.step)).toEqual([3, 1]);
    expect(recoverCheckpoints(run).sort()).toEqual([".del-step-7-999999", ".tmp-step-8-999999"]);
    expect(readdirSync(root).sort()).toEqual(["step-1", "step-3"]);
    for (const c of listCheckpoints(run)) expect(readCheckpoint(c.dir).state.step).toBe(c.step);
  });

  it("recovery puts back a checkpoint moved aside when its replacement was never renamed in", () => {
    const run = newRun();
    writeCheckpoint(run, 4, files(4));
    const root = join(run, "checkpoints");
    renameSync(join(root, "step-4"), join(root, ".old-step-4-999999"));
    mkdirSync(join(root, ".tmp-step-4-999999"));
    recoverCheckpoints(run);
    expect(readdirSync(root)).toEqual(["step-4"]);
    expect(readCheckpoint(join(root, "step-4")).state.step).toBe(4);
  });

  it("a failed write names the checkpoint, keeps nothing of it and leaves the others intact", () => {
    const run = newRun();
    writeCheckpoint(run, 1, files(1));
    // A folder where the temporary directory goes: its creation fails (EEXIST is not it, ENOTDIR is).
    writeFileSync(join(run, "checkpoints", `.tmp-step-2-${process.pid}`), "");
    const root = join(run, "blocked");
    writeFileSync(root, "a file where the run folder should be");
    expect(() => writeCheckpoint(root, 2, files(2))).toThrow(
      /^cannot write checkpoint .*blocked\/checkpoints\/step-2: .*\(E[A-Z]+\); nothing of it was kept$/,
    );
    expect(listCheckpoints(run).map((c) => c.step)).toEqual([1]);
  });

  it("refuses a trainer-state.json whose checksum matches but whose fields do not", () => {
    const run = newRun();
    const dir = writeCheckpoint(run, 5, files(5));
    const original = readFileSync(join(dir, "trainer-state.json"), "utf8");
    const edit = (change: (s: Record<string, unknown>) => void, want: RegExp) => {
      const path = join(dir, "trainer-state.json");
      const state = JSON.parse(original);
      change(state);
      const text = `${JSON.stringify(state)}\n`;
      writeFileSync(path, text);
      const sums = JSON.parse(readFileSync(join(dir, "checksums.json"), "utf8"));
      sums["trainer-state.json"] = createHash("sha256").update(text).digest("hex");
      writeFileSync(join(dir, "checksums.json"), JSON.stringify(sums));
      expect(() => readCheckpoint(dir)).toThrow(want);
    };
    edit((s) => (s.data_cursor = null), /data_cursor: Invalid input/);
    edit((s) => (s.step = "abc"), /step: Invalid input/);
    edit((s) => ((s.train_config as { lr: number }).lr = -1), /train_config\.lr: Too small/);
    edit((s) => (s.step = 6), /trainer-state\.json says step 6/);
    edit((s) => ((s.train_config as { steps: number }).steps = 4), /step 5 is past the run's 4 steps/);
  });

  it("writes the Hugging Face files under checksums, and refuses a damaged one", () => {
    const dir = writeCheckpoint(newRun(), 3, files(3));
    const sums = JSON.parse(readFileSync(join(dir, "checksums.json"), "utf8"));
    for (const name of ["generation_config.json", "tokenizer.json", "tokenizer_config.json"])
      expect(sums[name], name).toBe(
        createHash("sha256")
          .update(readFileSync(join(dir, name)))
          .digest("hex"),
      );
    expect(JSON.parse(readFileSync(join(dir, "generation_config.json"), "utf8")).max_length).toBe(
      DEFAULTS.seqLen,
    );
    expect(readCheckpoint(dir).state.step).toBe(3);
    writeFileSync(join(dir, "tokenizer.json"), "{}");
    expect(() => readCheckpoint(dir)).toThrow(/tokenizer\.json does not match its checksum/);
  });
});
