// Multi-token prediction from the command line (`--model.num_nextn_predict_layers 1`): the progress
// line, metrics.jsonl and loss.svg carry the MTP loss, the checkpoint holds the module as layer
// num_hidden_layers (config.json says so), the run resumes with it, `eval` scores both heads, `export`
// keeps it and `sample` ignores it; a one-token sequence is refused in one line with exit code 2.
import { cpSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { readSafetensors } from "../apps/trainer/src/run/safetensors.ts";
import { cli, QUICK, tmp } from "./helpers.ts";

const dir = tmp("mtp");
const MTP = ["--model.num_nextn_predict_layers", "1"];

describe("multi-token prediction from the command line", () => {
  it("trains, logs, checkpoints, resumes, evaluates, exports and samples with the MTP module", () => {
    const run = join(dir, "run");
    const t = cli([
      "train",
      ...QUICK,
      "--backend",
      "cpu",
      "--steps",
      "4",
      "--save-every",
      "2",
      "--log-every",
      "2",
      ...MTP,
      "--out",
      run,
    ]);
    expect(t.status, t.stderr).toBe(0);
    expect(t.stdout).toMatch(/^training tiny with num_nextn_predict_layers 1 on cpu/);
    expect(t.stdout).toMatch(/step 4\/4 \| loss \d+\.\d{4} \| mtp \d+\.\d{4} \|/);
    const rows = readFileSync(join(run, "metrics.jsonl"), "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l));
    expect(rows.map((r) => r.step)).toEqual([1, 2, 3, 4]);
    for (const r of rows) expect(r.mtp_loss).toBeGreaterThan(0);
    expect(readFileSync(join(run, "loss.svg"), "utf8")).toContain("MTP loss (token i + 2)");
    // tiny has 3 MoE layers; the MTP block (layer 4) is a fourth.
    expect(rows[0].load_max_over_mean_by_layer).toHaveLength(4);

    const ck = join(run, "checkpoints/step-4");
    const hf = JSON.parse(readFileSync(join(ck, "config.json"), "utf8"));
    expect(hf.num_nextn_predict_layers).toBe(1);
    expect(hf.moe8_mtp_loss_weight).toBe(0.3);
    const names = [...readSafetensors(join(ck, "model.safetensors")).tensors.keys()];
    for (const n of ["enorm", "hnorm", "eh_proj", "shared_head.norm", "self_attn.o_proj", "mlp.gate"])
      expect(
        names.some((x) => x.startsWith(`model.layers.4.${n}`)),
        n,
      ).toBe(true);

    // Resumed from its step-2 checkpoint (a copy of the run without the later one): steps 3 and 4
    // again, the same losses bit for bit (cpu is deterministic).
    const again = join(dir, "again");
    cpSync(run, again, { recursive: true });
    rmSync(join(again, "checkpoints/step-4"), { recursive: true });
    const resumed = cli(["train", "--resume", again]);
    expect(resumed.status, resumed.stderr).toBe(0);
    const rows2 = readFileSync(join(again, "metrics.jsonl"), "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l));
    expect(rows2.map((r) => [r.loss, r.mtp_loss])).toEqual(rows.map((r) => [r.loss, r.mtp_loss]));

    const e = cli([
      "eval",
      "--checkpoint",
      ck,
      "--data",
      "datasets/default",
      "--batches",
      "1",
      "--batch-size",
      "2",
      "--json",
    ]);
    expect(e.status, e.stderr).toBe(0);
    const scored = JSON.parse(e.stdout.trim().split("\n").at(-1)!);
    expect(scored.mtp_loss).toBeGreaterThan(0);
    expect(scored.tokens).toBe(2 * 32);

    const out = join(dir, "export");
    const x = cli(["export", "--checkpoint", ck, "--out", out]);
    expect(x.status, x.stderr).toBe(0);
    expect([...readSafetensors(join(out, "model.safetensors")).tensors.keys()]).toEqual(names);

    const s = cli(["sample", "--checkpoint", ck, "--tokens", "8", "--seed", "1"]);
    expect(s.status, s.stderr).toBe(0);
    // Drafted by the module and verified by the trunk: greedy, the same text as plain greedy.
    const greedy = ["sample", "--checkpoint", ck, "--tokens", "12", "--temperature", "0"];
    const plain = cli(greedy);
    const spec = cli([...greedy, "--speculative"]);
    expect(spec.status, spec.stderr).toBe(0);
    expect(spec.stdout).toBe(plain.stdout);
    expect(spec.stderr).toMatch(
      /^speculative decoding: \d+ of \d+ drafts accepted \(\d+%\), 12 tokens in \d+ passes/,
    );
  }, 300_000);

  it("sample --speculative refuses a checkpoint without the module, in one line", () => {
    const out = join(dir, "plain");
    const t = cli(["train", ...QUICK, "--backend", "cpu", "--steps", "1", "--out", out]);
    expect(t.status, t.stderr).toBe(0);
    const r = cli(["sample", "--checkpoint", join(out, "checkpoints/step-1"), "--speculative"]);
    expect(r.status).toBe(2);
    expect(r.stderr.trim().split("\n")).toHaveLength(1);
    expect(r.stderr).toMatch(/--speculative: .* has no multi-token prediction module/);
  });

  it("refuses a one-token sequence with the MTP module, writing nothing", () => {
    const out = join(dir, "short");
    const r = cli(["train", "--backend", "cpu", "--steps", "1", "--seq-len", "1", ...MTP, "--out", out]);
    expect(r.status).toBe(2);
    expect(r.stderr.trim().split("\n")).toHaveLength(1);
    expect(r.stderr).toMatch(/--seq-len 1: multi-token prediction needs sequences of at least 2 tokens/);
  });
});
