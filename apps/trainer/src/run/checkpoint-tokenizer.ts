// The tokenizer of a checkpoint, for sample and export. A checkpoint holds it as tokenizer.json
// (verified with the other files by readCheckpoint), so the folder alone is enough, from any working
// directory. Checkpoints written before that find it through the dataset path their
// trainer-state.json recorded, which is relative to the directory the run was started in.
import { existsSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { BpeTokenizer, ByteTokenizer, DEFAULT_DATASET_DIR, loadTokenizer, type Tokenizer } from "@moe8/data";
import { UsageError } from "@moe8/fp8-core";
import type { TrainerState } from "./state.ts";

export async function checkpointTokenizer(
  dir: string,
  state: TrainerState,
  vocab: number,
): Promise<Tokenizer> {
  const file = join(dir, "tokenizer.json");
  if (existsSync(file)) {
    const tok = await BpeTokenizer.load(file);
    // Ids past the embedding would index outside it.
    if (tok.vocabSize > vocab)
      throw new UsageError(`${file}: ${tok.vocabSize} tokens, more than the model's vocab_size ${vocab}`);
    return tok;
  }
  if (state.tokenizer?.type === "byte" || (!state.tokenizer && vocab === 256)) return new ByteTokenizer();
  const data = state.train_config.data ?? DEFAULT_DATASET_DIR;
  const st = statSync(data, { throwIfNoEntry: false });
  if (!st)
    throw new UsageError(
      `checkpoint ${dir} has no tokenizer.json (written before checkpoints held one) and its dataset ${data} is not found from ${process.cwd()}: run from the folder the run was started in`,
    );
  try {
    return await loadTokenizer(st.isDirectory() ? data : dirname(data));
  } catch (e) {
    throw new UsageError(
      `checkpoint ${dir} has no tokenizer.json and its dataset's: ${(e as Error).message}`,
    );
  }
}
