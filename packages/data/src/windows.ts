// Consecutive, non-overlapping windows of seqLen + 1 tokens from the start of the data, documents
// concatenated in file order: what `eval` averages its loss over, so the number is reproducible.
import { stat } from "node:fs/promises";
import { join } from "node:path";
import { UsageError } from "@moe8/fp8-core";
import { sha256OfFile, statRegularFile } from "./files.ts";
import { type Manifest, readManifest } from "./manifest.ts";
import { refuseRawInput } from "./prepare/inputs.ts";
import { readShardDocuments } from "./reader.ts";

export interface WindowOptions {
  /** Check every shard's size and sha256 against the manifest before the first window (default true). */
  verifyChecksums?: boolean;
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
  const st = await stat(path).catch(() => null);
  const isDir = st?.isDirectory() ?? false;
  if (st) refuseRawInput(path, isDir);
  const manifest = isDir ? await readManifest(path) : null;
  const files = manifest ? manifest.shards.map((s) => join(path, s.file)) : [path];
  const column = options.column ?? manifest?.column ?? "tokens";
  const vocabSize = manifest?.vocab_size ?? options.vocabSize;
  const eot = manifest?.tokenizer.type === "bpe" ? manifest.tokenizer.eot_id : undefined;
  // Damage anywhere is found before any work is done on the data (a flipped byte in the last shard
  // would otherwise surface only after evaluating every shard before it, or never).
  if (manifest && options.verifyChecksums !== false) await verifyShards(files, manifest);
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

async function verifyShards(files: string[], manifest: Manifest): Promise<void> {
  for (const [i, file] of files.entries()) {
    const entry = manifest.shards[i];
    const st = await statRegularFile(file, "Arrow shard");
    if (st.size !== entry.bytes)
      throw new UsageError(`${file}: ${st.size} bytes but the manifest says ${entry.bytes}`);
    const sha = await sha256OfFile(file, "Arrow shard");
    if (sha !== entry.sha256)
      throw new UsageError(`${file}: sha256 ${sha} does not match the manifest's ${entry.sha256}`);
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
