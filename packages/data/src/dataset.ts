// Opening a dataset: check the manifest against its shards and build a small index (the byte range of
// every record batch and the length of every document), so the loader can read any document later
// without keeping the data in memory. Opening reads every shard once, one record batch at a time.
import { createHash } from "node:crypto";
import { basename, dirname, join } from "node:path";
import { UsageError } from "@moe8/fp8-core";
import { MessageHeader, type Schema } from "apache-arrow";
import { checkTokenColumn, docsFromBatch } from "./columns.ts";
import { checkRegular, statOrThrow, statRegularFile } from "./files.ts";
import { decodeBatch, readMessageAt, scanStream } from "./ipc-scan.ts";
import { MANIFEST_FILE, type Manifest, readManifest } from "./manifest.ts";
import { refuseRawInput } from "./prepare/inputs.ts";

export interface OpenOptions {
  /** Token column; defaults to the manifest's, else "tokens" or "input_ids", whichever the file has. */
  column?: string;
  /** Vocabulary size for a bare .arrows file without a manifest (ids are then checked against it). */
  vocabSize?: number;
  /** Verify each shard's sha256 against the manifest while indexing (default true). */
  verifyChecksums?: boolean;
}

/** One record batch of one shard: a unit of random access. */
export interface Block {
  shard: number;
  offset: number;
  length: number;
  /** Global index of its first document; its documents are consecutive. */
  firstDoc: number;
  rows: number;
  /** Row index of its first document within the shard, for error messages. */
  rowBase: number;
}

export interface Dataset {
  path: string;
  /** Null for a bare .arrows file that no manifest describes. */
  manifest: Manifest | null;
  column: string;
  /** Ids are checked against it; for a bare file without vocabSize, the largest id + 1. */
  vocabSize: number;
  /** End-of-text id the loader inserts between documents (BPE datasets), or undefined (byte level). */
  eotId: number | undefined;
  shardPaths: string[];
  schemaBytes: Uint8Array[];
  blocks: Block[];
  docLengths: Int32Array;
  docBlock: Int32Array;
  tokens: number;
  /** Identifies the data, so a cursor saved for other data is refused. */
  fingerprint: string;
}

export async function openDataset(path: string, options: OpenOptions = {}): Promise<Dataset> {
  const st = await statOrThrow(path, "dataset");
  let manifest: Manifest | null = null;
  let manifestDir = path;
  let files: string[];
  refuseRawInput(path, st.isDirectory());
  if (st.isDirectory()) {
    manifest = await readManifest(path);
    files = manifest.shards.map((s) => join(path, s.file));
  } else {
    checkRegular(st, path, "dataset (a folder or an .arrows file)");
    manifestDir = dirname(path);
    const dirManifest = await readManifest(manifestDir).catch(() => null);
    const entry = dirManifest?.shards.find((s) => s.file === basename(path));
    if (dirManifest && entry) {
      // A single shard of a described dataset keeps the dataset's tokenizer, column and vocabulary.
      manifest = { ...dirManifest, shards: [entry], documents: entry.documents, tokens: entry.tokens };
    }
    files = [path];
  }
  if (manifest) await checkSizes(join(manifestDir, MANIFEST_FILE), manifest, files);
  const verify = manifest !== null && options.verifyChecksums !== false;
  const index = new IndexBuilder(manifest?.vocab_size ?? options.vocabSize);
  for (let i = 0; i < files.length; i++) {
    const column = options.column ?? manifest?.column;
    const sha = await index.addShard(files[i], i, column, verify);
    if (manifest) checkShard(files[i], manifest.shards[i], index, i, sha);
  }
  const eot = manifest?.tokenizer.type === "bpe" ? manifest.tokenizer.eot_id : undefined;
  const vocabSize = manifest?.vocab_size ?? options.vocabSize ?? index.maxId + 1;
  const fingerprint = createHash("sha256")
    .update(JSON.stringify([index.column, index.perShard, manifest?.shards.map((s) => s.sha256) ?? []]))
    .digest("hex")
    .slice(0, 16);
  return {
    path,
    manifest,
    column: index.column!,
    vocabSize,
    eotId: eot,
    shardPaths: files,
    schemaBytes: index.schemaBytes,
    blocks: index.blocks,
    docLengths: index.docs.toArray(),
    docBlock: index.docBlock.toArray(),
    tokens: index.tokens,
    fingerprint,
  };
}

