// The product's claim, checked: FP8 training as DeepSeek-V3 does it tracks BF16, and the test can
// fail (fp8-unscaled, the negative control, must not pass). Plus one step's gradient SQNR.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { presetPolicy } from "@moe8/fp8-core";
import { createBackend } from "@moe8/kernels";
import { CONFIGS, DeepSeekModel, trainStep } from "@moe8/model";
import { ADAMW_DEFAULTS, AdamW } from "@moe8/optimizer";
import { Rng, type Tensor } from "@moe8/tensor";
import { describe, expect, it } from "vitest";
import { cli, tmp } from "./helpers.ts";

const STEPS = 240;

describe("loss parity on tiny (native backend)", () => {
  it(`fp8 ends within 3% of bf16 over ${STEPS} steps (mean of two seeds); fp8-unscaled does not`, () => {
    const common = [
      "--config",
      "tiny",
      "--steps",
      String(STEPS),
      "--batch-size",
      "4",
      "--seq-len",
      "64",
      "--backend",
      "auto",
      "--yardsticks=false",
      "--json",
    ];
    const run = (precision: string, seeds = 1) => {
      const args = ["parity", ...common, "--precision", precision, "--seeds", String(seeds)];
      const r = cli([...args, "--out", tmp(`parity-${precision}`)]);
      expect(r.status, r.stderr).toBe(0);
      const report = JSON.parse(r.stdout.trim().split("\n").at(-1)!);
      // The mean is the mean of the per-seed comparisons the report lists beside it.
      expect(report.perSeed).toHaveLength(seeds);
      const perSeedMean =
        report.perSeed.reduce(
          (a: number, p: { variants: { trainRelDiff: number }[] }) => a + p.variants[0].trainRelDiff,
          0,
        ) / seeds;
      expect(report.comparisons[0].trainRelDiff).toBeCloseTo(perSeedMean, 12);
      expect(report.baselineSpread.train).toBeGreaterThanOrEqual(0);
      if (seeds > 1) expect(report.perSeed[0].bf16.train).not.toBe(report.perSeed[1].bf16.train);
      return report.comparisons as {
        label: string;
        trainRelDiff: number;
        valRelDiff: number;
      }[];
    };
    // Two seeds: one run's end point moves by a few percent under any small numerical change
    // (a precision swap, a reordered sum), so the mean of two is what is held to 3%.
    const fp8 = run("fp8", 2);
    console.log(
      fp8
        .map(
          (c) =>
            `${c.label}: train ${(100 * c.trainRelDiff).toFixed(2)}%, val ${(100 * c.valRelDiff).toFixed(2)}%`,
        )
        .join("\n"),
    );
    expect(fp8[0].trainRelDiff).toBeLessThanOrEqual(0.03);
    const unscaled = run("fp8-unscaled");
    console.log(`fp8-unscaled: train ${(100 * unscaled[0].trainRelDiff).toFixed(2)}%`);
    expect(unscaled[0].trainRelDiff).toBeGreaterThanOrEqual(0.1);
  }, 900_000);
});

