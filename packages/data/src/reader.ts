// Sequential reading of one shard: apache-arrow's RecordBatchReader over a file stream, one record
// batch in memory at a time, whatever the size of the file.
import { createReadStream } from "node:fs";
import { open } from "node:fs/promises";
import { UsageError } from "@moe8/fp8-core";
import { RecordBatchReader } from "apache-arrow";
import { checkTokenColumn, docsFromBatch } from "./columns.ts";
import { reason } from "./errors.ts";
import { statRegularFile } from "./files.ts";
import { END_OF_STREAM, NO_END } from "./ipc-scan.ts";

export interface ReadOptions {
  /** Token ids must lie in [0, vocabSize): usually the manifest's vocab_size. */
  vocabSize?: number;
}

/** Yields each row of `column` as an Int32Array (views into the current record batch). */
export async function* readShardDocuments(
  path: string,
  column = "tokens",
  options: ReadOptions = {},
): AsyncGenerator<Int32Array> {
  await statRegularFile(path, "Arrow shard");
  let reader: Awaited<ReturnType<typeof openReader>>;
  try {
    reader = await openReader(path);
  } catch (err) {
    throw corrupt(path, err);
  }
  if (!reader.schema) throw new UsageError(`${path}: not an Arrow IPC stream (no schema message)`);
  checkTokenColumn(reader.schema, column, path);
  let rowBase = 0;
  while (true) {
    let next: IteratorResult<import("apache-arrow").RecordBatch>;
    try {
      next = await reader.next();
    } catch (err) {
      throw corrupt(path, err);
    }
    if (next.done) break;
    const docs = docsFromBatch(next.value, { file: path, column, vocabSize: options.vocabSize, rowBase });
    rowBase += docs.length;
    yield* docs;
  }
  // RecordBatchReader ends quietly where a file cut at a message boundary ends; the marker says whether
  // the writer finished.
  if (!(await endsWithMarker(path))) throw corrupt(path, new Error(NO_END));
}

async function endsWithMarker(path: string): Promise<boolean> {
  const fh = await open(path, "r");
  try {
    const { size } = await fh.stat();
    const tail = Buffer.alloc(END_OF_STREAM.length);
    if (size < tail.length) return false;
    await fh.read(tail, 0, tail.length, size - tail.length);
    return tail.equals(END_OF_STREAM);
  } finally {
    await fh.close();
  }
}

async function openReader(path: string) {
  const reader = await RecordBatchReader.from(createReadStream(path));
  await reader.open();
  if (reader.isFile()) throw new Error("an Arrow IPC file (random-access format); write the stream format");
  return reader;
}

function corrupt(path: string, err: unknown): UsageError {
  if (err instanceof UsageError) return err;
  return new UsageError(`${path}: truncated or corrupt Arrow IPC stream (${reason(err)})`);
}
