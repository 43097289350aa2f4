// Building List<Int> record batches straight from typed arrays (no per-value builder calls).
import {
  Field,
  Int32,
  Int64,
  List,
  makeData,
  RecordBatch,
  RecordBatchStreamWriter,
  Schema,
  Struct,
} from "apache-arrow";
import { END_OF_STREAM } from "./ipc-scan.ts";

/** Schema with one column `column: List<Int32>` (or List<Int64>, as Hugging Face writes input_ids). */
export function tokenSchema(column: string, int64 = false): Schema {
  const item = new Field("item", int64 ? new Int64() : new Int32(), true); // pyarrow's child name
  return new Schema([new Field(column, new List(item), true)]);
}

export function tokenBatch(schema: Schema, docs: ArrayLike<number>[]): RecordBatch {
  const listType = schema.fields[0].type as List;
  const int64 = listType.children[0].type instanceof Int64;
  const offsets = new Int32Array(docs.length + 1);
  for (let i = 0; i < docs.length; i++) offsets[i + 1] = offsets[i] + docs[i].length;
  const total = offsets[docs.length];
  const values = int64 ? new BigInt64Array(total) : new Int32Array(total);
  for (let i = 0; i < docs.length; i++) {
    if (values instanceof BigInt64Array) {
      for (let j = 0; j < docs[i].length; j++) values[offsets[i] + j] = BigInt(docs[i][j]);
    } else {
      values.set(docs[i], offsets[i]);
    }
  }
  const itemType = listType.children[0].type as Int32 | Int64;
  const child = makeData({ type: itemType, length: total, data: values, nullCount: 0 });
  const list = makeData({ type: listType, length: docs.length, valueOffsets: offsets, child, nullCount: 0 });
  const struct = makeData({
    type: new Struct(schema.fields),
    length: docs.length,
    children: [list],
    nullCount: 0,
  });
  return new RecordBatch(schema, struct);
}

/**
 * Incremental stream-format encoding: the schema message once, then one message per record batch,
 * then the end-of-stream marker. Each batch is encoded by RecordBatchStreamWriter on its own and its
 * message cut out, so a shard never has to be held in memory whole (the writer's own output queue has
 * no back-pressure).
 */
export class StreamEncoder {
  private readonly header: Uint8Array;

  constructor(readonly schema: Schema) {
    this.header = new RecordBatchStreamWriter().reset(undefined, schema).toUint8Array(true);
  }

  start(): Uint8Array {
    return this.header;
  }

  batch(batch: RecordBatch): Uint8Array {
    const all = RecordBatchStreamWriter.writeAll([batch]).toUint8Array(true);
    const head = all.subarray(0, this.header.length);
    if (!Buffer.from(head).equals(Buffer.from(this.header)))
      throw new Error("schema message changed between batches");
    return all.subarray(this.header.length, all.length - END_OF_STREAM.length);
  }

  end(): Uint8Array {
    return END_OF_STREAM;
  }
}
