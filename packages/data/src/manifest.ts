// manifest.json: what a dataset folder holds, so a reader can check its shards and its tokenizer
// before training on them.
import { join } from "node:path";
import { UsageError } from "@moe8/fp8-core";
import { brief, reason } from "./errors.ts";
import { readRegularFile, writeFileAtomic } from "./files.ts";

export const MANIFEST_FORMAT = "moe8-tokens/1";
export const MANIFEST_FILE = "manifest.json";
/** A manifest lists its shards (about 200 bytes each): 64 MiB is 300,000 shards. */
const MAX_MANIFEST_BYTES = 64 * 2 ** 20;

export type TokenizerSpec =
  | { type: "byte" }
  /** eot_id: the end-of-text token the loader inserts between documents. */
  | { type: "bpe"; file: string; eot_id?: number };

export interface ShardInfo {
  file: string;
  documents: number;
  tokens: number;
  sha256: string;
  bytes: number;
}

export interface Manifest {
  format: typeof MANIFEST_FORMAT;
  tokenizer: TokenizerSpec;
  vocab_size: number;
  column: string;
  documents: number;
  tokens: number;
  shards: ShardInfo[];
  source: Record<string, unknown>;
}

export async function readManifest(dir: string): Promise<Manifest> {
  const path = join(dir, MANIFEST_FILE);
  const text = (await readRegularFile(path, "manifest", MAX_MANIFEST_BYTES)).toString("utf8");
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new UsageError(`${path}: not valid JSON (${reason(err)})`);
  }
  return validateManifest(json, path);
}

function validateManifest(json: unknown, path: string): Manifest {
  const bad = (field: string, what: string) => new UsageError(`${path}: field "${field}" ${what}`);
  if (typeof json !== "object" || json === null) throw new UsageError(`${path}: not a JSON object`);
  const m = json as Record<string, unknown>;
  if (m.format !== MANIFEST_FORMAT)
    throw bad("format", `must be "${MANIFEST_FORMAT}", got ${brief(m.format)}`);
  for (const key of ["vocab_size", "documents", "tokens"]) {
    if (!Number.isSafeInteger(m[key]) || (m[key] as number) < 0)
      throw bad(key, "must be a non-negative integer");
  }
  if ((m.vocab_size as number) < 1) throw bad("vocab_size", "must be at least 1");
  if (typeof m.column !== "string" || m.column === "") throw bad("column", "must be a non-empty string");
  const tok = m.tokenizer as Record<string, unknown> | undefined;
  if (tok?.type === "byte") {
    if (m.vocab_size !== 256)
      throw bad("vocab_size", `must be 256 for the byte tokenizer, got ${m.vocab_size}`);
  } else if (tok?.type === "bpe") {
    if (typeof tok.file !== "string") throw bad("tokenizer.file", "must name the tokenizer.json file");
  } else {
    throw bad("tokenizer", `must be {"type":"byte"} or {"type":"bpe","file":...}, got ${brief(tok)}`);
  }
  if (!Array.isArray(m.shards) || m.shards.length === 0) throw bad("shards", "must be a non-empty array");
  m.shards.forEach((s: Record<string, unknown>, i: number) => {
    if (typeof s?.file !== "string" || s.file.includes("/") || s.file.includes("\\")) {
      throw bad(`shards[${i}].file`, "must be a file name inside the dataset folder");
    }
    for (const key of ["documents", "tokens", "bytes"]) {
      if (!Number.isSafeInteger(s[key]) || (s[key] as number) < 0) {
        throw bad(`shards[${i}].${key}`, "must be a non-negative integer");
      }
    }
    if (typeof s.sha256 !== "string" || !/^[0-9a-f]{64}$/.test(s.sha256)) {
      throw bad(`shards[${i}].sha256`, "must be 64 hex digits");
    }
  });
  const shards = m.shards as ShardInfo[];
  const sum = (key: "documents" | "tokens") => shards.reduce((a, s) => a + s[key], 0);
  if (sum("documents") !== m.documents)
    throw bad("documents", `is ${m.documents} but the shards hold ${sum("documents")}`);
  if (sum("tokens") !== m.tokens) throw bad("tokens", `is ${m.tokens} but the shards hold ${sum("tokens")}`);
  return { ...(m as unknown as Manifest), source: (m.source as Record<string, unknown>) ?? {} };
}

export async function writeManifest(dir: string, manifest: Manifest): Promise<void> {
  await writeFileAtomic(join(dir, MANIFEST_FILE), `${JSON.stringify(manifest, null, 2)}\n`);
}

/**
 * Refuses a model whose embedding does not match the dataset's tokenizer: a smaller vocabulary would
 * index out of range, a different one means the data was tokenised for another model. allowLarger
 * accepts an embedding padded beyond the tokenizer (e.g. rounded up to a multiple of 64).
 */
export function checkVocab(
  manifest: Pick<Manifest, "vocab_size" | "tokenizer">,
  modelVocab: number,
  options: { allowLarger?: boolean } = {},
): void {
  const ok = options.allowLarger ? modelVocab >= manifest.vocab_size : modelVocab === manifest.vocab_size;
  if (!ok) {
    throw new UsageError(
      `tokenizer/vocabulary mismatch: the dataset's ${manifest.tokenizer.type} tokenizer has vocab_size ` +
        `${manifest.vocab_size} but the model's vocab_size is ${modelVocab}`,
    );
  }
}
