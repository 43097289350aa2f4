// Consecutive, non-overlapping windows of seqLen + 1 tokens from the start of the data, documents
// concatenated in file order: what `eval` averages its loss over, so the number is reproducible.
import { stat } from "node:fs/promises";
import { join } from "node:path";
import { UsageError } from "@moe8/fp8-core";
import { type Manifest, readManifest } from "./manifest.ts";
import { readShardDocuments } from "./reader.ts";

export interface WindowOptions {
  /** Token column (default: the manifest's, else "tokens"). */
  column?: string;
  /** Vocabulary size to check ids against when there is no manifest. */
  vocabSize?: number;
}

export async function* sequentialWindows(
  path: string,
  seqLen: number,
  options: WindowOptions = {},
): AsyncGenerator<Int32Array> {
  const isDir = (await stat(path).catch(() => null))?.isDirectory() ?? false;
  const manifest = isDir ? await readManifest(path) : null;
  const files = manifest ? manifest.shards.map((s) => join(path, s.file)) : [path];
  const column = options.column ?? manifest?.column ?? "tokens";
  const vocabSize = manifest?.vocab_size ?? options.vocabSize;
  const eot = manifest?.tokenizer.type === "bpe" ? manifest.tokenizer.eot_id : undefined;
  let window = new Int32Array(seqLen + 1);
  let filled = 0;
  for (let i = 0; i < files.length; i++) {
    let docs = 0;
    let tokens = 0;
    for await (const doc of readShardDocuments(files[i], column, { vocabSize })) {
      docs++;
      tokens += doc.length;
      const parts = eot === undefined ? [doc] : [doc, Int32Array.of(eot)];
      for (let part of parts) {
        while (part.length > 0) {
          const take = Math.min(part.length, window.length - filled);
          window.set(part.subarray(0, take), filled);
          filled += take;
          part = part.subarray(take);
          if (filled === window.length) {
            yield window;
            window = new Int32Array(seqLen + 1);
            filled = 0;
          }
        }
      }
    }
    if (manifest) checkCounts(files[i], manifest.shards[i], docs, tokens);
  }
}

// A cheap consistency check (the loader also verifies checksums): catches a shard cut short at a
// record batch boundary or replaced by another.
function checkCounts(file: string, entry: Manifest["shards"][number], docs: number, tokens: number): void {
  if (docs !== entry.documents || tokens !== entry.tokens) {
    throw new UsageError(
      `${file}: ${docs} documents and ${tokens} tokens but the manifest says ${entry.documents} and ${entry.tokens}`,
    );
  }
}
