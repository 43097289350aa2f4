// `moe8 parity`: trains the same model from the same initial weights on the same data order under
// two (or more) precision policies and compares end-of-run losses, with yardsticks (BF16 against a
// BF16 run with another data order; FP32 against BF16) so a difference can be judged against noise.
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describePolicy, UsageError } from "@moe8/fp8-core";
import type { BiasRule } from "@moe8/tensor";
import { type FlagSpec, parseArgs } from "../args.ts";
import { resolveModel, type TrainConfig } from "../run/config.ts";
import { openTrainData } from "../run/data.ts";
import { configFromArgs, TRAIN_FLAGS } from "../run/flags.ts";
import { buildSession, policyOf } from "../run/session.ts";
import { withDatasetVocab } from "../run/start.ts";
import { linePlot } from "../run/svg.ts";
import { validationLoss } from "./train.ts";

export interface RunResult {
  label: string;
  precision: string;
  overrides: Record<string, string>;
  policy: string;
  seed: number;
  dataSeed: number;
  /** The expert balancing this run trained with: the same for every policy compared. */
  balance: {
    gamma: number;
    rule: BiasRule;
    alpha: number;
    routerLr: number;
    noise: number;
    noiseUntil: number;
  };
  losses: number[];
  ema: number[];
  /** Mean EMA(0.9) training loss over the last 10% of steps. */
  finalTrain: number;
  finalVal: number;
  tokensPerS: number;
  peakRssMb: number;
  /** Peak device memory (cuda backend only). */
  peakDeviceMb?: number;
}

export interface Variant {
  label: string;
  precision: string;
  overrides: Record<string, string>;
}

/** What `--sweep` compares against BF16: each choice of the recipe swapped on its own. */
export const SWEEP: Variant[] = [
  { label: "fp8 (DeepSeek-V3 recipe)", precision: "fp8", overrides: {} },
  {
    label: "fp8, wgrad in bf16",
    precision: "fp8",
    overrides: { "attention.wgrad": "bf16", "moe-layers.wgrad": "bf16" },
  },
  {
    label: "fp8 fprop only",
    precision: "fp8",
    overrides: {
      "attention.dgrad": "bf16",
      "attention.wgrad": "bf16",
      "moe-layers.dgrad": "bf16",
      "moe-layers.wgrad": "bf16",
    },
  },
  { label: "fp8, moe-layers in bf16", precision: "fp8", overrides: { "moe-layers": "bf16" } },
  { label: "fp8, attention in bf16", precision: "fp8", overrides: { attention: "bf16" } },
  { label: "fp8, e5m2 gradients", precision: "fp8", overrides: { gradients: "e5m2" } },
  { label: "fp8, power-of-two scales", precision: "fp8", overrides: { pow2Scales: "true" } },
  { label: "fp8, bf16 activation cache", precision: "fp8", overrides: { cacheActivations: "bf16" } },
  { label: "fp8-tensorwise", precision: "fp8-tensorwise", overrides: {} },
  { label: "fp8-unscaled (negative control)", precision: "fp8-unscaled", overrides: {} },
];

/** Peak device memory in MiB, when the backend keeps one (cuda). */
function deviceMb(b: object): number | undefined {
  const peak = (b as { peakMemory?: () => number }).peakMemory?.();
  return peak === undefined ? undefined : Math.round(peak / 2 ** 20);
}

export function emaCurve(xs: number[], beta = 0.9): number[] {
  const out: number[] = [];
  let m = 0;
  xs.forEach((x, i) => {
    m = beta * m + (1 - beta) * x;
    out.push(m / (1 - beta ** (i + 1))); // bias-corrected, so early steps are not pulled to zero
  });
  return out;
}

export function tailMean(xs: number[], fraction = 0.1): number {
  const n = Math.max(1, Math.round(xs.length * fraction));
  const tail = xs.slice(-n);
  return tail.reduce((a, x) => a + x, 0) / tail.length;
}

export const relDiff = (a: number, b: number) => (a - b) / b;

/** Trains one policy for cfg.steps steps and returns its curve and end-of-run figures. */
export async function trainForParity(
  cfg: TrainConfig,
  v: Variant,
  log: (s: string) => void,
): Promise<RunResult> {
  const c: TrainConfig = { ...cfg, precision: v.precision, precisionOverrides: v.overrides };
  const modelCfg = resolveModel(c);
  const data = await openTrainData(c, modelCfg.vocab_size);
  const s = buildSession(c, modelCfg);
  const b = s.backend;
  (b as { resetPeakMemory?: () => void }).resetPeakMemory?.(); // per-policy peak, not the process's
  const losses: number[] = [];
  let peak = 0;
  const t0 = performance.now();
  try {
    for (let step = 1; step <= c.steps; step++) {
      const batch = await data.next();
      const r = await s.runner.step(batch, s.lrAt(step), {
        accum: c.gradAccum,
        routerNoise: s.routerNoiseAt(step),
      });
      losses.push(r.loss);
      peak = Math.max(peak, process.memoryUsage().rss);
      if (step % Math.max(1, Math.round(c.steps / 5)) === 0)
        log(`  ${v.label}: step ${step}/${c.steps} loss ${r.loss.toFixed(4)}`);
    }
    const secs = (performance.now() - t0) / 1000;
    const ema = emaCurve(losses);
    return {
      label: v.label,
      precision: v.precision,
      overrides: v.overrides,
      policy: describePolicy(s.policy),
      seed: c.seed,
      dataSeed: c.dataSeed ?? c.seed,
      balance: {
        gamma: modelCfg.bias_update_speed,
        rule: modelCfg.bias_update_rule,
        alpha: modelCfg.seq_aux_alpha,
        routerLr: c.balance.routerLr ?? 1,
        noise: modelCfg.router_noise ?? 0,
        noiseUntil: modelCfg.router_noise_until ?? 0.5,
      },
      losses,
      ema,
      finalTrain: tailMean(ema),
      finalVal: await validationLoss(s, data, c),
      tokensPerS: (c.steps * c.batchSize * c.seqLen) / secs,
      peakRssMb: Math.round(peak / 2 ** 20),
      peakDeviceMb: deviceMb(b),
    };
  } finally {
    s.dispose();
  }
}

