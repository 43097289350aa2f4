// prepareData: text files in, a tokenised dataset folder (shards + manifest [+ tokenizer.json]) out.
// Everything is written into a temporary sibling folder that replaces `out` only when complete, so a
// failed or interrupted run leaves the previous dataset (or nothing) in place. `out` must be new, an
// empty folder, or (with overwrite) a previous dataset: never a user's folder, a file, or the input.
import { mkdir, rename, rm } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { UsageError } from "@moe8/fp8-core";
import { ioError } from "../files.ts";
import type { Manifest, TokenizerSpec } from "../manifest.ts";
import { BpeTokenizer } from "../tokenizers/bpe.ts";
import { ByteTokenizer } from "../tokenizers/byte.ts";
import { parseTokenizerSpec } from "../tokenizers/load.ts";
import type { Tokenizer } from "../tokenizers/types.ts";
import { writeShards } from "../writer.ts";
import { readDocuments } from "./documents.ts";
import { type InputFile, listInputs } from "./inputs.ts";
import { checkOutput } from "./output.ts";

export interface PrepareOptions {
  /** Files or folders of .txt/.md (plain text), .jsonl or .parquet. */
  input: string[];
  out: string;
  /** Replace `out` when it holds a previous dataset (default: refuse). Nothing else is ever replaced. */
  overwrite?: boolean;
  /** "byte" (default), "bpe:N" (train a BPE of N tokens on the input), or a tokenizer.json path. */
  tokenizer?: string;
  /** The text field of .jsonl rows and the text column of .parquet files (default "text"). */
  textField?: string;
  /** Target shard size (default 64 MiB). */
  shardBytes?: number;
  /** Text files are cut at blank lines into documents of about this many characters (default 16 KiB). */
  chunkBytes?: number;
  onProgress?: (progress: PrepareProgress) => void;
}

export interface PrepareProgress {
  /** BPE training reads the input once before tokenising reads it again. */
  phase: "train-tokenizer" | "tokenize";
  file: string;
  bytesDone: number;
  bytesTotal: number;
  documents: number;
  tokens: number;
}

export async function prepareData(options: PrepareOptions): Promise<Manifest> {
  const choice = parseTokenizerSpec(options.tokenizer ?? "byte");
  const shardBytes = options.shardBytes ?? 64 * 2 ** 20;
  const chunkBytes = options.chunkBytes ?? 16384;
  if (!Number.isSafeInteger(shardBytes) || shardBytes < 1)
    throw new UsageError(`--shard-bytes ${shardBytes}: must be a positive number of bytes`);
  if (!Number.isSafeInteger(chunkBytes) || chunkBytes < 0)
    throw new UsageError(
      `--chunk-bytes ${chunkBytes}: must be 0 (whole files) or a positive number of bytes`,
    );
  const files = await listInputs(options.input);
  await checkOutput(options.out, options.input, options.overwrite ?? false);
  const textField = options.textField ?? "text";
  const bytesTotal = files.reduce((a, f) => a + f.bytes, 0);
  const out = options.out;
  const tmp = join(dirname(out), `.${basename(out)}.tmp-${process.pid}`);
  try {
    await rm(tmp, { recursive: true, force: true });
    const texts = (phase: PrepareProgress["phase"], counts: { documents: number; tokens: number }) =>
      allTexts(files, { textField, chunkBytes }, (file, bytesDone) =>
        options.onProgress?.({ phase, file: file.name, bytesDone, bytesTotal, ...counts }),
      );
    let tokenizer: Tokenizer;
    let spec: TokenizerSpec = { type: "byte" };
    if (choice.kind === "byte") {
      tokenizer = new ByteTokenizer();
    } else {
      const bpe =
        choice.kind === "bpe"
          ? await BpeTokenizer.train(texts("train-tokenizer", { documents: 0, tokens: 0 }), choice.vocabSize)
          : await BpeTokenizer.load(choice.path);
      await mkdir(tmp, { recursive: true });
      await bpe.save(join(tmp, "tokenizer.json")); // the dataset folder carries its tokenizer
      tokenizer = bpe;
      spec = {
        type: "bpe",
        file: "tokenizer.json",
        ...(bpe.eotId === undefined ? {} : { eot_id: bpe.eotId }),
      };
    }
    const counts = { documents: 0, tokens: 0 };
    async function* docs() {
      for await (const text of texts("tokenize", counts)) {
        const ids = tokenizer.encode(text);
        counts.documents++;
        counts.tokens += ids.length;
        if (ids.length > 0) yield ids;
      }
    }
    const manifest = await writeShards(docs(), tmp, {
      bytesPerShard: shardBytes,
      tokenizer: spec,
      vocabSize: tokenizer.vocabSize,
      source: {
        tool: "@moe8/data prepareData",
        inputs: files.map((f) => f.name),
        text_field: textField,
        chunk_bytes: chunkBytes,
      },
    });
    await replaceDir(tmp, out);
    return manifest;
  } catch (err) {
    // Messages name the output folder, never the temporary one it is built in.
    if (err instanceof UsageError) throw new UsageError(err.message.replaceAll(tmp, out));
    throw ioError(err, out, "write the dataset");
  } finally {
    await rm(tmp, { recursive: true, force: true }).catch(() => {});
  }
}

async function* allTexts(
  files: InputFile[],
  options: { textField: string; chunkBytes: number },
  progress: (file: InputFile, bytesDone: number) => void,
): AsyncGenerator<string> {
  let before = 0;
  for (const file of files) {
    yield* readDocuments(file, { ...options, onBytes: (n) => progress(file, before + n) });
    before += file.bytes;
    progress(file, before);
  }
}

/** Swaps the finished folder in: the old one is moved aside first and removed after. */
async function replaceDir(from: string, to: string): Promise<void> {
  const old = `${from}.old`;
  const hadOld = await rename(to, old).then(
    () => true,
    (err: NodeJS.ErrnoException) => {
      if (err.code === "ENOENT") return false;
      throw err;
    },
  );
  await rename(from, to);
  if (hadOld) await rm(old, { recursive: true, force: true });
}
