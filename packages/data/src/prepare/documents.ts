// Reading documents (strings) out of input files, streaming, with the bytes read reported as they go.
import { createReadStream, type ReadStream } from "node:fs";
import { createInterface } from "node:readline";
import type { Readable } from "node:stream";
import { createGunzip } from "node:zlib";
import { UsageError } from "@moe8/fp8-core";
import { DataType, RecordBatchReader } from "apache-arrow";
import { asyncBufferFromFile, parquetMetadataAsync, parquetReadObjects, parquetSchema } from "hyparquet";
import { compressors } from "hyparquet-compressors";
import { reason } from "../errors.ts";
import type { InputFile } from "./inputs.ts";

export interface DocumentOptions {
  /** Field (jsonl) or column (parquet) holding the text. */
  textField: string;
  /** Text files are cut into documents of about this many characters; 0 keeps each file whole. */
  chunkBytes: number;
  onBytes: (bytesRead: number) => void;
}

export function readDocuments(file: InputFile, options: DocumentOptions): AsyncGenerator<string> {
  if (file.kind === "jsonl") return jsonlDocuments(file, options);
  if (file.kind === "parquet") return parquetDocuments(file.path, options);
  if (file.kind === "arrow") return arrowDocuments(file.path, options);
  return textDocuments(file, options);
}

/**
 * The file's bytes (gunzipped when it is gzip), and the file stream whose bytesRead counts progress
 * in the file's own (compressed) bytes. A gzip error becomes a UsageError naming the file.
 */
function openBytes(file: InputFile): { bytes: Readable; raw: ReadStream } {
  const raw = createReadStream(file.path, { highWaterMark: 1 << 20 });
  if (!file.gzip) return { bytes: raw, raw };
  const gunzip = createGunzip();
  raw.on("error", (err) => gunzip.destroy(err));
  gunzip.on("error", () => raw.destroy());
  return { bytes: raw.pipe(gunzip), raw };
}

async function* guarded<T>(file: InputFile, gen: AsyncGenerator<T>): AsyncGenerator<T> {
  try {
    yield* gen;
  } catch (err) {
    if (err instanceof UsageError || !file.gzip) throw err;
    throw new UsageError(`${file.path}: not a readable gzip file (${reason(err)})`);
  }
}

/**
 * A text file (a book, a play) would be one huge document, and the loader shuffles documents: cut
 * it at paragraph boundaries (blank lines) into pieces of about chunkBytes, each ending with its blank
 * line, so the pieces put together give the file back exactly.
 */
function textDocuments(file: InputFile, options: DocumentOptions): AsyncGenerator<string> {
  return guarded(file, textChunks(file, options));
}

async function* textChunks(
  file: InputFile,
  { chunkBytes, onBytes }: DocumentOptions,
): AsyncGenerator<string> {
  const { bytes, raw } = openBytes(file);
  // Streaming: a character split across two reads stays whole; a BOM is kept as text, as before.
  const decoder = new TextDecoder("utf-8", { ignoreBOM: true });
  let buf = "";
  for await (const chunk of bytes) {
    buf += decoder.decode(chunk as Buffer, { stream: true });
    onBytes(raw.bytesRead);
    while (chunkBytes > 0 && buf.length >= chunkBytes) {
      const cut = paragraphCut(buf, chunkBytes);
      if (cut < 0) break; // wait for more text
      yield buf.slice(0, cut);
      buf = buf.slice(cut);
    }
  }
  buf += decoder.decode();
  if (buf.length > 0) yield buf;
}

function paragraphCut(buf: string, size: number): number {
  const blank = /\n[ \t\r]*\n/g;
  blank.lastIndex = size - 1;
  const m = blank.exec(buf);
  if (m) return m.index + m[0].length;
  if (buf.length < 4 * size) return -1;
  const line = buf.lastIndexOf("\n", 4 * size); // no paragraph break for a long way: a line break, or any cut
  return line > 0 ? line + 1 : size;
}

function jsonlDocuments(file: InputFile, options: DocumentOptions): AsyncGenerator<string> {
  return guarded(file, jsonlRows(file, options));
}