export interface Comparison {
  label: string;
  against: string;
  trainRelDiff: number;
  valRelDiff: number;
  tokensPerS: number;
  peakRssMb: number;
  peakDeviceMb?: number;
}

function compare(a: RunResult, b: RunResult, label = a.label): Comparison {
  return {
    label,
    against: b.label,
    trainRelDiff: relDiff(a.finalTrain, b.finalTrain),
    valRelDiff: relDiff(a.finalVal, b.finalVal),
    tokensPerS: a.tokensPerS,
    peakRssMb: a.peakRssMb,
    peakDeviceMb: a.peakDeviceMb,
  };
}

function plot(runs: RunResult[], base: RunResult, title: string): string {
  const W = 760;
  const top = linePlot(
    runs.map((r) => ({
      name: `${r.label} (EMA 0.9)`,
      points: r.ema.map((y, i) => [i + 1, y] as [number, number]),
    })),
    { title, xLabel: "step", yLabel: "training loss", width: W, height: 380 },
  );
  const bottom = linePlot(
    runs
      .filter((r) => r !== base)
      .map((r) => ({
        name: `${r.label} vs ${base.label}`,
        points: r.ema.map((y, i) => [i + 1, (100 * (y - base.ema[i])) / base.ema[i]] as [number, number]),
      })),
    {
      title: "relative difference of EMA losses",
      xLabel: "step",
      yLabel: "difference (%)",
      width: W,
      height: 300,
    },
  );
  const inner = (svg: string) => svg.replace(/^<svg[^>]*>/, "").replace(/<\/svg>\s*$/, "");
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="680" font-family="sans-serif" font-size="12">\n${inner(top)}<g transform="translate(0 380)">${inner(bottom)}</g>\n</svg>\n`;
}

const pct = (x: number) => `${x >= 0 ? "+" : ""}${(100 * x).toFixed(2)}%`;

export const PARITY_FLAGS: FlagSpec = {
  ...TRAIN_FLAGS,
  against: "string",
  seeds: "int",
  sweep: "boolean",
  yardsticks: "boolean",
};

export async function parity(argv: string[]): Promise<number> {
  const args = parseArgs(argv, PARITY_FLAGS, ["precision."]);
  const f = args.flags;
  if (f.resume !== undefined) throw new UsageError("parity does not take --resume");
  if (f.tensorboard !== undefined) throw new UsageError("parity does not take --tensorboard");
  const stepsGiven = f.steps !== undefined;
  // A bpe dataset's vocab_size, where the user set none, as train takes it.
  const { cfg: cfg0, taken } = await withDatasetVocab(configFromArgs(args));
  const cfg: TrainConfig = { ...cfg0, steps: stepsGiven ? cfg0.steps : 300, evalEvery: 0, saveEvery: 0 };
  const against = String(f.against ?? "bf16");
  policyOf({ precision: against, precisionOverrides: {} }); // validate before any work
  const seeds = Number(f.seeds ?? 1);
  if (seeds < 1) throw new UsageError(`--seeds ${seeds}: must be at least 1`);
  const out = String(f.out ?? join("runs", `parity-${new Date().toISOString().replace(/[:.]/g, "-")}`));
  const log = (s: string) => {
    if (!f.json) console.log(s);
  };

  const baseV: Variant = { label: against, precision: against, overrides: {} };
  const variants: Variant[] = f.sweep
    ? SWEEP
    : [
        {
          label:
            cfg.precision +
            Object.entries(cfg.precisionOverrides)
              .map(([k, v]) => ` ${k}=${v}`)
              .join(""),
          precision: cfg.precision,
          overrides: cfg.precisionOverrides,
        },
      ];
  const comparisons: Comparison[][] = [];
  const allRuns: RunResult[][] = [];
  for (let k = 0; k < seeds; k++) {
    const c = { ...cfg, seed: cfg.seed + k, dataSeed: null };
    const vocab = taken ? `, vocab_size ${resolveModel(cfg).vocab_size} (${taken})` : "";
    log(
      `seed ${c.seed}: ${cfg.steps} steps of ${cfg.batchSize}x${cfg.seqLen} tokens on ${cfg.backend}${vocab}`,
    );
    const base = await trainForParity(c, baseV, log);
    const runs = [base];
    const cmp: Comparison[] = [];
    for (const v of variants) {
      const r = await trainForParity(c, v, log);
      runs.push(r);
      cmp.push(compare(r, base));
    }
    // Yardsticks: the noise floor (another data order) and FP32 against BF16 (--yardsticks=false skips).
    if (f.yardsticks === false) {
      comparisons.push(cmp);
      allRuns.push(runs);
      continue;
    }
    const reseed = await trainForParity(
      { ...c, dataSeed: c.seed + 1000 },
      { ...baseV, label: `${against} (other data order)` },
      log,
    );
    const fp32 = await trainForParity(c, { label: "fp32", precision: "fp32", overrides: {} }, log);
    runs.push(reseed, fp32);
    cmp.push(
      { ...compare(reseed, base), label: `yardstick: ${against} seed-to-seed` },
      { ...compare(fp32, base), label: "yardstick: fp32" },
    );
    comparisons.push(cmp);
    allRuns.push(runs);
  }
  // Mean over seeds of each comparison.
  const mean = comparisons[0].map((c0, i) => ({
    ...c0,
    trainRelDiff: comparisons.reduce((a, c) => a + c[i].trainRelDiff, 0) / seeds,
    valRelDiff: comparisons.reduce((a, c) => a + c[i].valRelDiff, 0) / seeds,
  }));
  // Per seed: the baseline's losses and each variant's; across seeds, how far the baseline's own
  // losses spread (max - min, relative to their mean): the yardstick for the means above.
  const lossesOf = (r: RunResult) => ({ train: r.finalTrain, val: r.finalVal });
  const perSeed = allRuns.map((runs, k) => ({
    seed: runs[0].seed,
    [against]: lossesOf(runs[0]),
    variants: comparisons[k].map((c, i) => ({
      label: c.label,
      ...lossesOf(runs[i + 1]),
      trainRelDiff: c.trainRelDiff,
      valRelDiff: c.valRelDiff,
    })),
  }));
  const spreadOf = (xs: number[]) =>
    (Math.max(...xs) - Math.min(...xs)) / (xs.reduce((a, x) => a + x, 0) / xs.length);
  const baselineSpread = {
    train: spreadOf(allRuns.map((r) => r[0].finalTrain)),
    val: spreadOf(allRuns.map((r) => r[0].finalVal)),
  };
  mkdirSync(out, { recursive: true });
  const runs0 = allRuns[0];
  const report = {
    config: {
      model: cfg.model,
      steps: cfg.steps,
      batchSize: cfg.batchSize,
      seqLen: cfg.seqLen,
      lr: cfg.lr,
      backend: cfg.backend,
      balance: cfg.balance,
      seeds,
    },
    against,
    comparisons: mean,
    perSeed,
    baselineSpread,
    runs: allRuns.flat().map(({ ema: _e, ...r }) => r),
  };
  writeFileSync(join(out, "parity.json"), `${JSON.stringify(report, null, 2)}\n`);
  writeFileSync(
    join(out, "parity.svg"),
    plot(
      runs0, // the baseline, each variant, then the yardsticks
      runs0[0],
      `loss parity against ${against}`,
    ),
  );
  if (f.json) console.log(JSON.stringify({ comparisons: mean, perSeed, baselineSpread, out }));
  else {
    if (seeds > 1) {
      // Each seed's end losses (train: the EMA over the last 10% of steps), then the baseline's spread.
      const loss = (x: { train: number; val: number }) => `${x.train.toFixed(4)} / ${x.val.toFixed(4)}`;
      console.log(`\nper seed: training / validation loss`);
      perSeed.forEach((p, k) => {
        console.log(
          `  seed ${p.seed}: ${against} ${loss(lossesOf(allRuns[k][0]))}` +
            p.variants
              .map((v) => `, ${v.label} ${loss(v)} (${pct(v.trainRelDiff)} / ${pct(v.valRelDiff)})`)
              .join(""),
        );
      });
      console.log(
        `  ${against} across seeds (max - min over the mean): ${(100 * baselineSpread.train).toFixed(2)}% training, ${(100 * baselineSpread.val).toFixed(2)}% validation`,
      );
    }
    console.log(
      `\n${"variant".padEnd(40)} ${"train (last 10%, EMA)".padStart(22)} ${"validation".padStart(12)}  tokens/s  peak RSS`,
    );
    for (const c of mean)
      console.log(
        `${c.label.padEnd(40)} ${pct(c.trainRelDiff).padStart(22)} ${pct(c.valRelDiff).padStart(12)}  ${String(Math.round(c.tokensPerS)).padStart(8)}  ${c.peakRssMb} MB${c.peakDeviceMb !== undefined ? `, device ${c.peakDeviceMb} MB` : ""}`,
      );
    console.log(
      `(relative to ${against}: (L - L_${against}) / L_${against}; written ${join(out, "parity.json")} and parity.svg)`,
    );
  }
  return 0;
}