/** The documents of one block, in row order. */
export async function readBlockDocs(ds: Dataset, blockIndex: number): Promise<Int32Array[]> {
  const b = ds.blocks[blockIndex];
  const file = ds.shardPaths[b.shard];
  const batch = decodeBatch(file, ds.schemaBytes[b.shard], await readMessageAt(file, b.offset, b.length));
  return docsFromBatch(batch, { file, column: ds.column, vocabSize: ds.vocabSize, rowBase: b.rowBase });
}

async function checkSizes(manifestPath: string, manifest: Manifest, files: string[]): Promise<void> {
  for (let i = 0; i < files.length; i++) {
    const st = await statRegularFile(files[i], `shard listed in ${manifestPath}`);
    if (st.size !== manifest.shards[i].bytes) {
      throw new UsageError(`${files[i]}: ${st.size} bytes but the manifest says ${manifest.shards[i].bytes}`);
    }
  }
}

function checkShard(
  file: string,
  entry: Manifest["shards"][number],
  index: IndexBuilder,
  i: number,
  sha?: string,
) {
  const [docs, tokens] = index.perShard[i];
  if (sha !== undefined && sha !== entry.sha256) {
    throw new UsageError(`${file}: sha256 ${sha} does not match the manifest's ${entry.sha256}`);
  }
  if (docs !== entry.documents)
    throw new UsageError(`${file}: ${docs} documents but the manifest says ${entry.documents}`);
  if (tokens !== entry.tokens)
    throw new UsageError(`${file}: ${tokens} tokens but the manifest says ${entry.tokens}`);
}

class IndexBuilder {
  column: string | undefined;
  schemaBytes: Uint8Array[] = [];
  blocks: Block[] = [];
  docs = new GrowableInt32();
  docBlock = new GrowableInt32();
  perShard: [number, number][] = [];
  tokens = 0;
  maxId = -1;

  constructor(private vocabSize: number | undefined) {}

  /** Indexes one shard; returns its sha256 when asked to hash it. */
  async addShard(
    file: string,
    shard: number,
    column: string | undefined,
    hashIt: boolean,
  ): Promise<string | undefined> {
    const hash = hashIt ? createHash("sha256") : undefined;
    const [docs0, tokens0] = [this.docs.length, this.tokens];
    for await (const msg of scanStream(file, hash)) {
      if (msg.header === MessageHeader.Schema) {
        const schema = msg.message.header() as Schema;
        this.column ??= column ?? pickColumn(schema);
        checkTokenColumn(schema, this.column, file);
        this.schemaBytes[shard] = msg.bytes;
      } else if (msg.header === MessageHeader.DictionaryBatch) {
        throw new UsageError(`${file}: dictionary-encoded columns are not supported`);
      } else if (msg.header === MessageHeader.RecordBatch) {
        const batch = decodeBatch(file, this.schemaBytes[shard], msg.bytes);
        const rowBase = this.docs.length - docs0;
        const ctx = { file, column: this.column!, vocabSize: this.vocabSize, rowBase };
        const docs = docsFromBatch(batch, ctx);
        const block = this.blocks.length;
        const { offset, bytes } = msg;
        this.blocks.push({
          shard,
          offset,
          length: bytes.length,
          firstDoc: this.docs.length,
          rows: docs.length,
          rowBase,
        });
        for (const d of docs) {
          this.docs.push(d.length);
          this.docBlock.push(block);
          this.tokens += d.length;
          for (let j = 0; j < d.length; j++) if (d[j] > this.maxId) this.maxId = d[j];
        }
      }
    }
    this.perShard.push([this.docs.length - docs0, this.tokens - tokens0]);
    return hash?.digest("hex");
  }
}

function pickColumn(schema: Schema): string {
  const names = schema.fields.map((f) => f.name);
  return names.includes("tokens") || !names.includes("input_ids") ? "tokens" : "input_ids";
}

/** An Int32Array that grows, so an index of millions of documents costs 4 bytes each. */
class GrowableInt32 {
  private buf = new Int32Array(1024);
  length = 0;
  push(v: number): void {
    if (this.length === this.buf.length) {
      const next = new Int32Array(this.buf.length * 2);
      next.set(this.buf);
      this.buf = next;
    }
    this.buf[this.length++] = v;
  }
  toArray(): Int32Array {
    return this.buf.slice(0, this.length);
  }
}
