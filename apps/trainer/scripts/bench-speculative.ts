// Plain decoding against self-speculative decoding with the MTP module (packages/model/src/speculative.ts)
// on one checkpoint, in alternating rounds: generation time only (the model loaded once), tokens/s
// of each, the drafts accepted and the tokens per pass of the trunk, greedy and sampled (0.8). One
// JSON line per run, then the medians.
//   bun apps/trainer/scripts/bench-speculative.ts CHECKPOINT [BACKEND] [TOKENS] [ROUNDS]
import { createBackend } from "@moe8/kernels";
import { generate, generateSpeculative, SAMPLING_DEFAULTS, type SpeculativeStats } from "@moe8/model";
import { Rng } from "@moe8/tensor";
import { loadModel } from "../src/run/load-model.ts";

const [dir, backend = "auto", tokensArg = "100", roundsArg = "3"] = process.argv.slice(2);
if (!dir) throw new Error("usage: bench-speculative.ts CHECKPOINT [BACKEND] [TOKENS] [ROUNDS]");
const b = createBackend(backend as "auto");
const { model } = loadModel(dir, b, { precision: "fp32", shape: (t) => ({ batch: 1, seq: t.seqLen }) });
const tokens = Number(tokensArg);
// "KING HENRY:" in bytes (the bundled corpus's byte-level tokenizer); other vocabularies read ids < 256 too.
const prompt = Array.from("KING HENRY:", (c) => c.charCodeAt(0) % model.cfg.vocab_size);
const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[xs.length >> 1];
const summary: Record<string, unknown> = { backend: b.name, tokens };
for (const temperature of [0, 0.8]) {
  const rates: Record<"plain" | "speculative", number[]> = { plain: [], speculative: [] };
  let stats: SpeculativeStats | null = null;
  // A warm-up of each (kernel compilation, caches), then the rounds.
  for (let round = -1; round < Number(roundsArg); round++)
    for (const spec of [false, true]) {
      const o = {
        prompt,
        tokens,
        samples: 1,
        sampling: { ...SAMPLING_DEFAULTS, temperature },
        rng: new Rng(round + 1),
      };
      const t0 = performance.now();
      const r = spec ? await generateSpeculative(model, o) : null;
      if (!spec) await generate(model, o);
      const ms = performance.now() - t0;
      if (round < 0) continue;
      if (r) stats = r.stats;
      rates[spec ? "speculative" : "plain"].push((tokens * 1000) / ms);
      console.log(JSON.stringify({ temperature, round, spec, ms: +ms.toFixed(1), stats: r?.stats }));
    }
  const [p, s] = [median(rates.plain), median(rates.speculative)];
  summary[`t${temperature}`] = {
    plain_tokens_per_s: +p.toFixed(1),
    speculative_tokens_per_s: +s.toFixed(1),
    speedup: +(s / p).toFixed(3),
    accepted: stats ? +(stats.accepted / stats.drafted).toFixed(3) : null,
    tokens_per_trunk_pass: stats ? +(stats.tokens / (stats.trunkPasses + 1)).toFixed(3) : null,
  };
}
console.log(JSON.stringify(summary));
model.dispose();
