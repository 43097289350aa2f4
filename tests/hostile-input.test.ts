// Hostile input, as a table: files and flags an attacker or an accident could hand the CLI
// (safetensors headers that lie, checkpoints whose checksums match but whose contents do not,
// Arrow shards with a flipped byte, FIFOs and devices, configs asking for absurd sizes, flags out of
// range). Each gets exit code 2 and one line naming the problem, never a hang, a crash or a run on
// garbage. tests/bad-input.test.ts holds the everyday cases.
import { execFileSync } from "node:child_process";
import { cpSync, mkdirSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { writeShards } from "@moe8/data";
import { beforeAll, describe, expect, it } from "vitest";
import { editJson, editRaw, editTensors } from "./checkpoint-tools.ts";
import { cli, tmp } from "./helpers.ts";

const dir = tmp("hostile");
const at = (p: string) => join(dir, p);
const TINY = ["--batch-size", "2", "--seq-len", "32", "--eval-every", "0"];
const hasFifo = process.platform !== "win32";

/** A copy of the base checkpoint, then changed by `tamper` (checksums kept matching). */
const checkpoints: [string, (ck: string) => void][] = [
  [
    "overlap",
    (ck) =>
      editRaw(ck, "model.safetensors", ({ header }) => {
        const [a, b] = [
          "model.layers.0.input_layernorm.weight",
          "model.layers.0.post_attention_layernorm.weight",
        ];
        (header[b] as { data_offsets: number[] }).data_offsets = (
          header[a] as { data_offsets: number[] }
        ).data_offsets;
        return undefined;
      }),
  ],
  [
    "negative-offset",
    (ck) =>
      editRaw(ck, "model.safetensors", ({ header }) => {
        const e = header["model.norm.weight"] as { data_offsets: number[] };
        e.data_offsets = [e.data_offsets[0] - 16, e.data_offsets[1] - 16].map((x) => x - 10 ** 9);
        return undefined;
      }),
  ],
  [
    "fractional-offset",
    (ck) =>
      editRaw(ck, "model.safetensors", ({ header }) => {
        const e = header["model.norm.weight"] as { data_offsets: number[] };
        e.data_offsets = [e.data_offsets[0] + 0.5, e.data_offsets[1] + 0.5];
        return undefined;
      }),
  ],
  [
    "trailing-bytes",
    (ck) =>
      editRaw(ck, "model.safetensors", (raw) => {
        raw.data = Buffer.concat([raw.data, Buffer.alloc(16)]);
        return undefined;
      }),
  ],
  ["null-header", (ck) => editRaw(ck, "model.safetensors", () => "null")],
  ["array-header", (ck) => editRaw(ck, "model.safetensors", () => "[1, 2]")],
  [
    "null-entry",
    (ck) =>
      editRaw(ck, "model.safetensors", ({ header }) => {
        header["model.norm.weight"] = null;
        return undefined;
      }),
  ],
  [
    "no-shape",
    (ck) =>
      editRaw(ck, "model.safetensors", ({ header }) => {
        delete (header["model.norm.weight"] as Record<string, unknown>).shape;
        return undefined;
      }),
  ],
  [
    "no-offsets",
    (ck) =>
      editRaw(ck, "model.safetensors", ({ header }) => {
        delete (header["model.norm.weight"] as Record<string, unknown>).data_offsets;
        return undefined;
      }),
  ],
  [
    "f16-dtype",
    (ck) =>
      editRaw(ck, "model.safetensors", ({ header }) => {
        (header["model.norm.weight"] as Record<string, unknown>).dtype = "F16";
        return undefined;
      }),
  ],
  [
    "i32-dtype",
    (ck) =>
      editRaw(ck, "model.safetensors", ({ header }) => {
        (header["model.norm.weight"] as Record<string, unknown>).dtype = "I32";
        return undefined;
      }),
  ],
  [
    "extra-tensor",
    (ck) =>
      editRaw(ck, "model.safetensors", (raw) => {
        const end = raw.data.length;
        raw.header["zz.extra.weight"] = { dtype: "F32", shape: [1], data_offsets: [end, end + 4] };
        raw.data = Buffer.concat([raw.data, Buffer.alloc(4)]);
        return undefined;
      }),
  ],
  [
    "missing-tensor",
    (ck) =>
      editTensors(ck, "model.safetensors", (t) => {
        t.delete("model.norm.weight");
      }),
  ],
  [
    "wrong-shape",
    (ck) =>
      editTensors(ck, "model.safetensors", (t) => {
        t.get("model.norm.weight")!.shape = [2, 64];
      }),
  ],
  [
    "nan-weight",
    (ck) =>
      editTensors(ck, "model.safetensors", (t) => {
        (t.get("model.embed_tokens.weight")!.data as Float32Array)[7] = Number.NaN;
      }),
  ],
  [
    "inf-weight",
    (ck) =>
      editTensors(ck, "model.safetensors", (t) => {
        (t.get("lm_head.weight")!.data as Float32Array)[3] = Number.POSITIVE_INFINITY;
      }),
  ],
  [
    "huge-config",
    (ck) =>
      editJson(ck, "config.json", (c) => {
        c.hidden_size = 1e6;
      }),
  ],
  [
    "state-null-field",
    (ck) =>
      editJson(ck, "trainer-state.json", (s) => {
        s.train_config = null;
      }),
  ],
];

const sh = (s: string) => s.replace(/@/g, `${dir}/`);

// [name, argv (@ = the test folder), expected message]
const cases: [string, string[], RegExp][] = [
  // safetensors and checkpoints whose checksums match
  ...(
    [
      ["overlap", /data_offsets start at \d+, expected \d+ \(overlapping another tensor\)/],
      ["negative-offset", /model\.norm\.weight.*data_offsets must be two non-negative integers/],
      ["fractional-offset", /model\.norm\.weight.*data_offsets must be two non-negative integers/],
      ["trailing-bytes", /cover \d+ bytes of data but the file holds \d+ \(trailing bytes\)/],
      ["null-header", /model\.safetensors: corrupt safetensors header \(not a JSON object\)/],
      ["array-header", /model\.safetensors: corrupt safetensors header \(not a JSON object\)/],
      ["null-entry", /tensor "model\.norm\.weight": entry is not an object/],
      ["no-shape", /"model\.norm\.weight": shape must be a list of non-negative integers/],
      ["no-offsets", /"model\.norm\.weight": data_offsets must be two non-negative integers/],
      ["f16-dtype", /"model\.norm\.weight": unsupported dtype "F16"/],
      ["i32-dtype", /tensor model\.norm\.weight is I32, checkpoints hold F32/],
      ["extra-tensor", /model\.safetensors: unexpected tensor zz\.extra\.weight/],
      ["missing-tensor", /model\.safetensors: tensor model\.norm\.weight is missing/],
      ["wrong-shape", /tensor model\.norm\.weight has shape \[2,64\], the model wants \[128\]/],
      ["nan-weight", /tensor model\.embed_tokens\.weight holds a non-finite value \(NaN\) at index 7/],
      ["inf-weight", /tensor lm_head\.weight holds a non-finite value \(Infinity\) at index 3/],
      ["huge-config", /config\.json: hidden_size: Too big/],
      ["state-null-field", /trainer-state\.json: train_config: Invalid input/],
    ] as [string, RegExp][]
  ).map(([n, want]): [string, string[], RegExp] => [
    `checkpoint: ${n}`,
    ["eval", "--checkpoint", `@ck-${n}`, "--data", "datasets/default", "--batches", "1"],
    want,
  ]),
  ...(hasFifo
    ? ([
        [
          "checkpoint: model file is a FIFO",
          ["eval", "--checkpoint", "@ck-fifo", "--data", "datasets/default"],
          /model\.safetensors: checkpoint file must be a regular file, this is a FIFO/,
        ],
        [
          "checkpoint: model file is /dev/zero",
          ["eval", "--checkpoint", "@ck-zero", "--data", "datasets/default"],
          /model\.safetensors: checkpoint file must be a regular file, this is a device/,
        ],
        [
          "data: a FIFO",
          ["train", "--data", "@fifo.arrows"],
          /fifo\.arrows: dataset .* must be a regular file, this is a FIFO/,
        ],
        [
          "eval data: a FIFO",
          ["eval", "--checkpoint", "@base", "--data", "@fifo.arrows"],
          /fifo\.arrows: Arrow shard must be a regular file, this is a FIFO/,
        ],
      ] as [string, string[], RegExp][])
    : []),
  [
    "data: /dev/zero",
    ["train", "--data", "/dev/zero"],
    /\/dev\/zero: dataset .* must be a regular file, this is a device/,
  ],
  // Arrow
  [
    "eval: a flipped byte in the third shard",
    ["eval", "--checkpoint", "@base", "--data", "@flipped"],
    /flipped\/shard-00002\.arrows: sha256 [0-9a-f]{64} does not match the manifest's/,
  ],
  [
    "a 1-token dataset",
    ["train", "--data", "@one"],
    /one: 1 training tokens, fewer than one window of seq_len \+ 1 = 33/,
  ],
  [
    "eval: byte checkpoint on BPE data",
    ["eval", "--checkpoint", "@base", "--data", "@bpe-data"],
    /dataset's bpe tokenizer has vocab_size \d+ but the model's vocab_size is 256/,
  ],
  [
    "eval: BPE checkpoint on one shard of byte data",
    ["eval", "--checkpoint", "@bpe-run/checkpoints/step-1", "--data", "datasets/default/shard-00001.arrows"],
    /shard-00001\.arrows: tokenised with a byte tokenizer of vocab_size 256, but the checkpoint was trained on bpe data/,
  ],
  [
    "eval: BPE checkpoint on byte data",
    ["eval", "--checkpoint", "@bpe-run/checkpoints/step-1", "--data", "datasets/default"],
    /tokenised with a byte tokenizer of vocab_size 256, but the checkpoint was trained on bpe data of vocab_size \d+/,
  ],
  // configs
  [
    "config: a symlink to /dev/zero",
    ["train", "--config", "@zero.json"],
    /zero\.json: config must be a regular file, this is a device/,
  ],
  [
    "config: 5 MB",
    ["train", "--config", "@huge.json"],
    /huge\.json: config of \d+ bytes is larger than the 1048576 bytes allowed/,
  ],
  [
    "config: hidden_size 1e6",
    ["train", "--config", "@wide.json"],
    /wide\.json: model\.hidden_size: Too big: expected number to be <=65536/,
  ],
  [
    "config: 1e5 layers",
    ["train", "--config", "@deep.json"],
    /deep\.json: model\.num_hidden_layers: Too big/,
  ],
  [
    "config: a 500 KB value",
    ["train", "--config", "@long-value.json"],
    /long-value\.json: precision: Too big: expected string to have <=64 characters/,
  ],
  // flags
  ["--batch-size 1e9", ["train", "--batch-size", "1000000000"], /--batch-size 1000000000: Too big/],
  [
    "memory estimate",
    ["train", "--config", "small", "--batch-size", "65536", "--seq-len", "2048"],
    /needs at least \d+ GiB .* more than the .* this machine has/,
  ],
  ["--lr 1e308", ["train", "--lr", "1e308"], /--lr 1e\+308: Too big: expected number to be <=10/],
  [
    "a 100 KB flag value",
    ["train", "--precision", "p".repeat(100_000)],
    /--precision p{80}\.\.\. \(100000 characters\): Too big/,
  ],
  ["positional argument", ["train", "100"], /^error: unexpected argument "100" \(flags are --name value\)$/],
  [
    "a value after a boolean flag",
    ["train", "--json", "4"],
    /^error: flag --json takes no value \(got "4"\)$/,
  ],
  [
    "--expert-parallel with a value that is not an integer",
    ["train", "--expert-parallel", "two"],
    /^error: flag --expert-parallel: "two" is not an integer$/,
  ],
  [
    "eval --batch-size 0",
    ["eval", "--checkpoint", "@base", "--data", "datasets/default", "--batch-size", "0"],
    /--batch-size 0: must be an integer in \[1, 65536\]/,
  ],
  [
    "eval --seq-len 0",
    ["eval", "--checkpoint", "@base", "--data", "datasets/default", "--seq-len", "0"],
    /--seq-len 0: must be an integer/,
  ],
  [
    "eval --batches 0",
    ["eval", "--checkpoint", "@base", "--data", "datasets/default", "--batches", "0"],
    /--batches 0: must be an integer/,
  ],
  [
    "eval: memory estimate",
    [
      "eval",
      "--checkpoint",
      "@base",
      "--data",
      "datasets/default",
      "--batch-size",
      "65536",
      "--seq-len",
      "128",
    ],
    /needs at least \d+ GiB/,
  ],
  [
    "bench step: memory estimate",
    ["bench", "step", "--config", "small", "--batch-size", "65536", "--backend", "ts"],
    /a small step of 65536 x 2048 tokens needs at least \d+ GiB/,
  ],
  ["bench soak --steps 0", ["bench", "soak", "--steps", "0"], /--steps 0: must be an integer in \[1, /],
  [
    "prepare-data: no documents (the message names --out, not its temporary folder)",
    ["prepare-data", "--input", "@empty.txt", "--out", "@ds-empty"],
    /^error: [^ ]*\/ds-empty: no documents to write$/,
  ],
  [
    "prepare-data --shard-bytes 0",
    ["prepare-data", "--input", "@in.txt", "--out", "@ds-new", "--shard-bytes", "0"],
    /--shard-bytes 0: must be a positive number of bytes/,
  ],
  // output locations
  ["--out a file", ["train", "--out", "@a-file"], /--out .*a-file: exists and is not a folder/],
  [
    "--out under a file",
    ["train", "--out", "@a-file/run"],
    /--out .*a-file\/run: a component of the path is not a folder \(ENOTDIR\)/,
  ],
  ["--out empty", ["train", "--out", ""], /--out: the run folder name is empty/],
  [
    "--out someone's folder",
    ["train", "--out", "@mine"],
    /--out .*mine: exists and is not a moe8 run folder \(it holds "notes\.txt"\)/,
  ],
  [
    "prepare-data: --out someone's folder",
    ["prepare-data", "--input", "@in.txt", "--out", "@mine", "--overwrite"],
    /mine: exists and is not a dataset folder \(it holds "notes\.txt"\); refusing to replace it/,
  ],
  [
    "prepare-data: --out a file",
    ["prepare-data", "--input", "@in.txt", "--out", "@a-file"],
    /a-file: exists and is not a folder/,
  ],
  [
    "prepare-data: --out the input",
    ["prepare-data", "--input", "@in.txt", "--out", "@in.txt"],
    /in\.txt: inside the input/,
  ],
  [
    "prepare-data: --out inside the input",
    ["prepare-data", "--input", "@mine", "--out", "@mine/ds"],
    /mine\/ds: inside the input/,
  ],
  [
    "prepare-data: a dataset without --overwrite",
    ["prepare-data", "--input", "@in.txt", "--out", "@bpe-data"],
    /bpe-data: already holds a dataset; pass --overwrite to replace it/,
  ],
];

beforeAll(async () => {
  const r = cli(["train", "--steps", "1", ...TINY, "--out", at("run")]);
  expect(r.status, r.stderr).toBe(0);
  const base = at("run/checkpoints/step-1");
  cpSync(base, at("base"), { recursive: true });
  for (const [name, tamper] of checkpoints) {
    cpSync(base, at(`ck-${name}`), { recursive: true });
    tamper(at(`ck-${name}`));
  }
  writeFileSync(at("a-file"), "a file");
  writeFileSync(at("empty.txt"), "");
  mkdirSync(at("mine"));
  writeFileSync(at("mine/notes.txt"), "keep me");
  writeFileSync(at("in.txt"), `${"the king speaks to the queen at night. ".repeat(40)}\n\n`.repeat(30));
  symlinkSync("/dev/zero", at("zero.json"));
  writeFileSync(at("huge.json"), `{"steps": 1, "x": "${"a".repeat(5 * 2 ** 20)}"}`);
  writeFileSync(at("wide.json"), JSON.stringify({ model: { hidden_size: 1e6 } }));
  writeFileSync(at("deep.json"), JSON.stringify({ model: { num_hidden_layers: 1e5 } }));
  writeFileSync(at("long-value.json"), JSON.stringify({ precision: "x".repeat(500_000) }));
  if (hasFifo) {
    execFileSync("mkfifo", [at("fifo.arrows")]);
    cpSync(base, at("ck-fifo"), { recursive: true });
    cpSync(base, at("ck-zero"), { recursive: true });
    rmSync(at("ck-fifo/model.safetensors"));
    execFileSync("mkfifo", [at("ck-fifo/model.safetensors")]);
    rmSync(at("ck-zero/model.safetensors"));
    symlinkSync("/dev/zero", at("ck-zero/model.safetensors"));
  }
  // A dataset of one token, and one of three shards whose last has a byte flipped in place.
  await writeShards([Int32Array.of(65)], at("one"));
  const docs = Array.from({ length: 30 }, (_, i) =>
    Int32Array.from({ length: 300 }, (_, j) => (i + j) % 256),
  );
  await writeShards(docs, at("flipped"), { docsPerShard: 10 });
  const third = at("flipped/shard-00002.arrows");
  const bytes = readFileSync(third);
  bytes[Math.floor(bytes.length / 2)] ^= 0x10;
  writeFileSync(third, bytes);
  // A BPE dataset and a model trained on it.
  const p = cli([
    "prepare-data",
    "--input",
    at("in.txt"),
    "--out",
    at("bpe-data"),
    "--tokenizer",
    "bpe:300",
    "--chunk-bytes",
    "300",
  ]);
  expect(p.status, p.stderr).toBe(0);
  writeFileSync(at("bpe.json"), JSON.stringify({ model: { vocab_size: 300 } }));
  const t = cli([
    "train",
    "--steps",
    "1",
    ...TINY,
    "--config",
    at("bpe.json"),
    "--data",
    at("bpe-data"),
    "--out",
    at("bpe-run"),
  ]);
  expect(t.status, t.stderr).toBe(0);
}, 180_000);

describe("hostile input: exit code 2 and one line naming the problem", () => {
  for (const [name, argv, want] of cases)
    it(name, () => {
      const args = argv.map((a) => (a.startsWith("@") ? sh(a) : a));
      // train gets tiny shapes and a fresh --out first, so the case's own flags win
      const withFlags =
        args[0] === "train"
          ? ["train", ...TINY, ...(args.includes("--out") ? [] : ["--out", at("never")]), ...args.slice(1)]
          : args;
      const r = cli(withFlags);
      expect(r.status, r.stderr).toBe(2);
      // prepare-data reports progress on stderr ("[###---] ..." lines) before it fails
      const lines = r.stderr
        .trim()
        .split("\n")
        .filter((l) => !l.startsWith("["));
      expect(lines, r.stderr).toHaveLength(1);
      expect(lines[0]).toMatch(/^error: /);
      expect(lines[0]).toMatch(want);
      expect(lines[0].length).toBeLessThan(1100); // no 5 MB value echoed back
      expect(readdirSync(dir)).not.toContain("never");
    });
});
