// Writing documents as Arrow IPC stream shards plus their manifest. Shards are written under a
// temporary name and renamed when complete; the manifest is written last (atomically), so a folder
// with a manifest always has every shard it lists.
import { createHash } from "node:crypto";
import { mkdir, open, rename, rm } from "node:fs/promises";
import { join } from "node:path";
import { UsageError } from "@moe8/fp8-core";
import { StreamEncoder, tokenBatch, tokenSchema } from "./arrow-build.ts";
import {
  MANIFEST_FORMAT,
  type Manifest,
  type ShardInfo,
  type TokenizerSpec,
  writeManifest,
} from "./manifest.ts";

export interface WriteShardsOptions {
  /** Start a new shard after this many documents. */
  docsPerShard?: number;
  /** Start a new shard once this many bytes are written (default 64 MiB when neither is given). */
  bytesPerShard?: number;
  column?: string;
  tokenizer?: TokenizerSpec;
  /** Defaults to 256 for the byte tokenizer; required otherwise. Every id is checked against it. */
  vocabSize?: number;
  source?: Record<string, unknown>;
  /** Record batch size cap: the unit of reading, so it bounds a reader's memory (default 1 Mi tokens). */
  batchTokens?: number;
  batchDocs?: number;
}

export type Doc = ArrayLike<number>;

export async function writeShards(
  docs: Iterable<Doc> | AsyncIterable<Doc>,
  outDir: string,
  options: WriteShardsOptions = {},
): Promise<Manifest> {
  const tokenizer = options.tokenizer ?? { type: "byte" };
  const vocabSize = options.vocabSize ?? (tokenizer.type === "byte" ? 256 : undefined);
  if (vocabSize === undefined) throw new UsageError("writeShards: vocabSize is required for a BPE tokenizer");
  const column = options.column ?? "tokens";
  const bytesPerShard = options.bytesPerShard ?? (options.docsPerShard ? Infinity : 64 * 2 ** 20);
  const docsPerShard = options.docsPerShard ?? Infinity;
  await mkdir(outDir, { recursive: true });
  const shards: ShardInfo[] = [];
  let shard: ShardWriter | null = null;
  try {
    for await (const doc of docs) {
      checkIds(doc, vocabSize, shards.length);
      shard ??= await ShardWriter.create(outDir, shards.length, column, options);
      await shard.add(doc);
      if (shard.documents >= docsPerShard || shard.estimatedBytes >= bytesPerShard) {
        shards.push(await shard.finish());
        shard = null;
      }
    }
    if (shard) shards.push(await shard.finish());
    shard = null;
  } finally {
    await shard?.abort(); // leave no half-written shard behind
  }
  if (shards.length === 0) throw new UsageError(`${outDir}: no documents to write`);
  const manifest: Manifest = {
    format: MANIFEST_FORMAT,
    tokenizer,
    vocab_size: vocabSize,
    column,
    documents: shards.reduce((a, s) => a + s.documents, 0),
    tokens: shards.reduce((a, s) => a + s.tokens, 0),
    shards,
    source: options.source ?? {},
  };
  await writeManifest(outDir, manifest);
  return manifest;
}

function checkIds(doc: Doc, vocabSize: number, shard: number): void {
  for (let i = 0; i < doc.length; i++) {
    const v = doc[i];
    if (!Number.isInteger(v) || v < 0 || v >= vocabSize) {
      throw new UsageError(
        `writeShards: token id ${v} (shard ${shard}) is outside the vocabulary [0, ${vocabSize})`,
      );
    }
  }
}

class ShardWriter {
  documents = 0;
  tokens = 0;
  private bytes = 0;
  private pending: Doc[] = [];
  private pendingTokens = 0;
  private readonly hash = createHash("sha256");
  private readonly batchTokens: number;
  private readonly batchDocs: number;

  private constructor(
    private readonly fh: import("node:fs/promises").FileHandle,
    readonly file: string,
    private readonly path: string,
    private readonly encoder: StreamEncoder,
    options: WriteShardsOptions,
  ) {
    this.batchTokens = options.batchTokens ?? 2 ** 20;
    this.batchDocs = options.batchDocs ?? 4096;
  }

  static async create(dir: string, index: number, column: string, options: WriteShardsOptions) {
    const file = `shard-${String(index).padStart(5, "0")}.arrows`;
    const path = join(dir, file);
    const fh = await open(`${path}.tmp-${process.pid}`, "w");
    const encoder = new StreamEncoder(tokenSchema(column));
    const writer = new ShardWriter(fh, file, path, encoder, options);
    await writer.write(encoder.start());
    return writer;
  }

  /** Offsets (4 bytes a document) plus values (4 bytes a token), as the shard will hold them. */
  get estimatedBytes(): number {
    return this.bytes + 4 * (this.pendingTokens + this.pending.length);
  }

  async add(doc: Doc): Promise<void> {
    this.pending.push(Int32Array.from(doc)); // a copy: callers may reuse their buffer for the next document
    this.pendingTokens += doc.length;
    this.documents++;
    this.tokens += doc.length;
    if (this.pendingTokens >= this.batchTokens || this.pending.length >= this.batchDocs) await this.flush();
  }

  async finish(): Promise<ShardInfo> {
    await this.flush();
    await this.write(this.encoder.end());
    await this.fh.sync();
    await this.fh.close();
    await rename(`${this.path}.tmp-${process.pid}`, this.path);
    const info = { file: this.file, documents: this.documents, tokens: this.tokens };
    return { ...info, sha256: this.hash.digest("hex"), bytes: this.bytes };
  }

  async abort(): Promise<void> {
    await this.fh.close().catch(() => {});
    await rm(`${this.path}.tmp-${process.pid}`, { force: true });
  }

  private async flush(): Promise<void> {
    if (this.pending.length === 0) return;
    await this.write(this.encoder.batch(tokenBatch(this.encoder.schema, this.pending)));
    this.pending = [];
    this.pendingTokens = 0;
  }

  private async write(bytes: Uint8Array): Promise<void> {
    this.hash.update(bytes);
    await this.fh.write(bytes);
    this.bytes += bytes.length;
  }
}
