import { mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parquetWriteBuffer } from "hyparquet-writer";
import { describe, expect, it } from "vitest";
import {
  formatProgressBar,
  loadTokenizer,
  openDataset,
  type PrepareProgress,
  prepareData,
  readShardDocuments,
} from "../src/index.ts";
import { collect, tempDir } from "./helpers.ts";

const dir = tempDir();
const paragraphs = Array.from(
  { length: 40 },
  (_, i) => `Paragraph ${i}: ${"lorem ipsum dolor ".repeat(i % 7)}end.`,
);
const book = `${paragraphs.join("\n\n")}\n`;
const rows = ["first row", "second row with “unicode” ✓", "third"];

async function documentsOf(out: string): Promise<string[]> {
  const tok = await loadTokenizer(out);
  const ds = await openDataset(out);
  const texts: string[] = [];
  for (const file of ds.shardPaths)
    for (const d of await collect(readShardDocuments(file))) texts.push(tok.decode(d));
  return texts;
}

describe("prepareData", () => {
  it("cuts text files at blank lines into documents that put back together give the file", async () => {
    const input = join(dir, "books");
    mkdirSync(join(input, "more"), { recursive: true });
    writeFileSync(join(input, "book.txt"), book);
    writeFileSync(join(input, "more", "notes.md"), "A short note.\n");
    writeFileSync(join(input, "ignored.csv"), "a,b\n");
    const progress: PrepareProgress[] = [];
    const out = join(dir, "out-text");
    const manifest = await prepareData({
      input: [input],
      out,
      chunkBytes: 200,
      onProgress: (p) => progress.push(p),
    });
    const texts = await documentsOf(out);
    expect(texts.join("")).toBe(`${book}A short note.\n`);
    expect(texts.length).toBeGreaterThan(5);
    for (const t of texts.slice(0, -2)) {
      expect(t.length).toBeGreaterThanOrEqual(200);
      expect(t.endsWith("\n\n")).toBe(true);
    }
    expect(manifest.source.inputs).toEqual(["books/book.txt", "books/more/notes.md"]);
    expect(manifest.tokenizer).toEqual({ type: "byte" });
    const last = progress.at(-1)!;
    expect(last.bytesDone).toBe(last.bytesTotal);
    expect(last.documents).toBe(texts.length);
  });

  it("reads .jsonl (one document per line) and .parquet (one per row), text field configurable", async () => {
    const jsonl = join(dir, "rows.jsonl");
    writeFileSync(jsonl, `${rows.map((content) => JSON.stringify({ content, id: 1 })).join("\n")}\n\n`);
    const parquet = join(dir, "rows.parquet");
    const buffer = parquetWriteBuffer({ columnData: [{ name: "content", data: rows, type: "STRING" }] });
    writeFileSync(parquet, new Uint8Array(buffer));
    const out = join(dir, "out-rows");
    await prepareData({ input: [jsonl, parquet], out, textField: "content" });
    expect(await documentsOf(out)).toEqual([...rows, ...rows]);
  });

  it("trains a BPE tokenizer (bpe:N), stores it beside the shards, and reuses a tokenizer.json", async () => {
    const input = join(dir, "book.txt");
    writeFileSync(input, book);
    const out = join(dir, "out-bpe");
    const manifest = await prepareData({ input: [input], out, tokenizer: "bpe:270", chunkBytes: 300 });
    expect(manifest.tokenizer).toEqual({ type: "bpe", file: "tokenizer.json", eot_id: 0 });
    expect(manifest.vocab_size).toBe(270);
    expect((await documentsOf(out)).join("")).toBe(book);
    expect(manifest.tokens).toBeLessThan(book.length * 0.7);
    const again = join(dir, "out-bpe-again");
    const m2 = await prepareData({
      input: [input],
      out: again,
      tokenizer: join(out, "tokenizer.json"),
      chunkBytes: 300,
    });
    expect(m2.shards.map((s) => s.sha256)).toEqual(manifest.shards.map((s) => s.sha256));
    expect(readFileSync(join(again, "tokenizer.json"), "utf8")).toBe(
      readFileSync(join(out, "tokenizer.json"), "utf8"),
    );
  });

  it("replaces an existing output folder whole, leaving no stale shards", async () => {
    const input = join(dir, "big.txt");
    writeFileSync(input, book.repeat(20));
    const out = join(dir, "out-replace");
    const first = await prepareData({ input: [input], out, shardBytes: 4096 });
    expect(first.shards.length).toBeGreaterThan(3);
    writeFileSync(input, "tiny\n");
    await expect(prepareData({ input: [input], out })).rejects.toThrow(
      /already holds a dataset; pass --overwrite to replace it/,
    );
    await prepareData({ input: [input], out, overwrite: true });
    expect(readdirSync(out).sort()).toEqual(["manifest.json", "shard-00000.arrows"]);
    expect(readdirSync(dir).filter((f) => f.includes(".tmp-"))).toEqual([]);
  });

  it("never replaces what is not a previous dataset, nor the input", async () => {
    const input = join(dir, "guarded.txt");
    writeFileSync(input, book);
    const mine = join(dir, "my-folder");
    mkdirSync(mine);
    writeFileSync(join(mine, "notes.txt"), "keep me");
    const file = join(dir, "a-file.txt");
    writeFileSync(file, "keep me too");
    const cases: [Parameters<typeof prepareData>[0], RegExp][] = [
      [{ input: [input], out: mine, overwrite: true }, /not a dataset folder \(it holds "notes.txt"\)/],
      [{ input: [input], out: file, overwrite: true }, /exists and is not a folder/],
      [{ input: [input], out: input, overwrite: true }, /inside the input/],
      [{ input: [dir], out: join(dir, "sub", "ds") }, /inside the input/],
      [{ input: [input], out: dir, overwrite: true }, /the input .* is inside it/],
      [{ input: [input], out: "" }, /output folder name is empty/],
      [{ input: [input], out: join(dir, "x"), shardBytes: 0 }, /--shard-bytes 0/],
    ];
    for (const [options, want] of cases) await expect(prepareData(options)).rejects.toThrow(want);
    expect(readFileSync(join(mine, "notes.txt"), "utf8")).toBe("keep me");
    expect(readFileSync(file, "utf8")).toBe("keep me too");
    expect(readFileSync(input, "utf8")).toBe(book);
  });

  it("formats a progress bar", () => {
    expect(formatProgressBar(0, 100, 10)).toBe("[----------]   0.0%");
    expect(formatProgressBar(40, 100, 10)).toBe("[####------]  40.0%");
    expect(formatProgressBar(7, 7, 4)).toBe("[####] 100.0%");
    expect(formatProgressBar(5, 0, 4)).toBe("[----]   0.0%");
  });
});
