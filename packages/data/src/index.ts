// @moe8/data: Arrow IPC stream token datasets (*.arrows + manifest.json), tokenizers, the loader.
export { tokenBatch, tokenSchema } from "./arrow-build.ts";
export { type Block, type Dataset, type OpenOptions, openDataset, readBlockDocs } from "./dataset.ts";
export { brief, clip } from "./errors.ts";
export {
  checkRegular,
  errnoCode,
  ioError,
  ioReason,
  openRegularSync,
  readAtSync,
  readRegularFileSync,
} from "./files.ts";
export { type Batch, type Cursor, type LoaderOptions, TokenLoader } from "./loader.ts";
export {
  checkVocab,
  MANIFEST_FILE,
  MANIFEST_FORMAT,
  type Manifest,
  readManifest,
  type ShardInfo,
  type TokenizerSpec,
} from "./manifest.ts";
export { DEFAULT_DATASET_DIR } from "./paths.ts";
export { refuseRawInput } from "./prepare/inputs.ts";
export { type PrepareOptions, type PrepareProgress, prepareData } from "./prepare/prepare.ts";
export { Rng, type RngState } from "./prng.ts";
export { formatProgressBar } from "./progress.ts";
export { type ReadOptions, readShardDocuments } from "./reader.ts";
export { type Split, type SplitOptions, splitDocuments } from "./split.ts";
export { BpeTokenizer } from "./tokenizers/bpe.ts";
export { EOT_TOKEN } from "./tokenizers/bpe-train.ts";
export { ByteTokenizer } from "./tokenizers/byte.ts";
export { hfTokenizerFiles, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE } from "./tokenizers/hf-files.ts";
export { loadTokenizer, parseTokenizerSpec, type TokenizerChoice } from "./tokenizers/load.ts";
export type { Tokenizer } from "./tokenizers/types.ts";
export { sequentialWindows, type WindowOptions } from "./windows.ts";
export { type WriteShardsOptions, writeShards } from "./writer.ts";
