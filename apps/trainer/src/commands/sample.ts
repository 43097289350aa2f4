// `moe8 sample --checkpoint DIR [--prompt TEXT] [--tokens N] [--num-samples N] [--temperature T]
// [--top-k K] [--top-p P] [--repetition-penalty R]`: text generated from a checkpoint with its own
// tokenizer (run/checkpoint-tokenizer.ts), from any working directory. The prompt and the new tokens
// must fit in the context the model was trained on: positions beyond it were never trained, so a
// longer request is refused rather than answered with noise. Tokens come from a KV cache
// (packages/model/src/kv-decode.ts); --no-kv-cache runs the whole context again for each token;
// --speculative has a model with the multi-token prediction module draft every other token
// (packages/model/src/speculative.ts: the same distribution, fewer passes of the trunk).
import { UsageError } from "@moe8/fp8-core";
import { createBackend } from "@moe8/kernels";
import {
  generate,
  generateByRecompute,
  generateSpeculative,
  SAMPLING_DEFAULTS,
  type SamplingOptions,
} from "@moe8/model";
import { Rng } from "@moe8/tensor";
import { type FlagSpec, intFlag, type ParsedArgs, parseArgs } from "../args.ts";
import { checkpointTokenizer } from "../run/checkpoint-tokenizer.ts";
import { loadModel } from "../run/load-model.ts";

export const SAMPLE_FLAGS: FlagSpec = {
  checkpoint: "string",
  prompt: "string",
  tokens: "int",
  "num-samples": "int",
  temperature: "number",
  "top-k": "int",
  "top-p": "number",
  "repetition-penalty": "number",
  seed: "int",
  "no-kv-cache": "boolean",
  speculative: "boolean",
  backend: "string",
  debug: "boolean",
};

/** The sampling flags, checked before the model is loaded (a --top-k beyond the vocabulary keeps all). */
function samplingFlags(flags: ParsedArgs["flags"]): SamplingOptions {
  const num = (name: string, fallback: number, ok: (v: number) => boolean, range: string) => {
    const v = flags[name] === undefined ? fallback : Number(flags[name]);
    if (!ok(v)) throw new UsageError(`--${name} ${flags[name]}: must be ${range}`);
    return v;
  };
  const d = SAMPLING_DEFAULTS;
  return {
    temperature: num("temperature", d.temperature, (v) => v >= 0 && v <= 100, "in [0, 100]"),
    topK: intFlag(flags, "top-k", 0, 2 ** 21) ?? d.topK,
    topP: num("top-p", d.topP, (v) => v > 0 && v <= 1, "in (0, 1]"),
    repetitionPenalty: num(
      "repetition-penalty",
      d.repetitionPenalty,
      (v) => v > 0 && v <= 100,
      "in (0, 100]",
    ),
  };
}

export async function sample(argv: string[]): Promise<number> {
  const { flags } = parseArgs(argv, SAMPLE_FLAGS);
  if (!flags.checkpoint) throw new UsageError("sample needs --checkpoint DIR");
  const dir = String(flags.checkpoint);
  const tokensFlag = intFlag(flags, "tokens", 1, 1_000_000);
  const samples = intFlag(flags, "num-samples", 1, 1024) ?? 1;
  const seed = intFlag(flags, "seed", 0, 2 ** 32 - 1) ?? 0;
  const sampling = samplingFlags(flags);
  if (flags.speculative && flags["no-kv-cache"])
    throw new UsageError("--speculative decodes through the KV cache: drop --no-kv-cache");
  const b = createBackend((flags.backend ?? "auto") as "auto");
  const { model, train, state } = loadModel(dir, b, {
    precision: "fp32",
    shape: (t) => ({ batch: samples, seq: t.seqLen }),
  });
  try {
    const V = model.cfg.vocab_size;
    const tok = await checkpointTokenizer(dir, state, V);
    const prompt = String(flags.prompt ?? "\n");
    const promptIds = Array.from(tok.encode(prompt));
    // An empty prompt starts from the end-of-text token (a document start), else from id 0.
    const ids = promptIds.length ? promptIds : [tok.eotId ?? 0];
    const context = Math.min(train.seqLen, model.cfg.max_position_embeddings);
    if (ids.length >= context)
      throw new UsageError(
        `--prompt: ${ids.length} tokens leave no room in the ${context}-token context this model was trained on`,
      );
    // Without --tokens: 200, or what room the context leaves.
    const tokens = tokensFlag ?? Math.max(1, Math.min(200, context - ids.length));
    if (ids.length + tokens > context)
      throw new UsageError(
        `--tokens ${tokens}: the prompt (${ids.length} tokens) and ${tokens} new tokens make ${ids.length + tokens}, beyond the ${context}-token context this model was trained on`,
      );
    if (flags.speculative && !model.mtp)
      throw new UsageError(
        `--speculative: ${dir} has no multi-token prediction module (train with --model.num_nextn_predict_layers 1)`,
      );
    const opts = { prompt: ids, tokens, samples, sampling, rng: new Rng(seed) };
    const t0 = performance.now();
    let out: number[][];
    if (flags.speculative) {
      const r = await generateSpeculative(model, opts);
      out = r.samples;
      const s = r.stats;
      const secs = (performance.now() - t0) / 1000;
      console.error(
        `speculative decoding: ${s.accepted} of ${s.drafted} drafts accepted (${((100 * s.accepted) / Math.max(1, s.drafted)).toFixed(0)}%), ${s.tokens} tokens in ${s.trunkPasses + samples} passes of the trunk (${(s.tokens / (s.trunkPasses + samples)).toFixed(2)} a pass), ${(s.tokens / secs).toFixed(1)} tokens/s`,
      );
    } else out = await (flags["no-kv-cache"] ? generateByRecompute : generate)(model, opts);
    // Decoded with the prompt: a character whose bytes the prompt and the sample share stays whole.
    const texts = out.map((gen) => tok.decode([...promptIds, ...gen]));
    process.stdout.write(
      samples === 1 ? `${texts[0]}\n` : texts.map((t, i) => `--- sample ${i + 1} ---\n${t}\n`).join(""),
    );
  } finally {
    model.dispose();
  }
  return 0;
}
