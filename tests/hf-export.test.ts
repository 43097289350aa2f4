// A checkpoint is a Hugging Face model folder: transformers' AutoTokenizer loads its tokenizer
// (byte-level and BPE) and encodes and decodes real text exactly as moe8 does; `export` writes a
// standalone folder whose BF16 weights are the checkpoint's f32 weights rounded.
import { spawnSync } from "node:child_process";
import { cpSync, existsSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { BpeTokenizer, ByteTokenizer, readShardDocuments, type Tokenizer } from "@moe8/data";
import { encodeBf16 } from "@moe8/fp8-core";
import { beforeAll, describe, expect, it } from "vitest";
import { readSafetensors } from "../apps/trainer/src/run/safetensors.ts";
import { editTensors, replaceFile } from "./checkpoint-tools.ts";
import { cli, QUICK, ROOT, tmp } from "./helpers.ts";

const root = tmp("hf");
const at = (p: string) => join(root, p);
const TINY = [...QUICK, "--backend", "cpu", "--steps", "1"];
const texts: string[] = [];

/** AutoTokenizer's ids and decodings of `texts` for the model folder `dir`. */
function hfTokenize(dir: string, input: string[]): { ids: number[]; decoded: string }[] {
  const r = spawnSync("python3", [join(ROOT, "tests/hf_tokenizer.py"), dir], {
    input: JSON.stringify(input),
    encoding: "utf8",
    maxBuffer: 1 << 28,
  });
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout);
}

function expectSameTokenizer(dir: string, moe8: Tokenizer) {
  const got = hfTokenize(dir, texts);
  texts.forEach((text, i) => {
    expect(got[i].ids, `text ${i}`).toEqual(Array.from(moe8.encode(text)));
    expect(got[i].decoded, `text ${i}`).toBe(text);
  });
}

beforeAll(async () => {
  // Real text: passages of the bundled plays (stored as bytes), and a document boundary.
  const bytes = new ByteTokenizer();
  for await (const doc of readShardDocuments(join(ROOT, "datasets/default/shard-00000.arrows"))) {
    texts.push(bytes.decode(doc.subarray(0, 3000)), bytes.decode(doc.subarray(50_000, 51_000)));
    if (texts.length >= 4) break;
  }
  texts.push(`${texts[0].slice(0, 200)}<|endoftext|>${texts[1].slice(0, 200)}`, "naïve café — 日本語\t\n");
  writeFileSync(at("plays.txt"), texts.join("\n\n"));
  const p = cli([
    "prepare-data",
    "--input",
    at("plays.txt"),
    "--out",
    at("bpe-data"),
    "--tokenizer",
    "bpe:400",
    "--chunk-bytes",
    "500",
  ]);
  expect(p.status, p.stderr).toBe(0);
  writeFileSync(at("bpe.json"), JSON.stringify({ model: { base: "tiny", vocab_size: 400 } }));
  for (const [out, extra] of [
    ["byte-run", []],
    ["bpe-run", ["--config", at("bpe.json"), "--data", at("bpe-data")]],
  ] as const) {
    const t = cli(["train", ...TINY, ...extra, "--out", at(out)]);
    expect(t.status, t.stderr).toBe(0);
  }
}, 300_000);

