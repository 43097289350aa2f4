// The bundled corpus: present, matching its manifest (sizes, sha256, counts), over 1 MB of real text.
import { describe, expect, it } from "vitest";
import {
  ByteTokenizer,
  checkVocab,
  DEFAULT_DATASET_DIR,
  loadTokenizer,
  openDataset,
  readShardDocuments,
  TokenLoader,
} from "../src/index.ts";

describe("bundled corpus", () => {
  it("verifies against its manifest and holds at least 1 MiB of byte tokens", async () => {
    const ds = await openDataset(DEFAULT_DATASET_DIR); // checks sizes, sha256, documents and tokens
    expect(ds.manifest?.tokenizer).toEqual({ type: "byte" });
    expect(ds.tokens).toBeGreaterThanOrEqual(2 ** 20);
    expect(ds.tokens).toBe(ds.manifest?.tokens);
    expect(ds.shardPaths.length).toBeGreaterThan(1);
    checkVocab(ds.manifest!, 256);
    expect(await loadTokenizer(DEFAULT_DATASET_DIR)).toBeInstanceOf(ByteTokenizer);
    const first = await readShardDocuments(ds.shardPaths[0]).next();
    const text = new ByteTokenizer().decode(first.value as Int32Array);
    expect(text.split(/\s+/).filter((w) => /^(the|and|of|to)$/i.test(w)).length).toBeGreaterThan(50); // English
  });

  it("trains out of the box: the loader splits it and fills batches", async () => {
    const loader = await TokenLoader.open(DEFAULT_DATASET_DIR, { seqLen: 256, batchSize: 16 });
    expect(loader.split.val.length).toBeGreaterThan(0);
    expect((await loader.valBatches()).length).toBeGreaterThanOrEqual(1);
    const b = await loader.nextBatch();
    expect(b.ids.length).toBe(16 * 256);
    expect(Math.max(...b.ids)).toBeLessThan(256);
  });
});
