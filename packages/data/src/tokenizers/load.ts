// Choosing a tokenizer: from a --tokenizer spec for prepareData, or from a dataset's manifest.
import { existsSync } from "node:fs";
import { join } from "node:path";
import { UsageError } from "@moe8/fp8-core";
import { readManifest } from "../manifest.ts";
import { BpeTokenizer } from "./bpe.ts";
import { ByteTokenizer } from "./byte.ts";
import type { Tokenizer } from "./types.ts";

export type TokenizerChoice =
  | { kind: "byte" }
  | { kind: "bpe"; vocabSize: number }
  | { kind: "file"; path: string };

/** "byte", "bpe:N" (train a BPE of N tokens), or the path of an existing tokenizer.json. */
export function parseTokenizerSpec(spec: string): TokenizerChoice {
  if (spec === "byte") return { kind: "byte" };
  const bpe = /^bpe:(\d+)$/.exec(spec);
  if (bpe) {
    const n = Number(bpe[1]);
    if (n < 258 || n > 1_000_000)
      throw new UsageError(`--tokenizer ${spec}: BPE vocab size must be in [258, 1000000]`);
    return { kind: "bpe", vocabSize: n };
  }
  if (spec.endsWith(".json")) {
    if (!existsSync(spec)) throw new UsageError(`--tokenizer ${spec}: tokenizer file not found`);
    return { kind: "file", path: spec };
  }
  throw new UsageError(
    `--tokenizer ${JSON.stringify(spec)}: unknown tokenizer (expected byte, bpe:N or a path to tokenizer.json)`,
  );
}

/** The tokenizer a dataset was made with, as its manifest.json records it. */
export async function loadTokenizer(manifestDir: string): Promise<Tokenizer> {
  const manifest = await readManifest(manifestDir);
  const spec = manifest.tokenizer;
  const tok =
    spec.type === "byte" ? new ByteTokenizer() : await BpeTokenizer.load(join(manifestDir, spec.file));
  if (tok.vocabSize !== manifest.vocab_size) {
    throw new UsageError(
      `${join(manifestDir, "manifest.json")}: vocab_size ${manifest.vocab_size} does not match its tokenizer's ${tok.vocabSize}`,
    );
  }
  return tok;
}
