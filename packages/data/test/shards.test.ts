import { writeFileSync } from "node:fs";
import { join } from "node:path";
import {
  Field,
  Int64,
  LargeList,
  makeData,
  RecordBatch,
  RecordBatchStreamWriter,
  Schema,
  Struct,
  tableFromIPC,
} from "apache-arrow";
import { describe, expect, it } from "vitest";
import {
  openDataset,
  readBlockDocs,
  readManifest,
  readShardDocuments,
  tokenBatch,
  tokenSchema,
  writeShards,
} from "../src/index.ts";
import { collect, syntheticDocs, tempDir } from "./helpers.ts";

const dir = tempDir();

describe("shards", () => {
  it("round-trips documents through List<Int32> stream shards and a manifest", async () => {
    const docs = syntheticDocs(300);
    const out = join(dir, "rt");
    const manifest = await writeShards(docs, out, { docsPerShard: 100, batchDocs: 33 });
    expect(manifest.shards.map((s) => s.documents)).toEqual([100, 100, 100]);
    expect(manifest.tokens).toBe(docs.reduce((a, d) => a + d.length, 0));
    expect(await readManifest(out)).toEqual(manifest);
    const back: Int32Array[] = [];
    for (const s of manifest.shards) back.push(...(await collect(readShardDocuments(join(out, s.file)))));
    expect(back.map((d) => Array.from(d))).toEqual(docs.map((d) => Array.from(d)));
    // The files are plain Arrow: apache-arrow's own table reader agrees.
    const { readFileSync } = await import("node:fs");
    const table = tableFromIPC(readFileSync(join(out, manifest.shards[1].file)));
    expect(String(table.schema.fields[0].type)).toBe("List<Int32>");
    expect(Array.from(table.getChild("tokens")!.get(5)!)).toEqual(Array.from(docs[105]));
  });

  it("indexes record batches for random access", async () => {
    const docs = syntheticDocs(100);
    const out = join(dir, "blocks");
    await writeShards(docs, out, { docsPerShard: 40, batchDocs: 7 });
    const ds = await openDataset(out);
    expect(ds.blocks.length).toBe(6 + 6 + 3);
    expect(Array.from(ds.docLengths)).toEqual(docs.map((d) => d.length));
    const block = ds.blocks[8];
    const rows = await readBlockDocs(ds, 8);
    expect(rows.map((d) => Array.from(d))).toEqual(
      docs.slice(block.firstDoc, block.firstDoc + block.rows).map((d) => Array.from(d)),
    );
  });

  it("reads a Hugging Face style input_ids List<Int64> column as Int32", async () => {
    const docs = syntheticDocs(50, 100, 50000);
    const schema = tokenSchema("input_ids", true);
    const file = join(dir, "hf.arrows");
    const batches = [tokenBatch(schema, docs.slice(0, 20)), tokenBatch(schema, docs.slice(20))];
    writeFileSync(file, RecordBatchStreamWriter.writeAll(batches).toUint8Array(true));
    const back = await collect(readShardDocuments(file, "input_ids", { vocabSize: 50000 }));
    expect(back.every((d) => d instanceof Int32Array)).toBe(true);
    expect(back.map((d) => Array.from(d))).toEqual(docs.map((d) => Array.from(d)));
    // A bare file opens too: the column is found by name and the vocabulary is inferred.
    const ds = await openDataset(file);
    expect(ds.column).toBe("input_ids");
    expect(ds.docLengths.length).toBe(50);
  });

  it("reads LargeList<Int64> (pyarrow large_list)", async () => {
    const type = new LargeList(new Field("item", new Int64(), true));
    const schema = new Schema([new Field("tokens", type, true)]);
    const values = BigInt64Array.of(1n, 2n, 3n, 4n, 5n);
    const child = makeData({ type: new Int64(), length: 5, data: values, nullCount: 0 });
    const list = makeData({
      type,
      length: 2,
      valueOffsets: BigInt64Array.of(0n, 2n, 5n),
      child,
      nullCount: 0,
    });
    const batch = new RecordBatch(
      schema,
      makeData({ type: new Struct(schema.fields), length: 2, children: [list], nullCount: 0 }),
    );
    const file = join(dir, "large.arrows");
    writeFileSync(file, RecordBatchStreamWriter.writeAll([batch]).toUint8Array(true));
    const back = await collect(readShardDocuments(file));
    expect(back.map((d) => Array.from(d))).toEqual([
      [1, 2],
      [3, 4, 5],
    ]);
  });
});
