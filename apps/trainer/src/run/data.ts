// The training data of a run: the loader over the configured dataset (the bundled corpus by
// default), checked against the model's vocabulary before anything is written.
import { statSync } from "node:fs";
import { dirname } from "node:path";
import {
  type Batch,
  type Cursor,
  checkVocab,
  DEFAULT_DATASET_DIR,
  loadTokenizer,
  type Tokenizer,
  TokenLoader,
} from "@moe8/data";
import { UsageError } from "@moe8/fp8-core";
import type { TrainConfig } from "./config.ts";
import type { TokenizerId } from "./state.ts";

export interface TrainData {
  description: string;
  /** The tokenizer the data was made with (recorded in checkpoints for eval), null without a manifest. */
  tokenizer: TokenizerId | null;
  /** That tokenizer itself, written into checkpoints as tokenizer.json; null without a manifest. */
  textTokenizer: Tokenizer | null;
  next(): Promise<Batch>;
  /** The fixed held-out batches (at most `n`), the same on every call. */
  validation(n: number): Promise<Batch[]>;
  cursor(): Cursor;
}

export async function openTrainData(
  cfg: TrainConfig,
  modelVocab: number,
  cursor?: Cursor,
): Promise<TrainData> {
  const path = cfg.data ?? DEFAULT_DATASET_DIR;
  const loader = await TokenLoader.open(path, {
    seqLen: cfg.seqLen,
    batchSize: cfg.batchSize,
    seed: cfg.dataSeed ?? cfg.seed,
    valFraction: cfg.valFraction,
    cursor,
    vocabSize: cfg.data === null ? undefined : modelVocab,
  });
  const ds = loader.dataset;
  if (ds.manifest) checkVocab(ds.manifest, modelVocab, { allowLarger: true });
  else if (ds.vocabSize > modelVocab)
    throw new UsageError(
      `${path}: token ids reach ${ds.vocabSize - 1}, beyond the model's vocab_size ${modelVocab}`,
    );
  const manifestDir = statSync(path).isDirectory() ? path : dirname(path);
  return {
    description: `${path} (${ds.tokens} tokens)`,
    tokenizer: ds.manifest ? { type: ds.manifest.tokenizer.type, vocab_size: ds.manifest.vocab_size } : null,
    textTokenizer: ds.manifest ? await loadTokenizer(manifestDir) : null,
    next: () => loader.nextBatch(),
    validation: async (n) => (await loader.valBatches()).slice(0, n),
    cursor: () => loader.cursor(),
  };
}
