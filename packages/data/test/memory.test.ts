// Reading must not hold a whole shard in memory: a 50 MB shard is read with the retained ArrayBuffer
// memory (sampled after forced GCs) staying far below the file's size.
import { statSync } from "node:fs";
import { join } from "node:path";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { describe, expect, it } from "vitest";
import { openDataset, readShardDocuments, TokenLoader, writeShards } from "../src/index.ts";
import { tempDir } from "./helpers.ts";

setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;

const DOCS = 12_500;
const DOC_LEN = 1000; // 12.5 M tokens: a 50 MB shard
const dir = tempDir();

function* generate(): Generator<Int32Array> {
  const doc = new Int32Array(DOC_LEN);
  for (let i = 0; i < DOCS; i++) {
    doc.fill(i % 256);
    yield doc;
  }
}

/** Retained ArrayBuffer memory above the level before, in MB, sampled every `every` calls. */
function retained(every: number) {
  gc();
  const base = process.memoryUsage().arrayBuffers;
  let calls = 0;
  let peak = 0;
  return {
    tick() {
      if (++calls % every !== 0) return;
      gc();
      peak = Math.max(peak, (process.memoryUsage().arrayBuffers - base) / 2 ** 20);
    },
    get peakMB() {
      return peak;
    },
  };
}

describe("bounded memory", () => {
  it("writes and reads a 50 MB shard incrementally", async () => {
    const out = join(dir, "big");
    const w = retained(1000);
    const manifest = await writeShards(
      (function* () {
        for (const d of generate()) {
          w.tick();
          yield d;
        }
      })(),
      out,
      { bytesPerShard: Infinity, batchTokens: 256 * 1024 },
    );
    const file = join(out, manifest.shards[0].file);
    expect(statSync(file).size).toBeGreaterThan(50e6);
    expect(w.peakMB).toBeLessThan(24);

    const r = retained(500);
    let docs = 0;
    for await (const doc of readShardDocuments(file)) {
      expect(doc[DOC_LEN - 1]).toBe(docs % 256);
      docs++;
      r.tick();
    }
    expect(docs).toBe(DOCS);
    expect(r.peakMB).toBeLessThan(24);

    // Indexing (with checksums) and training batches read it one record batch / shuffle group at a time.
    const o = retained(1);
    const ds = await openDataset(out);
    o.tick();
    const loader = await TokenLoader.open(ds, { seqLen: 1023, batchSize: 8, shuffleTokens: 512 * 1024 });
    for (let i = 0; i < 200; i++) {
      await loader.nextBatch();
      if (i % 20 === 0) o.tick();
    }
    expect(o.peakMB).toBeLessThan(24);
  });
});
