// `moe8 bench step` end to end on the cpu backend: the JSON row users compare runs by, the experts'
// load of its first and profiled steps, and the profile file's per-layer counts (every routed token
// counted once per expert it went to).
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { CONFIGS } from "@moe8/model";
import { describe, expect, it } from "vitest";
import { CLI, tmp } from "./helpers.ts";

const B = 4;
const T = 32;

describe("bench step", () => {
  it("reports tokens/s and the experts' load, and writes each MoE layer's counts with --profile", () => {
    const dir = tmp("bench-step");
    const args = ["--config", "tiny", "--backend", "cpu", "--precision", "fp8", "--steps", "3"];
    const r = spawnSync(
      "bun",
      [CLI, "bench", "step", ...args, "--batch-size", `${B}`, "--seq-len", `${T}`, "--profile", "--json"],
      { cwd: dir, encoding: "utf8", env: { ...process.env, NO_COLOR: "1" } },
    );
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    const row = JSON.parse(r.stdout.trim().split("\n").at(-1)!);
    const cfg = CONFIGS.tiny;
    const ceiling = cfg.n_routed_experts / cfg.num_experts_per_tok;
    expect(row.tokens_per_step).toBe(B * T);
    expect(row.tokens_per_s).toBeGreaterThan(0);
    for (const key of ["expert_load_first", "expert_load"]) {
      expect(row[`${key}_max_over_mean`]).toBeGreaterThanOrEqual(1);
      expect(row[`${key}_worst`]).toBeGreaterThanOrEqual(row[`${key}_max_over_mean`]);
      expect(row[`${key}_worst`]).toBeLessThanOrEqual(ceiling);
    }
    const profile = JSON.parse(readFileSync(join(dir, row.profile), "utf8"));
    const layers: number[][] = profile.expertLoad;
    expect(layers).toHaveLength(cfg.num_hidden_layers - cfg.first_k_dense_replace);
    for (const counts of layers) {
      expect(counts).toHaveLength(cfg.n_routed_experts);
      expect(counts.reduce((a, x) => a + x, 0)).toBe(B * T * cfg.num_experts_per_tok);
    }
    // The largest count over the mean, recomputed from the counts, is what the row reports.
    const ratios = layers.map((c) => Math.max(...c) / (c.reduce((a, x) => a + x, 0) / c.length));
    expect(Math.max(...ratios)).toBeCloseTo(row.expert_load_worst, 3);
  }, 120_000);
});
