// Every kind of bad input gives a one-line UsageError that names the file or field and what is wrong.
import { copyFileSync, cpSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { RecordBatchStreamWriter, tableFromArrays } from "apache-arrow";
import { describe, expect, it } from "vitest";
import {
  checkVocab,
  type Manifest,
  openDataset,
  parseTokenizerSpec,
  prepareData,
  readManifest,
  readShardDocuments,
  sequentialWindows,
  TokenLoader,
  writeShards,
} from "../src/index.ts";
import { collect, syntheticDocs, tempDir, usageError } from "./helpers.ts";

const dir = tempDir();
const good = join(dir, "good");
const manifest = await writeShards(syntheticDocs(60), good, { docsPerShard: 20, batchDocs: 5 });
const shard0 = join(good, manifest.shards[0].file);

/** A copy of the good dataset, changed by `edit`. */
function variant(name: string, edit: (d: string) => void, from = good): string {
  const d = join(dir, name);
  cpSync(from, d, { recursive: true });
  edit(d);
  return d;
}
const shard = (d: string) => join(d, manifest.shards[0].file);
const editManifest = (d: string, f: (m: Manifest) => void) => {
  const m = JSON.parse(readFileSync(join(d, "manifest.json"), "utf8"));
  f(m);
  writeFileSync(join(d, "manifest.json"), JSON.stringify(m));
};
const file = (name: string, bytes: Uint8Array) => {
  const p = join(dir, name);
  writeFileSync(p, bytes);
  return p;
};

const half = file(
  "half.arrows",
  readFileSync(shard0).subarray(0, Math.floor(readFileSync(shard0).length / 2)),
);
const noise = file(
  "noise.arrows",
  Uint8Array.from({ length: 4096 }, (_, i) => (i * 2654435761) >>> 24),
);
const floats = file(
  "floats.arrows",
  RecordBatchStreamWriter.writeAll(tableFromArrays({ tokens: Float32Array.of(1, 2) })).toUint8Array(true),
);
const strings = file(
  "strings.arrows",
  RecordBatchStreamWriter.writeAll(tableFromArrays({ tokens: ["a", "b"] })).toUint8Array(true),
);
const bigIds = join(dir, "big-ids");
await writeShards([Int32Array.of(1, 2, 999)], bigIds, {
  tokenizer: { type: "bpe", file: "tokenizer.json" },
  vocabSize: 1000,
});

const cases: [string, () => unknown, RegExp][] = [
  ["missing dataset folder", () => openDataset(join(dir, "nope")), /nope: dataset not found/],
  [
    "missing shard file",
    () => collect(readShardDocuments(join(dir, "nope.arrows"))),
    /nope\.arrows: Arrow shard not found/,
  ],
  [
    "folder without manifest",
    () => openDataset(dir),
    /not a dataset folder \(no manifest\.json\); make one with `moe8 prepare-data/,
  ],
  [
    "truncated shard (read)",
    () => collect(readShardDocuments(half)),
    /half\.arrows: truncated or corrupt Arrow IPC stream/,
  ],
  ["truncated shard (open)", () => openDataset(half), /half\.arrows: truncated or corrupt Arrow IPC stream/],
  [
    "random bytes (read)",
    () => collect(readShardDocuments(noise)),
    /noise\.arrows: (truncated or corrupt|not an) Arrow IPC stream/,
  ],
  ["random bytes (open)", () => openDataset(noise), /noise\.arrows: truncated or corrupt Arrow IPC stream/],
  [
    "wrong column type (float)",
    () => openDataset(floats),
    /floats\.arrows: column "tokens" has type Float32, expected List<Int32>/,
  ],
  [
    "wrong column type (text)",
    () => collect(readShardDocuments(strings)),
    /strings\.arrows: column "tokens" has type Dictionary<Int32, Utf8>, expected List<Int32>/,
  ],
  [
    "missing column",
    () => openDataset(good, { column: "input_ids" }),
    /shard-00000\.arrows: missing column "input_ids" \(the file has: tokens\)/,
  ],
  [
    "token id outside the manifest's vocabulary",
    () => openDataset(variant("vocab", (d) => editManifest(d, (m) => (m.vocab_size = 500)), bigIds)),
    /shard-00000\.arrows: token id 999 in column "tokens" \(row 0\) is outside the vocabulary \[0, 500\)/,
  ],
  [
    "token id outside the vocabulary of a bare file",
    () => collect(readShardDocuments(join(bigIds, "shard-00000.arrows"), "tokens", { vocabSize: 256 })),
    /token id 999 in column "tokens" \(row 0\) is outside the vocabulary \[0, 256\)/,
  ],
  [
    "writing an id outside the vocabulary",
    () => writeShards([[1, 256]], join(dir, "w")),
    /token id 256 .* outside the vocabulary \[0, 256\)/,
  ],
  [
    "shard checksum mismatch",
    () =>
      openDataset(
        variant("sha", (d) => {
          const bytes = readFileSync(shard(d));
          bytes[bytes.length - 20] ^= 1; // a token value: same size, still a valid stream
          writeFileSync(shard(d), bytes);
        }),
      ),
    /shard-00000\.arrows: sha256 [0-9a-f]{64} does not match the manifest's [0-9a-f]{64}/,
  ],
  [
    "shard size mismatch",
    () => openDataset(variant("size", (d) => copyFileSync(half, shard(d)))),
    /shard-00000\.arrows: \d+ bytes but the manifest says \d+/,
  ],
  [
    "shard token count mismatch",
    () =>
      openDataset(
        variant("count", (d) =>
          editManifest(d, (m) => {
            m.shards[0].tokens += 1;
            m.tokens += 1;
          }),
        ),
      ),
    /shard-00000\.arrows: \d+ tokens but the manifest says \d+/,
  ],
  [
    "manifest totals not matching its shard list",
    () => openDataset(variant("total", (d) => editManifest(d, (m) => (m.documents += 1)))),
    /manifest\.json: field "documents" is 61 but the shards hold 60/,
  ],
  [
    "missing shard",
    () => openDataset(variant("gone", (d) => rmSync(shard(d)))),
    /gone\/shard-00000\.arrows: shard listed in .*gone\/manifest\.json not found/,
  ],
  [
    "eval on a shard holding fewer documents than its manifest says",
    () =>
      collect(
        sequentialWindows(
          variant("eval", (d) =>
            editManifest(d, (m) => {
              m.shards[1].documents += 1;
              m.documents += 1;
            }),
          ),
          8,
        ),
      ),
    /shard-00001\.arrows: 20 documents and \d+ tokens but the manifest says 21 and \d+/,
  ],
  [
    "malformed manifest",
    () => readManifest(variant("json", (d) => writeFileSync(join(d, "manifest.json"), "{"))),
    /manifest\.json: not valid JSON/,
  ],
  [
    "unknown tokenizer spec",
    () => parseTokenizerSpec("wordpiece"),
    /--tokenizer "wordpiece": unknown tokenizer \(expected byte, bpe:N/,
  ],
  [
    "missing tokenizer file",
    () => parseTokenizerSpec(join(dir, "tok.json")),
    /tok\.json: tokenizer file not found/,
  ],
  [
    "unknown tokenizer in prepareData",
    () => prepareData({ input: [dir], out: join(dir, "p"), tokenizer: "bpe:x" }),
    /--tokenizer "bpe:x": unknown tokenizer/,
  ],
  [
    "tokenizer/model vocabulary mismatch",
    () => checkVocab(manifest, 32768),
    /dataset's byte tokenizer has vocab_size 256 but the model's vocab_size is 32768/,
  ],
  [
    "missing input",
    () => prepareData({ input: [join(dir, "nothing")], out: join(dir, "p") }),
    /nothing: input file or folder not found/,
  ],
  [
    "jsonl row without the text field",
    () =>
      prepareData({
        input: [file("a.jsonl", new TextEncoder().encode('{"text":"ok"}\n{"body":"x"}\n'))],
        out: join(dir, "p"),
      }),
    /a\.jsonl:2: field "text" is missing/,
  ],
  [
    "jsonl line that is not JSON",
    () =>
      prepareData({
        input: [file("b.jsonl", new TextEncoder().encode('{"text":"ok"}\n{oops\n'))],
        out: join(dir, "p"),
      }),
    /b\.jsonl:2: invalid JSON/,
  ],
  [
    "cursor saved for other data",
    async () => {
      const other = await TokenLoader.open(bigIds, { seqLen: 1, batchSize: 1, valFraction: 0 });
      return TokenLoader.open(good, { seqLen: 8, batchSize: 2, cursor: other.cursor() });
    },
    /data cursor: saved for other data or another split/,
  ],
];

describe("bad input", () => {
  it.each(cases)("%s", async (_name, fn, expected) => {
    const err = await usageError(fn);
    if (process.env.SHOW_ERRORS) console.log(`${err.name}: ${err.message}`);
    expect(err.message).toMatch(expected);
    expect(err.message).not.toMatch(/\n/);
  });

  it("reports a shard cut at any byte, on reading and on opening", async () => {
    const out = join(dir, "cut");
    await writeShards(syntheticDocs(12, 40), out, { batchDocs: 4 });
    const bytes = readFileSync(join(out, "shard-00000.arrows"));
    const cut = join(dir, "cut.arrows");
    for (let n = 1; n < bytes.length; n += 3) {
      writeFileSync(cut, bytes.subarray(0, n));
      const errors = [
        await usageError(() => collect(readShardDocuments(cut))),
        await usageError(() => openDataset(cut)),
      ];
      for (const err of errors)
        expect(err.message).toMatch(/cut\.arrows: (truncated or corrupt|not an) Arrow IPC stream/);
    }
  });

  it("a failed prepareData leaves no output behind", async () => {
    await usageError(() =>
      prepareData({
        input: [file("c.jsonl", new TextEncoder().encode('{"text":"ok"}\n{"text":1}\n'))],
        out: join(dir, "half-done"),
      }),
    );
    await usageError(() => openDataset(join(dir, "half-done")));
  });
});
