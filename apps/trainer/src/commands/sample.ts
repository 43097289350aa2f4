// `moe8 sample --checkpoint DIR [--prompt TEXT] [--tokens N] [--temperature T]`: generated text,
// with the checkpoint's own tokenizer (run/checkpoint-tokenizer.ts).
import { UsageError } from "@moe8/fp8-core";
import { createBackend } from "@moe8/kernels";
import { Rng } from "@moe8/tensor";
import { type FlagSpec, intFlag, parseArgs } from "../args.ts";
import { checkpointTokenizer } from "../run/checkpoint-tokenizer.ts";
import { loadModel } from "../run/load-model.ts";

export const SAMPLE_FLAGS: FlagSpec = {
  checkpoint: "string",
  prompt: "string",
  tokens: "int",
  temperature: "number",
  seed: "int",
  backend: "string",
  debug: "boolean",
};

export async function sample(argv: string[]): Promise<number> {
  const { flags } = parseArgs(argv, SAMPLE_FLAGS);
  if (!flags.checkpoint) throw new UsageError("sample needs --checkpoint DIR");
  const temperature = Number(flags.temperature ?? 0.8);
  if (!(temperature >= 0 && temperature <= 100))
    throw new UsageError(`--temperature ${flags.temperature}: must be in [0, 100]`);
  const n = intFlag(flags, "tokens", 1, 1_000_000) ?? 200;
  const b = createBackend((flags.backend ?? "auto") as "auto");
  const { model, train, state } = loadModel(String(flags.checkpoint), b, {
    precision: "fp32",
    shape: (t) => ({ batch: 1, seq: t.seqLen }),
  });
  const tok = await checkpointTokenizer(String(flags.checkpoint), state, model.cfg.vocab_size);
  const rng = new Rng(Number(flags.seed ?? 0));
  const prompt = String(flags.prompt ?? "\n");
  const ctx = Array.from(tok.encode(prompt));
  if (!ctx.length) ctx.push(0);
  const maxT = train.seqLen;
  const out: number[] = [];
  const V = model.cfg.vocab_size;
  for (let i = 0; i < n; i++) {
    const window = ctx.slice(-maxT);
    const T = window.length;
    const logits = await b.scope(async () => {
      const l = model.forward(b.upload(Int32Array.from(window), [T], "i32"), { batch: 1, seq: T });
      model.clearSaved();
      return (await l.read()) as Float32Array;
    });
    const last = logits.subarray((T - 1) * V, T * V);
    let next = 0;
    if (temperature === 0) {
      for (let v = 1; v < V; v++) if (last[v] > last[next]) next = v;
    } else {
      let m = Number.NEGATIVE_INFINITY;
      for (let v = 0; v < V; v++) m = Math.max(m, last[v]);
      const p = Array.from(last, (x) => Math.exp((x - m) / temperature));
      let r = rng.next() * p.reduce((a, x) => a + x, 0);
      next = V - 1;
      for (let v = 0; v < V; v++) {
        r -= p[v];
        if (r <= 0) {
          next = v;
          break;
        }
      }
    }
    ctx.push(next);
    out.push(next);
  }
  model.dispose();
  process.stdout.write(`${prompt}${tok.decode(out)}\n`);
  return 0;
}
