// `moe8 bench soak`: a long training run on the real data, sampling RSS and live tensors.
import { intFlag } from "../../args.ts";
import { DEFAULTS, resolveModel, type TrainConfig } from "../../run/config.ts";
import { openTrainData } from "../../run/data.ts";
import { buildSession } from "../../run/session.ts";

/**
 * Soak: many training steps with RSS and live tensors sampled, to show memory stays flat (no leak
 * in arenas, native buffers or the loader). Real data through the loader, as `train` runs it.
 */
export async function benchSoak(flags: Record<string, unknown>): Promise<number> {
  const steps = intFlag(flags, "steps", 1, 1e9) ?? 2000;
  const cfg: TrainConfig = {
    ...DEFAULTS,
    steps,
    batchSize: intFlag(flags, "batch-size", 1, 2 ** 16) ?? DEFAULTS.batchSize,
    backend: (flags.backend ?? "auto") as "auto",
    precision: String(flags.precision ?? "fp8"),
  };
  const modelCfg = resolveModel(cfg);
  const data = await openTrainData(cfg, modelCfg.vocab_size);
  const s = buildSession(cfg, modelCfg);
  const b = s.backend;
  const every = Math.max(1, Math.round(steps / 40));
  const samples: { step: number; rss_mb: number; tensors: number; s: number }[] = [];
  const t0 = performance.now();
  for (let step = 1; step <= steps; step++) {
    const batch = await data.next();
    await s.runner.step(batch, s.lrAt(step), {
      accum: cfg.gradAccum,
      routerNoise: s.routerNoiseAt(step),
    });
    if (step % every === 0 || step === 1) {
      const m = {
        step,
        rss_mb: Math.round(process.memoryUsage().rss / 2 ** 20),
        tensors: b.stats().tensors,
        s: Math.round((performance.now() - t0) / 1000),
      };
      samples.push(m);
      if (!flags.json)
        console.log(`step ${step}/${steps}  rss ${m.rss_mb} MB  live tensors ${m.tensors}  ${m.s}s`);
    }
  }
  const second = samples.slice(Math.floor(samples.length / 2)).map((x) => x.rss_mb);
  const summary = {
    steps,
    backend: b.name,
    precision: cfg.precision,
    rss_first_mb: samples[0].rss_mb,
    rss_last_mb: samples.at(-1)!.rss_mb,
    rss_max_mb: Math.max(...samples.map((x) => x.rss_mb)),
    rss_second_half_range_mb: Math.max(...second) - Math.min(...second),
    live_tensors: [...new Set(samples.map((x) => x.tensors))],
  };
  console.log(JSON.stringify(flags.json ? { ...summary, samples } : summary));
  s.dispose();
  return 0;
}
