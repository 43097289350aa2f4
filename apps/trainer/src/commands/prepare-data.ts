// `moe8 prepare-data --input <files or folders> --out datasets/NAME [--tokenizer byte|bpe:N|tokenizer.json]`:
// tokenises text (.txt/.md/.jsonl, gzipped too, .parquet, Arrow and Hugging Face datasets folders: the
// list is in packages/data/src/prepare/inputs.ts) into Arrow IPC stream shards with a manifest, with a
// progress bar.
// An existing --out is replaced only when it is a previous dataset and --overwrite is given.
import { formatProgressBar, prepareData } from "@moe8/data";
import { UsageError } from "@moe8/fp8-core";
import { type FlagSpec, parseArgs } from "../args.ts";

export const PREPARE_DATA_FLAGS: FlagSpec = {
  input: "list",
  out: "string",
  overwrite: "boolean",
  tokenizer: "string",
  "text-field": "string",
  "shard-bytes": "int",
  "chunk-bytes": "int",
  debug: "boolean",
};

export async function prepareDataCommand(argv: string[]): Promise<number> {
  const { flags } = parseArgs(argv, PREPARE_DATA_FLAGS);
  const input = (flags.input as string[] | undefined) ?? [];
  if (!input.length) throw new UsageError("prepare-data needs --input <file or folder> (repeatable)");
  if (!flags.out) throw new UsageError("prepare-data needs --out DIR");
  const tty = process.stderr.isTTY;
  let last = 0;
  const manifest = await prepareData({
    input,
    out: String(flags.out),
    overwrite: flags.overwrite === true,
    tokenizer: String(flags.tokenizer ?? "byte"),
    textField: String(flags["text-field"] ?? "text"),
    shardBytes: flags["shard-bytes"] as number | undefined,
    chunkBytes: flags["chunk-bytes"] as number | undefined,
    onProgress: (p) => {
      const now = Date.now();
      if (now - last < 200 && p.bytesDone < p.bytesTotal) return;
      last = now;
      const line = `${p.phase === "train-tokenizer" ? "training tokenizer " : ""}${formatProgressBar(p.bytesDone, p.bytesTotal)} ${p.documents} docs, ${p.tokens} tokens`;
      if (tty) process.stderr.write(`\r${line}`);
      else console.error(line);
    },
  });
  if (tty) process.stderr.write("\n");
  console.log(
    `wrote ${manifest.shards.length} shards, ${manifest.documents} documents, ${manifest.tokens} tokens (${manifest.tokenizer.type}, vocab ${manifest.vocab_size}) to ${flags.out}`,
  );
  return 0;
}
