// prepare-data's inputs as practitioners have them: a text file without an extension, gzipped text,
// a Hugging Face `datasets.save_to_disk` folder (Arrow IPC streams with a text column); raw text given
// to `train --data` is pointed to prepare-data; an existing dataset is replaced only with --overwrite.
import { cpSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { ByteTokenizer, readManifest, readShardDocuments } from "@moe8/data";
import { Int32, Table, tableToIPC, Utf8, vectorFromArray } from "apache-arrow";
import { describe, expect, it } from "vitest";
import { cli, tmp } from "./helpers.ts";

const root = tmp("prep");
const at = (p: string) => join(root, p);
const bytes = new ByteTokenizer();
const play = "ROMEO. But soft, what light through yonder window breaks?\n\nJULIET. Ay me. — naïve café\n\n";

/** The documents of a prepared dataset, decoded, in order. */
async function documents(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const shard of (await readManifest(dir)).shards)
    for await (const doc of readShardDocuments(join(dir, shard.file))) out.push(bytes.decode(doc));
  return out;
}

function prepare(...args: string[]) {
  const r = cli(["prepare-data", ...args]);
  expect(r.status, r.stderr).toBe(0);
}

describe("prepare-data inputs", () => {
  it("reads a text file without an extension, and refuses one that is not text", async () => {
    writeFileSync(at("PLAY"), play);
    prepare("--input", at("PLAY"), "--out", at("noext"));
    expect((await documents(at("noext"))).join("")).toBe(play);
    writeFileSync(at("BLOB"), Uint8Array.of(0x89, 0x50, 0, 1, 2, 0xff));
    const r = cli(["prepare-data", "--input", at("BLOB"), "--out", at("blob")]);
    expect(r.status).toBe(2);
    expect(r.stderr.trim()).toMatch(
      /^error: .*BLOB: unsupported input type \(.*a file without an extension must be UTF-8 text\)$/,
    );
  });

  it("reads gzipped text (.txt.gz and .gz) and JSONL (.jsonl.gz) as the plain files", async () => {
    writeFileSync(at("play.txt.gz"), gzipSync(play));
    writeFileSync(at("play2.gz"), gzipSync(play));
    writeFileSync(
      at("rows.jsonl.gz"),
      gzipSync(`${JSON.stringify({ text: "one" })}\n${JSON.stringify({ text: "two" })}\n`),
    );
    prepare(
      "--input",
      at("play.txt.gz"),
      "--input",
      at("play2.gz"),
      "--input",
      at("rows.jsonl.gz"),
      "--out",
      at("gz"),
    );
    expect(await documents(at("gz"))).toEqual([play, play, "one", "two"]);
    writeFileSync(at("bad.txt.gz"), gzipSync(play).subarray(0, 20));
    const r = cli(["prepare-data", "--input", at("bad.txt.gz"), "--out", at("bad-gz")]);
    expect(r.status).toBe(2);
    expect(r.stderr.trim().split("\n").at(-1)).toMatch(/^error: .*bad\.txt\.gz: not a readable gzip file \(/);
  });

  it("reads a Hugging Face datasets.save_to_disk folder in its state.json order", async () => {
    const hf = at("hf-cache");
    mkdirSync(hf);
    const parts = [
      ["To be, or not to be", "that is the question:"],
      ["Whether 'tis nobler in the mind", "", "to suffer — the slings"],
    ];
    const names = parts.map((_, i) => `data-0000${i}-of-00002.arrow`);
    parts.forEach((rows, i) => {
      // Plain Utf8 and Int32 columns, as pyarrow writes a datasets Value("string") and Value("int32").
      const table = new Table({
        text: vectorFromArray(rows, new Utf8()),
        id: vectorFromArray(
          rows.map((_, j) => j),
          new Int32(),
        ),
      });
      writeFileSync(join(hf, names[i]), tableToIPC(table, "stream"));
    });
    writeFileSync(
      join(hf, "dataset_info.json"),
      JSON.stringify({ features: { text: { dtype: "string", _type: "Value" } } }),
    );
    writeFileSync(
      join(hf, "state.json"),
      JSON.stringify({
        _data_files: names.map((filename) => ({ filename })),
        _split: "train",
        _format_type: null,
      }),
    );
    prepare("--input", hf, "--out", at("from-hf"));
    // Empty rows hold no document.
    expect(await documents(at("from-hf"))).toEqual(parts.flat().filter((t) => t !== ""));
    // A DatasetDict (one such folder per split, dataset_dict.json beside them) gives every split.
    mkdirSync(at("hf-dict"));
    cpSync(hf, at("hf-dict/train"), { recursive: true });
    writeFileSync(at("hf-dict/dataset_dict.json"), JSON.stringify({ splits: ["train"] }));
    prepare("--input", at("hf-dict"), "--out", at("from-dict"));
    expect(await documents(at("from-dict"))).toEqual(await documents(at("from-hf")));
    const r = cli(["prepare-data", "--input", hf, "--out", at("hf-wrong"), "--text-field", "body"]);
    expect(r.status).toBe(2);
    expect(r.stderr.trim().split("\n").at(-1)).toMatch(
      /data-00000-of-00002\.arrow: missing column "body" \(the file has: text, id\)$/,
    );
  });

  it("train --data and eval --data with raw text point to prepare-data", () => {
    writeFileSync(at("raw.txt"), play);
    mkdirSync(at("texts"));
    writeFileSync(at("texts/raw.txt"), play);
    const make = "make one with `moe8 prepare-data --input .* --out datasets/NAME` and use that";
    const ck = at("noext-run/checkpoints/step-1");
    const t = cli(["train", "--steps", "1", "--batch-size", "2", "--seq-len", "8", "--out", at("noext-run")]);
    expect(t.status, t.stderr).toBe(0);
    for (const [data, what] of [
      [at("raw.txt"), "a text file, not a token dataset"],
      [at("PLAY"), "a text file, not a token dataset"],
      [at("texts"), "not a dataset folder \\(no manifest\\.json\\)"],
    ])
      for (const argv of [
        ["train", "--steps", "1", "--data", data, "--out", at("never")],
        ["eval", "--checkpoint", ck, "--data", data],
      ]) {
        const r = cli(argv);
        expect(r.status, argv.join(" ")).toBe(2);
        expect(r.stderr.trim()).toMatch(new RegExp(`^error: .*: ${what}; ${make}$`));
      }
  });

  it("an --out that holds a dataset is replaced only with --overwrite", async () => {
    writeFileSync(at("v2.txt"), "version two\n");
    const r = cli(["prepare-data", "--input", at("v2.txt"), "--out", at("noext")]);
    expect(r.status).toBe(2);
    expect(r.stderr.trim()).toMatch(/noext: already holds a dataset; pass --overwrite to replace it$/);
    expect((await documents(at("noext"))).join("")).toBe(play);
    prepare("--input", at("v2.txt"), "--out", at("noext"), "--overwrite");
    expect(await documents(at("noext"))).toEqual(["version two\n"]);
    expect(readFileSync(at("noext/manifest.json"), "utf8")).toContain("v2.txt");
  });
});
