// The model's shape from the command line: --model.<field> for every field a config file's `model`
// takes, validated the same way, and a vocab_size taken from the dataset's tokenizer when none is
// set, so a `prepare-data --tokenizer bpe:N` dataset trains (and runs parity) without a hand-written
// config.
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { cli, QUICK, tmp } from "./helpers.ts";

const dir = tmp("model-flags");
const bpe = join(dir, "bpe-data");
const WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum old songs".split(
  " ",
);

beforeAll(() => {
  // ~40 KB of text with enough repetition for 300 BPE merges.
  const lines: string[] = [];
  for (let i = 0; i < 800; i++)
    lines.push(WORDS.map((_, j) => WORDS[(i * 7 + j * 3) % WORDS.length]).join(" "));
  writeFileSync(join(dir, "in.txt"), `${lines.join(".\n")}\n`);
  const p = cli(["prepare-data", "--input", join(dir, "in.txt"), "--out", bpe, "--tokenizer", "bpe:300"]);
  expect(p.status, p.stderr).toBe(0);
}, 120_000);

const train = (name: string, flags: string[]) =>
  cli(["train", ...QUICK, "--backend", "cpu", "--steps", "2", ...flags, "--out", join(dir, name)]);

describe("model shape from flags and data", () => {
  it("a bpe:300 dataset trains without a config file: vocab_size 300 taken from its tokenizer", () => {
    const r = train("bpe-run", ["--data", bpe]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout.split("\n")[0]).toMatch(
      /^training tiny with vocab_size 300 \(taken from the dataset's bpe tokenizer\) on cpu/,
    );
    const run = join(dir, "bpe-run");
    expect(JSON.parse(readFileSync(join(run, "config.json"), "utf8")).model).toEqual({
      base: "tiny",
      vocab_size: 300,
    });
    const hf = JSON.parse(readFileSync(join(run, "checkpoints/step-2/config.json"), "utf8"));
    expect(hf.vocab_size).toBe(300);
    // The bundled byte-level corpus needs tiny's own 256: nothing is taken, the run is plain tiny.
    const plain = train("byte-run", []);
    expect(plain.status, plain.stderr).toBe(0);
    expect(plain.stdout.split("\n")[0]).toMatch(/^training tiny on cpu/);
  });

  it("parity on a bpe:300 dataset takes its vocab_size too", () => {
    const out = join(dir, "bpe-parity");
    const r = cli(["parity", ...QUICK, "--backend", "cpu", "--steps", "2", "--data", bpe, "--out", out]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/vocab_size 300 \(taken from the dataset's bpe tokenizer\)/);
  });

  it("--model.* change the model as a config file's fields do", () => {
    const r = train("shaped", [
      "--model.num_hidden_layers",
      "2",
      "--model.n_routed_experts",
      "4",
      "--model.hidden_size",
      "64",
    ]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(
      /training tiny with hidden_size 64, num_hidden_layers 2, n_routed_experts 4 on cpu/,
    );
    const hf = JSON.parse(readFileSync(join(dir, "shaped/checkpoints/step-2/config.json"), "utf8"));
    expect([hf.num_hidden_layers, hf.n_routed_experts, hf.hidden_size]).toEqual([2, 4, 64]);
  });

  it("a vocab_size below the tokenizer's, and bad --model.* values, are exit 2 with one line", () => {
    for (const [flags, want] of [
      [["--data", bpe, "--model.vocab_size", "200"], /vocab_size 300 but the model's vocab_size is 200/],
      [["--model.num_hidden_layers", "0"], /^error: --model\.num_hidden_layers 0: Too small/],
      [["--model.hidden_size", "1.5"], /^error: --model\.hidden_size 1\.5: .*expected int/],
      [["--model.hidden_size", "1e9"], /^error: --model\.hidden_size 1000000000: Too big/],
      [["--model.bias_update_rule", "fast"], /^error: --model\.bias_update_rule fast: Invalid option/],
      [["--model.base", "huge"], /^error: --model\.base huge: Invalid option/],
      [["--model.rope_theta", "x"], /^error: flag --model\.rope_theta: "x" is not a number/],
      [["--model.heads", "4"], /^error: unknown flag --model\.heads/],
      [["--model.num_experts_per_tok", "9"], /num_experts_per_tok \(9\) exceeds n_routed_experts \(8\)/],
    ] as [string[], RegExp][]) {
      const r = train("bad", flags);
      expect(r.status, flags.join(" ")).toBe(2);
      expect(r.stderr.trim().split("\n"), flags.join(" ")).toHaveLength(1);
      expect(r.stderr, flags.join(" ")).toMatch(want);
    }
    expect(existsSync(join(dir, "bad"))).toBe(false);
  });
});