describe("checkpoints are Hugging Face model folders", () => {
  it("AutoTokenizer loads the byte-level tokenizer and round-trips real text as moe8 does", () => {
    expectSameTokenizer(at("byte-run/checkpoints/step-1"), new ByteTokenizer());
  }, 60_000);

  it("AutoTokenizer loads a prepare-data bpe:N tokenizer and round-trips real text as moe8 does", async () => {
    const moe8 = await BpeTokenizer.load(at("bpe-data/tokenizer.json"));
    expect(moe8.vocabSize).toBe(400);
    expectSameTokenizer(at("bpe-run/checkpoints/step-1"), moe8);
    const gen = JSON.parse(readFileSync(at("bpe-run/checkpoints/step-1/generation_config.json"), "utf8"));
    expect(gen).toMatchObject({ eos_token_id: moe8.eotId, max_length: 32 });
  }, 60_000);

  it("export writes BF16 weights that are the f32 ones rounded, and a folder AutoTokenizer loads", async () => {
    const ck = at("bpe-run/checkpoints/step-1");
    for (const [dtype, out] of [
      ["bf16", "export-bf16"],
      ["f32", "export-f32"],
    ]) {
      const r = cli(["export", "--checkpoint", ck, "--out", at(out), "--dtype", dtype]);
      expect(r.status, r.stderr).toBe(0);
    }
    const files = [
      "config.json",
      "generation_config.json",
      "model.safetensors",
      "tokenizer.json",
      "tokenizer_config.json",
    ];
    expect(readdirSync(at("export-bf16")).sort()).toEqual(files);
    const f32 = readSafetensors(at("export-f32/model.safetensors")).tensors;
    const bf16 = readSafetensors(at("export-bf16/model.safetensors")).tensors;
    const original = readSafetensors(join(ck, "model.safetensors")).tensors;
    expect([...bf16.keys()].sort()).toEqual([...original.keys()].sort());
    // Compared as bytes: element-wise deep equality of a million values takes vitest half a minute.
    const bytes = (a?: ArrayBufferView) => (a ? Buffer.from(a.buffer, a.byteOffset, a.byteLength) : null);
    for (const [name, t] of original) {
      expect(bytes(f32.get(name)?.data)?.equals(bytes(t.data)!), name).toBe(true);
      expect(bf16.get(name)?.dtype, name).toBe("BF16");
      expect(bytes(bf16.get(name)?.data)?.equals(bytes(encodeBf16(t.data as Float32Array))!), name).toBe(
        true,
      );
    }
    expect(JSON.parse(readFileSync(at("export-bf16/config.json"), "utf8")).torch_dtype).toBe("bfloat16");
    expectSameTokenizer(at("export-bf16"), await BpeTokenizer.load(at("bpe-data/tokenizer.json")));
  }, 120_000);

  it("export refuses a checkpoint missing a tensor, naming it, and writes nothing", () => {
    const ck = at("missing-ck");
    cpSync(at("byte-run/checkpoints/step-1"), ck, { recursive: true });
    editTensors(ck, "model.safetensors", (t) => t.delete("model.layers.1.mlp.experts.3.up_proj.weight"));
    const r = cli(["export", "--checkpoint", ck, "--out", at("never-exported")]);
    expect(r.status).toBe(2);
    expect(r.stderr.trim()).toMatch(
      /^error: .*missing-ck\/model\.safetensors: tensor model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight is missing$/,
    );
    expect(existsSync(at("never-exported"))).toBe(false);
  });

  it("export refuses an --out that holds files and writes nothing", () => {
    writeFileSync(at("export-f32/extra.txt"), "mine");
    const r = cli(["export", "--checkpoint", at("byte-run/checkpoints/step-1"), "--out", at("export-f32")]);
    expect(r.status).toBe(2);
    expect(r.stderr.trim()).toMatch(/^error: --out .*export-f32: folder is not empty$/);
    expect(existsSync(at("export-f32/extra.txt"))).toBe(true);
    expect(readdirSync(root).filter((n) => n.includes(".tmp-"))).toEqual([]);
  });

  it("sample on a checkpoint without tokenizer files (an older one) uses its recorded dataset, or says why not", () => {
    const old = at("old-ck");
    cpSync(at("bpe-run/checkpoints/step-1"), old, { recursive: true });
    const sums = JSON.parse(readFileSync(join(old, "checksums.json"), "utf8"));
    for (const name of ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]) {
      rmSync(join(old, name));
      delete sums[name];
    }
    writeFileSync(join(old, "checksums.json"), JSON.stringify(sums));
    const args = ["sample", "--checkpoint", old, "--backend", "cpu", "--prompt", "ROMEO:", "--tokens", "5"];
    const ok = cli(args);
    expect(ok.status, ok.stderr).toBe(0);
    expect(ok.stdout).toBe(
      cli([...args.slice(0, 2), at("bpe-run/checkpoints/step-1"), ...args.slice(3)]).stdout,
    );
    renameSync(at("bpe-data"), at("bpe-data-moved"));
    const r = cli(args);
    renameSync(at("bpe-data-moved"), at("bpe-data"));
    expect(r.status).toBe(2);
    expect(r.stderr.trim()).toMatch(
      /^error: checkpoint .*old-ck has no tokenizer\.json \(written before checkpoints held one\) and its dataset .*bpe-data is not found from /,
    );
  });

  it("sample refuses a checkpoint whose tokenizer.json is larger than the model's vocabulary", () => {
    const ck = at("mixed-ck");
    cpSync(at("byte-run/checkpoints/step-1"), ck, { recursive: true });
    replaceFile(ck, "tokenizer.json", readFileSync(at("bpe-run/checkpoints/step-1/tokenizer.json")));
    const r = cli(["sample", "--checkpoint", ck, "--backend", "cpu", "--tokens", "2"]);
    expect(r.status).toBe(2);
    expect(r.stderr.trim()).toMatch(
      /^error: .*mixed-ck\/tokenizer\.json: 400 tokens, more than the model's vocab_size 256$/,
    );
  });
});
