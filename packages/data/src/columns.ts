// The token column: which Arrow types it may have, and turning one record batch of it into documents.

import { UsageError } from "@moe8/fp8-core";
import { DataType, type RecordBatch, type Schema } from "apache-arrow";
import { reason } from "./errors.ts";

/**
 * Accepts List or LargeList of any integer type. Ours are List<Int32>; Hugging Face `datasets` writes
 * `input_ids` as List<Int64> (Python ints), and pyarrow large_list gives LargeList: all become Int32.
 */
export function checkTokenColumn(schema: Schema, column: string, file: string): void {
  const field = schema.fields.find((f) => f.name === column);
  if (!field) {
    const names = schema.fields.map((f) => f.name).join(", ");
    throw new UsageError(`${file}: missing column "${column}" (the file has: ${names || "no columns"})`);
  }
  const type = field.type;
  const isList = DataType.isList(type) || DataType.isLargeList(type);
  if (!isList || !DataType.isInt(type.children[0]?.type)) {
    throw new UsageError(
      `${file}: column "${column}" has type ${String(type)}, expected List<Int32> (or List/LargeList<Int64>)`,
    );
  }
}

export interface DecodeContext {
  file: string;
  column: string;
  /** Ids must lie in [0, vocabSize); without a manifest only the Int32 range is checked. */
  vocabSize?: number;
  /** Index of the batch's first row in the file, for error messages. */
  rowBase: number;
}

type IntArray = Int8Array | Int16Array | Int32Array | Uint8Array | Uint16Array | Uint32Array;

/** One Int32Array per row. Int32 data is returned as views into the batch (no copy). */
export function docsFromBatch(batch: RecordBatch, ctx: DecodeContext): Int32Array[] {
  try {
    return extractDocs(batch, ctx);
  } catch (err) {
    // apache-arrow decodes a batch whose body was cut short into missing or short buffers.
    if (err instanceof UsageError) throw err;
    throw new UsageError(`${ctx.file}: truncated or corrupt Arrow IPC stream (${reason(err)})`);
  }
}

function extractDocs(batch: RecordBatch, ctx: DecodeContext): Int32Array[] {
  const vector = batch.getChild(ctx.column);
  if (!vector) throw new UsageError(`${ctx.file}: missing column "${ctx.column}"`);
  const limit = ctx.vocabSize ?? 2 ** 31;
  const docs: Int32Array[] = [];
  let row = ctx.rowBase;
  for (const data of vector.data) {
    const offsets = data.valueOffsets as Int32Array | BigInt64Array;
    const child = data.children[0];
    if (!child || !offsets || !child.values) throw new Error("record batch without its list buffers");
    if (child.nullCount > 0) throw new UsageError(`${ctx.file}: column "${ctx.column}" has null token ids`);
    const values = child.values as IntArray | BigInt64Array | BigUint64Array;
    for (let i = 0; i < data.length; i++, row++) {
      if (data.nullCount > 0 && !data.getValid(i)) {
        docs.push(new Int32Array(0)); // a null row is an empty document, not an error
        continue;
      }
      const start = Number(offsets[data.offset + i]) + child.offset;
      const end = Number(offsets[data.offset + i + 1]) + child.offset;
      docs.push(toCheckedInt32(values, start, end, limit, ctx, row));
    }
  }
  return docs;
}

function toCheckedInt32(
  values: IntArray | BigInt64Array | BigUint64Array,
  start: number,
  end: number,
  limit: number,
  ctx: DecodeContext,
  row: number,
): Int32Array {
  const out = values instanceof Int32Array ? values.subarray(start, end) : new Int32Array(end - start);
  // One pass that both converts and range-checks: cheap next to reading the batch from disk.
  for (let j = start; j < end; j++) {
    const v = Number(values[j]);
    if (v < 0 || v >= limit) {
      const range = ctx.vocabSize === undefined ? "the Int32 range" : `the vocabulary [0, ${ctx.vocabSize})`;
      throw new UsageError(
        `${ctx.file}: token id ${v} in column "${ctx.column}" (row ${row}) is outside ${range}`,
      );
    }
    out[j - start] = v;
  }
  return out;
}
