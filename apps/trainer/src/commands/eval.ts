// `moe8 eval --checkpoint DIR --data PATH`: mean token cross-entropy over consecutive,
// non-overlapping windows of seq_len + 1 tokens read in order from the start of the data. The data
// must be tokenised as the checkpoint's training data was (same tokenizer and vocabulary), and
// every shard is verified against its manifest before the first window is evaluated.
import { statSync } from "node:fs";
import { basename, dirname } from "node:path";
import {
  checkVocab,
  DEFAULT_DATASET_DIR,
  type Manifest,
  readManifest,
  refuseRawInput,
  sequentialWindows,
} from "@moe8/data";
import { UsageError } from "@moe8/fp8-core";
import { createBackend } from "@moe8/kernels";
import { type FlagSpec, intFlag, parseArgs } from "../args.ts";
import { loadModel } from "../run/load-model.ts";
import type { TrainerState } from "../run/state.ts";

/** The tokenizer the checkpoint was trained with: recorded, or read from its training data's manifest. */
async function trainedTokenizer(state: TrainerState): Promise<{ type: string; vocab_size: number } | null> {
  if (state.tokenizer !== undefined) return state.tokenizer;
  const data = state.train_config.data ?? DEFAULT_DATASET_DIR;
  const m = await readManifest(data).catch(() => null);
  return m ? { type: m.tokenizer.type, vocab_size: m.vocab_size } : null;
}

/** Refuses data tokenised differently from the checkpoint's training data (its ids mean other text). */
async function checkTokenizer(data: string, manifest: Manifest, modelVocab: number, state: TrainerState) {
  checkVocab(manifest, modelVocab, { allowLarger: true });
  const trained = await trainedTokenizer(state);
  if (trained && (trained.type !== manifest.tokenizer.type || trained.vocab_size !== manifest.vocab_size))
    throw new UsageError(
      `${data}: tokenised with a ${manifest.tokenizer.type} tokenizer of vocab_size ${manifest.vocab_size}, but the checkpoint was trained on ${trained.type} data of vocab_size ${trained.vocab_size}`,
    );
}

export const EVAL_FLAGS: FlagSpec = {
  checkpoint: "string",
  data: "string",
  precision: "string",
  batches: "int",
  "batch-size": "int",
  "seq-len": "int",
  backend: "string",
  json: "boolean",
  debug: "boolean",
};

export async function evaluate(argv: string[]): Promise<number> {
  const { flags } = parseArgs(argv, EVAL_FLAGS);
  if (!flags.checkpoint) throw new UsageError("eval needs --checkpoint DIR");
  if (!flags.data) throw new UsageError("eval needs --data PATH (a dataset folder or .arrows file)");
  const data = String(flags.data);
  const seqFlag = intFlag(flags, "seq-len", 1, 2 ** 22);
  const batchFlag = intFlag(flags, "batch-size", 1, 2 ** 16);
  const maxBatches = intFlag(flags, "batches", 1, 2 ** 40) ?? Number.POSITIVE_INFINITY;
  const b = createBackend((flags.backend ?? "auto") as "auto");
  const { model, train, state } = loadModel(String(flags.checkpoint), b, {
    precision: flags.precision as string | undefined,
    shape: (t) => ({ batch: batchFlag ?? t.batchSize, seq: seqFlag ?? t.seqLen }),
  });
  try {
    const T = seqFlag ?? train.seqLen;
    const B = batchFlag ?? train.batchSize;
    if (T > model.cfg.max_position_embeddings)
      throw new UsageError(`--seq-len ${T} is beyond the model's max_position_embeddings`);
    // A dataset folder, or one shard of one (its folder's manifest lists it): same tokenizer as training.
    const st = statSync(data, { throwIfNoEntry: false });
    if (st) refuseRawInput(data, st.isDirectory());
    const manifest = st?.isDirectory()
      ? await readManifest(data)
      : await readManifest(dirname(data)).then(
          (m) => (m.shards.some((sh) => sh.file === basename(data)) ? m : null),
          () => null,
        );
    if (manifest) await checkTokenizer(data, manifest, model.cfg.vocab_size, state);
    let sum = 0;
    let mtpSum = 0;
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
      const [loss, mtp] = await b.scope(async () => {
        const r = model.evalLoss(b.upload(ids, [n * T], "i32"), b.upload(tg, [n * T], "i32"), {
          batch: n,
          seq: T,
        });
        return [await r.ce.item(), r.mtp ? await r.mtp.item() : 0];
      });
      sum += loss * n * T;
      // (The MTP loss is a mean over the n * (T - 1) positions that have a token two ahead.)
      mtpSum += mtp * n * (T - 1);
      tokens += n * T;
      batches++;
    };
    for await (const w of sequentialWindows(data, T, { vocabSize: model.cfg.vocab_size })) {
      pending.push(w.slice());
      if (pending.length === B) {
        await run(pending);
        pending = [];
        if (batches >= maxBatches) break;
      }
    }
    if (pending.length && batches < maxBatches) await run(pending);
    if (tokens === 0) throw new UsageError(`${data}: fewer than ${T + 1} tokens, no window to evaluate`);
    const mtpTokens = tokens - tokens / T;
    const result = { loss: sum / tokens, tokens, ...(model.mtp ? { mtp_loss: mtpSum / mtpTokens } : {}) };
    if (flags.json) console.log(JSON.stringify(result));
    else
      console.log(
        `loss ${result.loss.toFixed(6)} nats over ${tokens} tokens (perplexity ${Math.exp(result.loss).toFixed(3)})` +
          (result.mtp_loss !== undefined
            ? `; multi-token prediction (token i + 2): ${result.mtp_loss.toFixed(6)} over ${mtpTokens}`
            : ""),
      );
    return 0;
  } finally {
    model.dispose();
  }
}
