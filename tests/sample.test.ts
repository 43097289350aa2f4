// `sample` as users run it: its sampling flags, several samples at once, the context limit, and a
// checkpoint found with its tokenizer from any working directory.
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { CLI, cli, QUICK, tmp } from "./helpers.ts";

const root = tmp("sample");
const ck = join(root, "run/checkpoints/step-2");
const sample = (...args: string[]) => cli(["sample", "--checkpoint", ck, "--backend", "cpu", ...args]);

beforeAll(() => {
  const t = cli([
    "train",
    ...QUICK,
    "--seq-len",
    "64",
    "--steps",
    "2",
    "--backend",
    "cpu",
    "--out",
    join(root, "run"),
  ]);
  expect(t.status, t.stderr).toBe(0);
}, 120_000);

describe("sample", () => {
  it("greedy decoding with the KV cache gives the tokens of recomputing the whole context (ts and cpu)", () => {
    for (const backend of ["ts", "cpu"]) {
      const args = ["--prompt", "KING:", "--tokens", "40", "--temperature", "0", "--backend", backend];
      const cached = sample(...args);
      expect(cached.status, cached.stderr).toBe(0);
      expect(sample(...args, "--no-kv-cache").stdout, backend).toBe(cached.stdout);
      expect(cached.stdout.length).toBeGreaterThan(40);
    }
  }, 60_000);

  it("top-k 1 at any temperature is greedy decoding", () => {
    const greedy = sample("--prompt", "KING:", "--tokens", "20", "--temperature", "0");
    const top1 = sample(
      "--prompt",
      "KING:",
      "--tokens",
      "20",
      "--temperature",
      "1.5",
      "--top-k",
      "1",
      "--seed",
      "9",
    );
    expect(greedy.status, greedy.stderr).toBe(0);
    expect(top1.stdout).toBe(greedy.stdout);
    expect(greedy.stdout.startsWith("KING:")).toBe(true);
  });

  it("--num-samples N prints N samples, different from each other, repeatable by seed", () => {
    const args = [
      "--prompt",
      "A",
      "--tokens",
      "30",
      "--num-samples",
      "3",
      "--temperature",
      "1",
      "--top-p",
      "0.95",
    ];
    const a = sample(...args, "--repetition-penalty", "1.2");
    expect(a.status, a.stderr).toBe(0);
    const parts = a.stdout.split(/^--- sample \d ---\n/m).slice(1);
    expect(parts).toHaveLength(3);
    expect(new Set(parts).size).toBe(3);
    expect(sample(...args, "--repetition-penalty", "1.2").stdout).toBe(a.stdout);
  });

  it("refuses a prompt and --tokens beyond the context the model was trained on", () => {
    const r = sample("--prompt", "KING:", "--tokens", "60");
    expect(r.status).toBe(2);
    expect(r.stderr.trim()).toBe(
      "error: --tokens 60: the prompt (5 tokens) and 60 new tokens make 65, beyond the 64-token context this model was trained on",
    );
  });

  it("refuses a prompt that fills the context", () => {
    const r = sample("--prompt", "x".repeat(64));
    expect(r.status).toBe(2);
    expect(r.stderr.trim()).toBe(
      "error: --prompt: 64 tokens leave no room in the 64-token context this model was trained on",
    );
  });

  it("refuses out-of-range sampling flags", () => {
    for (const [flag, value, want] of [
      ["--top-p", "0", /--top-p 0: must be in \(0, 1\]/],
      ["--top-k", "-1", /--top-k -1: must be an integer in \[0, 2097152\]/],
      ["--repetition-penalty", "0", /--repetition-penalty 0: must be in \(0, 100\]/],
      ["--num-samples", "0", /--num-samples 0: must be an integer in \[1, 1024\]/],
    ] as const) {
      const r = sample("--tokens", "2", flag, value);
      expect(r.status, flag).toBe(2);
      expect(r.stderr.trim()).toMatch(want);
    }
  });

  it("works from another working directory: the checkpoint holds its tokenizer", () => {
    const args = ["sample", "--checkpoint", ck, "--backend", "cpu", "--prompt", "KING:", "--tokens", "10"];
    const r = spawnSync("bun", [CLI, ...args], {
      cwd: tmp("elsewhere"),
      encoding: "utf8",
    });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toBe(sample("--prompt", "KING:", "--tokens", "10").stdout);
  });
});
