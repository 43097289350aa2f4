// Reading documents (strings) out of input files, streaming, with the bytes read reported as they go.
import { createReadStream } from "node:fs";
import { createInterface } from "node:readline";
import { UsageError } from "@moe8/fp8-core";
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
  if (file.kind === "jsonl") return jsonlDocuments(file.path, options);
  if (file.kind === "parquet") return parquetDocuments(file.path, options);
  return textDocuments(file.path, options);
}

/**
 * A text file (a book, a play) would be one huge document, and the loader shuffles documents: cut
 * it at paragraph boundaries (blank lines) into pieces of about chunkBytes, each ending with its blank
 * line, so the pieces put together give the file back exactly.
 */
async function* textDocuments(
  path: string,
  { chunkBytes, onBytes }: DocumentOptions,
): AsyncGenerator<string> {
  const stream = createReadStream(path, { encoding: "utf8", highWaterMark: 1 << 20 });
  let buf = "";
  for await (const chunk of stream) {
    buf += chunk as string;
    onBytes(stream.bytesRead);
    while (chunkBytes > 0 && buf.length >= chunkBytes) {
      const cut = paragraphCut(buf, chunkBytes);
      if (cut < 0) break; // wait for more text
      yield buf.slice(0, cut);
      buf = buf.slice(cut);
    }
  }
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

async function* jsonlDocuments(
  path: string,
  { textField, onBytes }: DocumentOptions,
): AsyncGenerator<string> {
  let bytes = 0;
  let n = 0;
  for await (const line of createInterface({ input: createReadStream(path), crlfDelay: Infinity })) {
    n++;
    bytes += Buffer.byteLength(line) + 1;
    onBytes(bytes);
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