async function* jsonlRows(file: InputFile, { textField, onBytes }: DocumentOptions): AsyncGenerator<string> {
  const path = file.path;
  const { bytes, raw } = openBytes(file);
  let n = 0;
  for await (const line of createInterface({ input: bytes, crlfDelay: Infinity })) {
    n++;
    onBytes(raw.bytesRead);
    if (line.trim() === "") continue;
    let row: unknown;
    try {
      row = JSON.parse(line);
    } catch (err) {
      throw new UsageError(`${path}:${n}: invalid JSON (${reason(err)})`);
    }
    const text = (row as Record<string, unknown> | null)?.[textField];
    if (typeof text !== "string") {
      const what = text === undefined ? "missing" : `a ${text === null ? "null" : typeof text}, not a string`;
      throw new UsageError(`${path}:${n}: field "${textField}" is ${what}`);
    }
    if (text.length > 0) yield text;
  }
}

async function* parquetDocuments(
  path: string,
  { textField, onBytes }: DocumentOptions,
): AsyncGenerator<string> {
  let file: Awaited<ReturnType<typeof asyncBufferFromFile>>;
  let metadata: Awaited<ReturnType<typeof parquetMetadataAsync>>;
  try {
    file = await asyncBufferFromFile(path);
    metadata = await parquetMetadataAsync(file);
  } catch (err) {
    throw new UsageError(`${path}: not a readable Parquet file (${reason(err)})`);
  }
  const columns = parquetSchema(metadata).children.map((c) => c.element.name);
  if (!columns.includes(textField)) {
    throw new UsageError(`${path}: missing column "${textField}" (the file has: ${columns.join(", ")})`);
  }
  // One row group at a time keeps memory bounded by the largest row group.
  let rowStart = 0;
  let bytes = 0;
  for (const group of metadata.row_groups) {
    const rowEnd = rowStart + Number(group.num_rows);
    const rows = await parquetReadObjects({
      file,
      metadata,
      columns: [textField],
      rowStart,
      rowEnd,
      compressors,
    });
    for (const [i, row] of rows.entries()) {
      const text = row[textField];
      if (text === null || text === undefined) continue;
      if (typeof text !== "string")
        throw new UsageError(`${path}: row ${rowStart + i}: column "${textField}" is not text`);
      if (text.length > 0) yield text;
    }
    rowStart = rowEnd;
    bytes += Number(group.total_byte_size);
    onBytes(Math.min(bytes, file.byteLength));
  }
}

/**
 * An Arrow IPC stream with a text column, such as the data-*.arrow files `datasets.save_to_disk`
 * writes: one record batch in memory at a time.
 */
async function* arrowDocuments(
  path: string,
  { textField, onBytes }: DocumentOptions,
): AsyncGenerator<string> {
  const raw = createReadStream(path);
  let reader: Awaited<ReturnType<typeof RecordBatchReader.from>>;
  try {
    reader = await RecordBatchReader.from(raw);
    await reader.open();
  } catch (err) {
    raw.destroy();
    throw new UsageError(`${path}: not an Arrow IPC stream (${reason(err)})`);
  }
  const field = reader.schema?.fields.find((f) => f.name === textField);
  if (!field) {
    raw.destroy();
    const names = reader.schema?.fields.map((f) => f.name).join(", ") ?? "none";
    throw new UsageError(`${path}: missing column "${textField}" (the file has: ${names})`);
  }
  const isText = (t: DataType): boolean => DataType.isUtf8(t) || DataType.isLargeUtf8(t);
  if (!isText(field.type) && !(DataType.isDictionary(field.type) && isText(field.type.dictionary))) {
    raw.destroy();
    throw new UsageError(`${path}: column "${textField}" is ${field.type}, not text`);
  }
  let row = 0;
  try {
    for await (const batch of reader) {
      const column = batch.getChild(textField)!;
      for (let i = 0; i < batch.numRows; i++, row++) {
        const text = column.get(i) as string | null;
        if (text) yield text;
      }
      onBytes(raw.bytesRead);
    }
  } catch (err) {
    if (err instanceof UsageError) throw err;
    throw new UsageError(`${path}: truncated or corrupt Arrow IPC stream after row ${row} (${reason(err)})`);
  }
}
