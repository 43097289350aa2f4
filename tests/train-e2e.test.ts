// End to end, as a user runs it: train tiny on the bundled corpus, then eval and sample the result.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { cli, tmp } from "./helpers.ts";

describe("train, eval and sample on the bundled corpus", () => {
  const run = join(tmp("e2e"), "run");

  it("the loss falls well below uniform (5.55 nats) and every output is written", () => {
    const r = cli([
      "train",
      "--steps",
      "150",
      "--batch-size",
      "8",
      "--seq-len",
      "64",
      "--eval-every",
      "50",
      "--log-every",
      "25",
      "--out",
      run,
      "--trace-precision",
    ]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(
      /step +25\/150 \| loss [\d.]+ .*tok\/s \| load max\/mean [\d.]+, \d+ idle experts \| eta/,
    );
    expect(r.stdout).toMatch(/precision trace:\npackage +fprop +dgrad +wgrad\nattention +fp8 +fp8 +fp8/);
    const rows = readFileSync(join(run, "metrics.jsonl"), "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l));
    expect(rows).toHaveLength(150);
    for (const k of [
      "step",
      "loss",
      "lr",
      "grad_norm",
      "tokens_per_s",
      "ms_per_step",
      "load_cv",
      "load_max_over_mean",
      "load_max_over_mean_by_layer",
      "load_idle_experts",
    ])
      expect(rows[0]).toHaveProperty(k);
    // tiny's MoE layers are 1, 2 and 3; the worst layer is the one reported on its own.
    for (const r of rows) {
      expect(r.load_max_over_mean_by_layer).toHaveLength(3);
      expect(r.load_max_over_mean).toBe(Math.max(...r.load_max_over_mean_by_layer));
      expect(Number.isInteger(r.load_idle_experts)).toBe(true);
    }
    // FP8 range counts every --fp8-stats-every steps (100 by default), not on every logged step.
    expect(rows.filter((r) => r.fp8_underflow !== undefined).map((r) => r.step)).toEqual([100]);
    expect(rows[99].fp8_underflow).toBeGreaterThan(0);
    // The progress line's tokens/s is the mean over the steps since the line before (steps 76-100:
    // step 100 counts FP8 ranges and runs slower than the rest).
    const ms = rows.slice(75, 100).reduce((a, r) => a + r.ms_per_step, 0);
    const shown = Number(/step 100\/150 \| .*\| (\d+) tok\/s/.exec(r.stdout)?.[1]);
    expect(shown).toBe(Math.round((25 * 8 * 64 * 1000) / ms));
    const tail = rows.slice(-20).reduce((a, r) => a + r.loss, 0) / 20;
    expect(rows[0].loss).toBeGreaterThan(5.3);
    expect(tail).toBeLessThan(3.2);
    const vals = rows.filter((r) => r.val_loss !== undefined);
    expect(vals.map((r) => r.step)).toEqual([50, 100, 150]);
    expect(vals.at(-1).val_loss).toBeLessThan(3.3);
    // The validation batches' loads (routing without the router noise): a max/mean between even (1)
    // and every token on the same 2 of 8 experts (4), and a count of idle experts.
    for (const r of vals) {
      expect(r.val_load_max_over_mean).toBeGreaterThanOrEqual(1);
      expect(r.val_load_max_over_mean).toBeLessThanOrEqual(4);
      expect(Number.isInteger(r.val_load_idle_experts)).toBe(true);
    }
    expect(rows.filter((r) => r.val_load_max_over_mean !== undefined).map((r) => r.step)).toEqual([
      50, 100, 150,
    ]);
    expect(r.stdout).toMatch(/step +50\/150 \| loss [\d.]+ \| val [\d.]+ \(load max\/mean [\d.]+\) \|/);
    const svg = readFileSync(join(run, "loss.svg"), "utf8");
    expect(svg).toMatch(/^<svg/);
    expect(svg).toContain("validation loss");
    const load = readFileSync(join(run, "expert-load.svg"), "utf8");
    expect(load).toMatch(/^<svg/);
    for (const name of ["layer 1", "layer 2", "layer 3", "balanced"]) expect(load).toContain(name);
    const ck = join(run, "checkpoints", "step-150");
    for (const f of [
      "model.safetensors",
      "optimizer.safetensors",
      "config.json",
      "trainer-state.json",
      "checksums.json",
    ])
      expect(existsSync(join(ck, f)), f).toBe(true);
    const hf = JSON.parse(readFileSync(join(ck, "config.json"), "utf8"));
    expect(hf).toMatchObject({
      model_type: "deepseek_v3",
      architectures: ["DeepseekV3ForCausalLM"],
      q_lora_rank: null,
      n_group: 1,
    });
    expect(readFileSync(join(ck, "config.json"), "utf8")).toMatch(/"routed_scaling_factor": 1\.0,/);
  }, 600_000);

  it("eval prints {loss, tokens} over consecutive windows", () => {
    const r = cli([
      "eval",
      "--checkpoint",
      join(run, "checkpoints", "step-150"),
      "--data",
      "datasets/default",
      "--batches",
      "2",
      "--json",
    ]);
    expect(r.status, r.stderr).toBe(0);
    const j = JSON.parse(r.stdout);
    expect(j.tokens).toBe(2 * 8 * 64);
    expect(j.loss).toBeGreaterThan(1);
    expect(j.loss).toBeLessThan(3.5);
  }, 120_000);

  it("sample generates text", () => {
    const r = cli([
      "sample",
      "--checkpoint",
      join(run, "checkpoints", "step-150"),
      "--prompt",
      "ROMEO",
      "--tokens",
      "40",
      "--temperature",
      "0.5",
    ]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout.startsWith("ROMEO")).toBe(true);
    expect(r.stdout.length).toBeGreaterThan(30);
  }, 120_000);
});