describe("parity compares like with like", () => {
  it("every policy, the yardsticks included, trains with the same balancing: the run's --balance.* or the model's", () => {
    const balanceOf = (extra: string[]) => {
      const out = tmp("parity-balance");
      const r = cli([
        "parity",
        ...["--config", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--backend", "auto"],
        ...["--json", "--out", out, ...extra],
      ]);
      expect(r.status, r.stderr).toBe(0);
      const report = JSON.parse(readFileSync(join(out, "parity.json"), "utf8"));
      const policies = report.runs.map((run: { precision: string }) => run.precision);
      expect(policies).toEqual(["bf16", "fp8", "bf16", "fp32"]); // baseline, variant, two yardsticks
      return report.runs.map((run: { balance: unknown }) => run.balance);
    };
    const given = { gamma: 0.02, rule: "sign", alpha: 0.003, routerLr: 0.5, noise: 0.7, noiseUntil: 0.25 };
    const flags = ["--balance.gamma", "0.02", "--balance.rule", "sign", "--balance.alpha", "0.003"];
    const noise = ["--balance.noise", "0.7", "--balance.noise-until", "0.25"];
    expect(balanceOf([...flags, "--balance.router-lr", "0.5", ...noise])).toEqual(Array(4).fill(given));
    const { bias_update_speed: gamma, bias_update_rule: rule, seq_aux_alpha: alpha } = CONFIGS.tiny;
    const { router_noise: n, router_noise_until: until } = CONFIGS.tiny;
    expect(balanceOf([])).toEqual(
      Array(4).fill({ gamma, rule, alpha, routerLr: 1, noise: n, noiseUntil: until }),
    );
  }, 120_000);
});

// One step's gradient SQNR is heavy-tailed in a MoE: a token whose top-k experts differ between
// two precisions (a near tie in the router) changes whole expert gradients, and some batches are
// ill-conditioned enough that even BF16 falls 10-15 dB on them. So every expert is active here (no
// discrete choice: the router's weights stay continuous), and the median over six batches is what
// is compared. Medians measured after 0 to 60 training steps: fp8 27-40 dB, fp8-unscaled 2-17 dB
// (always 20 dB or more below fp8), bf16 48-52 dB.
describe("one step's gradients under fp8 against fp32", () => {
  it("median SQNR >= 25 dB after some training, 10 dB above the unscaled control", async () => {
    const b = createBackend("auto");
    const cfg = { ...CONFIGS.tiny, n_routed_experts: 4, num_experts_per_tok: 4 };
    const m = new DeepSeekModel(b, cfg, presetPolicy("fp32"), 0);
    const opt = new AdamW(b, m.params, { ...ADAMW_DEFAULTS, moments: "f32" });
    const rng = new Rng(11);
    const B = 4;
    const T = 64;
    const batch = () => {
      const ids = rng.ints(B * T, 256);
      const tg = ids.map((x, i) => (i % T === T - 1 ? x : ids[i + 1])); // a learnable pattern
      return { ids: b.keep(b.upload(ids, [B * T], "i32")), tg: b.keep(b.upload(tg, [B * T], "i32")) };
    };
    for (let i = 0; i < 30; i++) {
      const x = batch();
      await trainStep(m, opt, x.ids, x.tg, { batch: B, seq: T }, 3e-3);
      x.ids.dispose();
      x.tg.dispose();
    }
    const grads = async (preset: string, x: { ids: Tensor; tg: Tensor }) => {
      m.setPolicy(presetPolicy(preset));
      m.zeroGrad();
      await b.scope(async () => m.lossAndGrad(x.ids, x.tg, { batch: B, seq: T }).total.item());
      return Promise.all(m.params.map(async (p) => (await p.grad.read()) as Float32Array));
    };
    /** SQNR of each parameter's gradient and of all of them together, in dB. */
    const sqnr = (ref: Float32Array[], q: Float32Array[]) => {
      let sig = 0;
      let err = 0;
      const per = ref.map((g, t) => {
        let s = 0;
        let e = 0;
        for (let i = 0; i < g.length; i++) {
          s += g[i] * g[i];
          e += (q[t][i] - g[i]) ** 2;
        }
        sig += s;
        err += e;
        return [m.params[t].name, 10 * Math.log10(s / Math.max(e, 1e-30))] as const;
      });
      return { total: 10 * Math.log10(sig / err), per };
    };
    const presets = ["fp8", "fp8-unscaled", "bf16"] as const;
    const totals: Record<string, number[]> = { fp8: [], "fp8-unscaled": [], bf16: [] };
    for (let k = 0; k < 6; k++) {
      const x = batch();
      const ref = await grads("fp32", x);
      for (const p of presets) {
        const r = sqnr(ref, await grads(p, x));
        totals[p].push(r.total);
        if (k === 0 && p === "fp8")
          console.log(
            `gradient SQNR fp8 vs fp32, first batch: total ${r.total.toFixed(1)} dB; worst tensors:\n${[
              ...r.per,
            ]
              .sort((a, c) => a[1] - c[1])
              .slice(0, 6)
              .map(([n, d]) => `  ${n}: ${d.toFixed(1)} dB`)
              .join("\n")}`,
          );
      }
      x.ids.dispose();
      x.tg.dispose();
    }
    const median = (xs: number[]) => {
      const s = [...xs].sort((a, c) => a - c);
      return (s[2] + s[3]) / 2;
    };
    const med = Object.fromEntries(presets.map((p) => [p, median(totals[p])]));
    console.log(
      `median gradient SQNR over 6 batches (dB): ${presets.map((p) => `${p} ${med[p].toFixed(1)} [${totals[p].map((v) => v.toFixed(1)).join(", ")}]`).join("; ")}`,
    );
    expect(med.fp8).toBeGreaterThanOrEqual(25);
    expect(med.fp8 - med["fp8-unscaled"]).toBeGreaterThanOrEqual(10);
    expect(med.bf16).toBeGreaterThan(med.fp8);
    m.dispose();
    opt.dispose();
  }, 300_000);
});
