// `moe8 eval --checkpoint DIR --data PATH`: mean token cross-entropy over consecutive,
// non-overlapping windows of seq_len + 1 tokens read in order from the start of the data.
import { sequentialWindows } from "@moe8/data";
import { UsageError } from "@moe8/fp8-core";
import { createBackend } from "@moe8/kernels";
import { parseArgs } from "../args.ts";
import { loadModel } from "../run/load-model.ts";

export async function evaluate(argv: string[]): Promise<number> {
  const { flags } = parseArgs(argv, {
    checkpoint: "string",
    data: "string",
    precision: "string",
    batches: "int",
    "batch-size": "int",
    "seq-len": "int",
    backend: "string",
    json: "boolean",
    debug: "boolean",
  });
  if (!flags.checkpoint) throw new UsageError("eval needs --checkpoint DIR");
  if (!flags.data) throw new UsageError("eval needs --data PATH (a dataset folder or .arrows file)");
  const b = createBackend((flags.backend ?? "auto") as "auto");
  const { model, train } = loadModel(String(flags.checkpoint), b, flags.precision as string | undefined);
  const T = Number(flags["seq-len"] ?? train.seqLen);
  const B = Number(flags["batch-size"] ?? train.batchSize);
  const maxBatches = flags.batches === undefined ? Number.POSITIVE_INFINITY : Number(flags.batches);
  if (T > model.cfg.max_position_embeddings)
    throw new UsageError(`--seq-len ${T} is beyond the model's max_position_embeddings`);
  let sum = 0;
  let tokens = 0;
  let pending: Int32Array[] = [];
  let batches = 0;
  const run = async (windows: Int32Array[]) => {
    const n = windows.length;
    const ids = new Int32Array(n * T);
    const tg = new Int32Array(n * T);
    windows.forEach((w, i) => {
      ids.set(w.subarray(0, T), i * T);
      tg.set(w.subarray(1), i * T);
    });
    const loss = await b.scope(async () =>
      model
        .evalLoss(b.upload(ids, [n * T], "i32"), b.upload(tg, [n * T], "i32"), { batch: n, seq: T })
        .ce.item(),
    );
    sum += loss * n * T;
    tokens += n * T;
    batches++;
  };
  for await (const w of sequentialWindows(String(flags.data), T, { vocabSize: model.cfg.vocab_size })) {
    pending.push(w.slice());
    if (pending.length === B) {
      await run(pending);
      pending = [];
      if (batches >= maxBatches) break;
    }
  }
  if (pending.length && batches < maxBatches) await run(pending);
  model.dispose();
  if (tokens === 0) throw new UsageError(`${flags.data}: fewer than ${T + 1} tokens, no window to evaluate`);
  const result = { loss: sum / tokens, tokens };
  if (flags.json) console.log(JSON.stringify(result));
  else
    console.log(
      `loss ${result.loss.toFixed(6)} nats over ${tokens} tokens (perplexity ${Math.exp(result.loss).toFixed(3)})`,
    );
  return 0;
}
