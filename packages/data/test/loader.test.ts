import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { type Batch, sequentialWindows, TokenLoader, writeShards } from "../src/index.ts";
import { collect, syntheticDocs, tempDir } from "./helpers.ts";

const dir = tempDir();
// Token i * 1000 + j is token j of document i: any token tells where it came from.
const docs = syntheticDocs(400, 300).map((d, i) => d.map((_, j) => i * 1000 + j));
const data = join(dir, "ds");
const bpe = { type: "bpe", file: "tokenizer.json" } as const; // no eot_id: documents are joined as they are
await writeShards(docs, data, { docsPerShard: 90, batchDocs: 16, tokenizer: bpe, vocabSize: 400_000 });
const opts = { seqLen: 32, batchSize: 4, seed: 7 };

const take = async (loader: TokenLoader, n: number) => {
  const out: Batch[] = [];
  for (let i = 0; i < n; i++) out.push(await loader.nextBatch());
  return out;
};
const flat = (batches: Batch[]) => batches.map((b) => [Array.from(b.ids), Array.from(b.targets)]);

describe("TokenLoader", () => {
  it("packs documents into windows: targets are the next tokens, every token in order", async () => {
    const loader = await TokenLoader.open(data, { ...opts, valFraction: 0 });
    const { seqLen: T, batchSize: B } = opts;
    const epochTokens = docs.reduce((a, d) => a + d.length, 0);
    const windows = Math.ceil(epochTokens / (T + 1) / B) + 1;
    const stream: number[] = [];
    for (const b of await take(loader, windows)) {
      for (let r = 0; r < B; r++) {
        const ids = b.ids.subarray(r * T, (r + 1) * T);
        const targets = b.targets.subarray(r * T, (r + 1) * T);
        expect(Array.from(targets.subarray(0, T - 1))).toEqual(Array.from(ids.subarray(1)));
        stream.push(...ids, targets[T - 1]);
      }
    }
    // The first epoch's stream is the documents, whole and in some order, with nothing between them.
    let pos = 0;
    const seen = new Set<number>();
    while (pos < epochTokens) {
      const i = Math.floor(stream[pos] / 1000);
      expect(seen.has(i)).toBe(false);
      expect(stream.slice(pos, pos + docs[i].length)).toEqual(Array.from(docs[i]));
      seen.add(i);
      pos += docs[i].length;
    }
    expect(seen.size).toBe(docs.length);
    expect(stream.slice(0, 200)).not.toEqual(docs.flatMap((d) => Array.from(d)).slice(0, 200)); // shuffled
    expect(loader.epoch).toBe(1);
  });

  it("shuffles deterministically from the seed, differently per seed and per epoch", async () => {
    const a = flat(await take(await TokenLoader.open(data, opts), 5));
    const b = flat(await take(await TokenLoader.open(data, opts), 5));
    const c = flat(await take(await TokenLoader.open(data, { ...opts, seed: 8 }), 5));
    expect(a).toEqual(b);
    expect(a).not.toEqual(c);
    const l = await TokenLoader.open(data, opts);
    const orders: number[][] = [];
    for (let e = 0; e < 2; e++) {
      const c0 = l.cursor();
      orders.push([c0.epoch, ...c0.rngState]);
      while (l.cursor().epoch === e) await l.nextBatch();
    }
    expect(orders[0]).not.toEqual(orders[1]);
  });

  it("resumes from a JSON cursor at exactly the same token, across epochs and shuffle groups", async () => {
    for (const shuffleTokens of [2 ** 24, 5000]) {
      const o = { ...opts, shuffleTokens };
      const straight = flat(await take(await TokenLoader.open(data, o), 10));
      const first = await TokenLoader.open(data, o);
      const part1 = flat(await take(first, 4));
      const cursor = JSON.parse(JSON.stringify(first.cursor()));
      const part2 = flat(await take(await TokenLoader.open(data, { ...o, cursor }), 6));
      expect([...part1, ...part2]).toEqual(straight);
      // Far into a later epoch too.
      const long = await TokenLoader.open(data, { ...o, batchSize: 64 });
      await take(long, 40);
      const c = JSON.parse(JSON.stringify(long.cursor()));
      expect(c.epoch).toBeGreaterThan(0);
      const next = flat(await take(long, 3));
      expect(flat(await take(await TokenLoader.open(data, { ...o, batchSize: 64, cursor: c }), 3))).toEqual(
        next,
      );
    }
  });

  it("holds out a fixed validation set, disjoint from the training documents", async () => {
    const l1 = await TokenLoader.open(data, opts);
    const l2 = await TokenLoader.open(data, { ...opts, seed: 99 });
    expect(Array.from(l1.split.val)).toEqual(Array.from(l2.split.val));
    expect(l1.split.val.length).toBeGreaterThan(0);
    const train = new Set(l1.split.train);
    expect(Array.from(l1.split.val).some((d) => train.has(d))).toBe(false);
    expect(train.size + l1.split.val.length).toBe(docs.length);
    const v1 = flat(await l1.valBatches());
    await take(l1, 7);
    expect(flat(await l1.valBatches())).toEqual(v1);
    expect(flat(await l2.valBatches())).toEqual(v1);
    expect(v1.length).toBeGreaterThanOrEqual(2); // at least max(8, batchSize) windows
    // Over two epochs, training yields every training document and no validation document.
    const batches = await take(l1, 1000);
    const fromTrain = new Set(
      batches.flatMap((b) => [...b.ids, ...b.targets].map((t) => Math.floor(t / 1000))),
    );
    expect(fromTrain).toEqual(train);
  });

  it("inserts the end-of-text token between documents of a BPE dataset", async () => {
    const out = join(dir, "bpe");
    const small = [Int32Array.of(5, 6, 7), Int32Array.of(8, 9)];
    await writeShards(small, out, {
      tokenizer: { type: "bpe", file: "tokenizer.json", eot_id: 0 },
      vocabSize: 300,
    });
    const loader = await TokenLoader.open(out, { seqLen: 5, batchSize: 1, valFraction: 0 });
    const b = await loader.nextBatch();
    const window = [...b.ids, b.targets[4]];
    expect(window.filter((t) => t === 0).length).toBe(1);
    expect([window.join(","), window.slice(1).join(",")].some((s) => /5,6,7,0,8,9|8,9,0,5,6,7/.test(s))).toBe(
      true,
    );
  });

  it("sequentialWindows reads consecutive windows from the start, in file order", async () => {
    const windows = await collect(sequentialWindows(data, 16));
    const all = docs.flatMap((d) => Array.from(d));
    expect(windows.length).toBe(Math.floor(all.length / 17));
    expect(windows.flatMap((w) => Array.from(w))).toEqual(all.slice(0, windows.length * 17));
  });
});
