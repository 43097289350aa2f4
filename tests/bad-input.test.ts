// Every kind of bad input gets a one-line error naming the thing and the problem, exit code 2, no
// stack trace, and leaves the run directory exactly as it was (issue: reliability).
import { readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { tokenBatch, tokenSchema, writeShards } from "@moe8/data";
import { Table, tableToIPC, Utf8, vectorFromArray } from "apache-arrow";
import { beforeAll, describe, expect, it } from "vitest";
import { cli, QUICK, tmp } from "./helpers.ts";

const dir = tmp("bad");
const docs = Array.from({ length: 40 }, (_, i) =>
  Int32Array.from({ length: 400 }, (_, j) => (i * 7 + j) % 256),
);

function snapshot(path: string): string {
  const walk = (p: string): string[] =>
    statSync(p, { throwIfNoEntry: false })?.isDirectory()
      ? readdirSync(p).flatMap((n) => walk(join(p, n)))
      : statSync(p, { throwIfNoEntry: false })
        ? [`${p}:${statSync(p).size}:${statSync(p).mtimeMs}`]
        : [];
  return walk(path).sort().join("\n");
}

function arrowFile(name: string, table: Table): string {
  const p = join(dir, name);
  writeFileSync(p, tableToIPC(table, "stream"));
  return p;
}

beforeAll(async () => {
  await writeShards(docs, join(dir, "good"), { docsPerShard: 20 });
  // ids outside the byte vocabulary
  const schema = tokenSchema("tokens");
  const bad = docs.map((d) => d.map((x) => x + 300));
  writeFileSync(join(dir, "oov.arrows"), tableToIPC(new Table([tokenBatch(schema, bad)]), "stream"));
  // a shard whose bytes no longer match the manifest
  await writeShards(docs, join(dir, "tampered"), { docsPerShard: 20 });
  const shard = join(dir, "tampered", readdirSync(join(dir, "tampered")).find((n) => n.endsWith(".arrows"))!);
  const bytes = readFileSync(shard);
  bytes[bytes.length - 100] ^= 1;
  writeFileSync(shard, bytes);
  // a dataset made for a larger vocabulary than the model's
  await writeShards(docs, join(dir, "bigvocab"), {
    docsPerShard: 20,
    tokenizer: { type: "byte" },
    vocabSize: 512,
  });
  // a truncated and a corrupt stream, and a column of the wrong type
  const good = readFileSync(
    join(dir, "good", readdirSync(join(dir, "good")).find((n) => n.endsWith(".arrows"))!),
  );
  writeFileSync(join(dir, "truncated.arrows"), good.subarray(0, Math.floor(good.length / 2)));
  writeFileSync(
    join(dir, "corrupt.arrows"),
    Buffer.from(Array.from({ length: 5000 }, (_, i) => (i * 131) % 251)),
  );
  arrowFile("text-column.arrows", new Table({ tokens: vectorFromArray(["not", "tokens"], new Utf8()) }));
  writeFileSync(join(dir, "unknown-key.json"), JSON.stringify({ steps: 10, learning_rate: 0.1 }));
  writeFileSync(join(dir, "bad-value.json"), JSON.stringify({ steps: 10, batchSize: -3 }));
  writeFileSync(join(dir, "not-json.json"), "{ steps: ");
  // a checkpoint whose model file is truncated
  const r = cli(["train", "--backend", "ts", "--steps", "1", "--out", join(dir, "run"), ...QUICK]);
  expect(r.stderr).toBe("");
  const ck = join(dir, "run", "checkpoints", "step-1", "model.safetensors");
  writeFileSync(ck, readFileSync(ck).subarray(0, 1000));
}, 120_000);

const cases: [string, string[], RegExp][] = [
  ["unknown flag", ["train", "--stepz", "3"], /^error: unknown flag --stepz$/],
  ["unknown preset", ["train", "--precision", "fp9"], /unknown preset "fp9"/],
  ["unknown precision override", ["train", "--precision.attenton=bf16"], /attenton/],
  ["bad precision value", ["train", "--precision.attention=fp7"], /precision\.attention.*"fp7"/],
  ["negative learning rate", ["train", "--lr", "-0.1"], /^error: --lr -0\.1: /],
  ["zero batch", ["train", "--batch-size", "0"], /^error: --batch-size 0: /],
  [
    "seq_len beyond the model",
    ["train", "--seq-len", "4096"],
    /--seq-len 4096 is beyond the model's max_position_embeddings/,
  ],
  ["non-numeric flag", ["train", "--steps", "ten"], /--steps: "ten" is not a number/],
  [
    "zero sequence length (bench)",
    ["bench", "step", "--backend", "ts", "--seq-len", "0"],
    /^error: --seq-len 0: /,
  ],
  [
    "unknown expert grouping (bench)",
    ["bench", "gemm", "--backend", "cuda", "--groups", "random"],
    /^error: --groups "random": use uneven or balanced/,
  ],
  [
    "expert grouping on a host backend (bench)",
    ["bench", "gemm", "--backend", "cpu", "--groups", "balanced"],
    /^error: --groups: only `bench gemm --backend cuda`/,
  ],
  ["unknown config key", ["train", "--config", "@/unknown-key.json"], /unknown key "learning_rate"/],
  ["out-of-range config value", ["train", "--config", "@/bad-value.json"], /bad-value\.json: batchSize: /],
  ["config that is not JSON", ["train", "--config", "@/not-json.json"], /not-json\.json: not valid JSON/],
  ["missing Arrow file", ["train", "--data", "@/missing.arrows"], /missing\.arrows/],
  ["truncated Arrow file", ["train", "--data", "@/truncated.arrows"], /truncated\.arrows/],
  ["corrupt Arrow file", ["train", "--data", "@/corrupt.arrows"], /corrupt\.arrows/],
  ["wrong column type", ["train", "--data", "@/text-column.arrows"], /text-column\.arrows.*tokens/],
  [
    "token ids outside the vocabulary",
    ["train", "--data", "@/oov.arrows"],
    /oov\.arrows.*(vocab|outside|256)/,
  ],
  ["manifest not matching its shards", ["train", "--data", "@/tampered"], /tampered.*(sha256|checksum)/],
  ["tokenizer/vocabulary mismatch", ["train", "--data", "@/bigvocab"], /vocab_size 512.*256|256.*512/],
  ["truncated checkpoint (resume)", ["train", "--resume", "@/run"], /no valid checkpoint/],
  [
    "truncated checkpoint (eval)",
    ["eval", "--checkpoint", "@/run/checkpoints/step-1", "--data", "@/good"],
    /model\.safetensors.*(checksum|truncated)/,
  ],
  [
    "unreadable checkpoint",
    ["eval", "--checkpoint", "@/nope", "--data", "@/good"],
    /nope: no such directory/,
  ],
];

describe("bad input: exit code 2, one line naming the problem, nothing written", () => {
  for (const [name, args0, want] of cases)
    it(name, () => {
      const out = join(dir, `out-${name.replace(/\W+/g, "-")}`);
      const args = args0.map((a) => a.replace(/^@/, dir));
      const withOut =
        args[0] === "train" && !args.includes("--resume") ? [...args, "--out", out, "--backend", "ts"] : args;
      const before = snapshot(dir);
      const r = cli(withOut);
      expect(r.status, r.stderr).toBe(2);
      const lines = r.stderr.trim().split("\n");
      expect(lines, r.stderr).toHaveLength(1);
      expect(lines[0]).toMatch(/^error: /);
      expect(lines[0]).toMatch(want);
      expect(r.stderr).not.toMatch(/\n\s+at /); // no stack trace
      expect(snapshot(dir)).toBe(before);
      expect(statSync(out, { throwIfNoEntry: false })).toBeUndefined();
    });
  it("--debug adds the stack trace", () => {
    const r = cli(["train", "--lr", "-1", "--debug"]);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/\n\s+at /);
  });
});
