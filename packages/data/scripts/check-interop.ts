// Interoperability check against Python's `tokenizers` and `pyarrow` (not part of the test suite:
// it needs Python packages). Usage: bun packages/data/scripts/check-interop.ts [vocabSize]
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import {
  BpeTokenizer,
  ByteTokenizer,
  DEFAULT_DATASET_DIR,
  openDataset,
  readShardDocuments,
} from "../src/index.ts";

const work = mkdtempSync(join(tmpdir(), "moe8-interop-"));
const byte = new ByteTokenizer();
const ds = await openDataset(DEFAULT_DATASET_DIR);
const texts: string[] = [];
for (const file of ds.shardPaths)
  for await (const doc of readShardDocuments(file)) texts.push(byte.decode(doc));
const tok = await BpeTokenizer.train(texts, Number(process.argv[2] ?? 2048));
await tok.save(join(work, "tokenizer.json"));
const extra = [
  "Héllo wörld — “quotes” 日本語 🙂\ttabs  and\n\n\nnewlines <|endoftext|> it's 2024!",
  "   ",
  "a",
];
const samples = [...texts.slice(0, 12), ...extra];
writeFileSync(
  join(work, "samples.json"),
  JSON.stringify({ texts: samples, ids: samples.map((t) => Array.from(tok.encode(t))) }),
);

const script = fileURLToPath(new URL("check-interop.py", import.meta.url));
execFileSync("python3", [script, work, DEFAULT_DATASET_DIR], { stdio: "inherit" });

const expected: number[][] = JSON.parse(readFileSync(join(work, "hf.json"), "utf8"));
const got: number[][] = [];
for await (const doc of readShardDocuments(join(work, "hf.arrows"), "input_ids")) got.push(Array.from(doc));
if (JSON.stringify(got) !== JSON.stringify(expected)) throw new Error("hf.arrows read back differently");
console.log(`read pyarrow's input_ids List<Int64> stream back: ${got.length} documents identical`);
