// TokenLoader: training batches of packed documents, a fixed validation set, and a cursor from which
// a new loader resumes at exactly the same token.
//
// Packing: each epoch's documents are concatenated in their shuffled order and cut into windows of
// seqLen + 1 tokens (ids = window[0..T), targets = window[1..T]); windows run on across document and
// epoch boundaries, so no token is dropped. Byte-level data (vocab 256) has no spare id for a separator,
// so documents are joined as they are; a BPE dataset's manifest names its <|endoftext|> id (eot_id) and
// it is inserted after every document.
//
// Memory: the dataset index (4 bytes a document plus one entry per record batch) and one shuffle group
// (plan.ts) of documents at a time; data of any size is read incrementally.

import { UsageError } from "@moe8/fp8-core";
import { type Dataset, type OpenOptions, openDataset, readBlockDocs } from "./dataset.ts";
import { type BlockDocs, type EpochPlan, groupTrainDocs, planEpoch } from "./plan.ts";
import { Rng } from "./prng.ts";
import { type Split, splitDocuments } from "./split.ts";

export interface LoaderOptions extends OpenOptions {
  seqLen: number;
  batchSize: number;
  seed?: number;
  /** Share of the tokens held out for validation (default 0.01; at least minValWindows windows). */
  valFraction?: number;
  /** Default: max(8, batchSize), so there is at least one full validation batch. */
  minValWindows?: number;
  maxValTokens?: number;
  /** Tokens shuffled together in memory (default 16 Mi). */
  shuffleTokens?: number;
  /** Resume from here (from TokenLoader.cursor(), possibly through JSON). */
  cursor?: Cursor;
}

/** Where the next training token comes from. Plain JSON. */
export interface Cursor {
  epoch: number;
  /** Position in the epoch's shuffled document order. */
  docIndex: number;
  /** Token offset in that document (the eot, when there is one, counts as its last token). */
  tokenOffset: number;
  /** Generator state at the start of `epoch`: the epoch's order is rebuilt from it. */
  rngState: number[];
  /** Dataset and split fingerprint: a cursor is refused on other data. */
  dataset: string;
}

export interface Batch {
  /** Row-major [batchSize, seqLen]. */
  ids: Int32Array;
  /** ids shifted by one token within each window. */
  targets: Int32Array;
  batchSize: number;
  seqLen: number;
}

export class TokenLoader {
  readonly split: Split;
  private readonly blockDocs: BlockDocs;
  private readonly shuffleTokens: number;
  private readonly fingerprint: string;
  private epochState: number[];
  private plan: EpochPlan;
  private epochIndex: number;
  private docIndex: number;
  private tokenOffset: number;
  private group = { index: -1, docs: new Map<number, Int32Array>() };
  private valCache: Batch[] | null = null;

  static async open(data: string | Dataset, options: LoaderOptions): Promise<TokenLoader> {
    const ds = typeof data === "string" ? await openDataset(data, options) : data;
    return new TokenLoader(ds, options);
  }

  private constructor(
    readonly dataset: Dataset,
    readonly options: LoaderOptions,
  ) {
    const { seqLen, batchSize } = options;
    for (const [name, v] of [
      ["seqLen", seqLen],
      ["batchSize", batchSize],
    ] as const) {
      if (!Number.isSafeInteger(v) || v < 1)
        throw new UsageError(`TokenLoader: ${name} must be a positive integer, got ${v}`);
    }
    const minValTokens = (options.minValWindows ?? Math.max(8, batchSize)) * (seqLen + 1);
    this.split = splitDocuments(dataset.docLengths, { ...options, minValTokens }, dataset.path);
    checkEnoughTokens(dataset, this.split, seqLen, (options.valFraction ?? 0.01) > 0);
    this.blockDocs = groupTrainDocs(this.split.train, dataset.docBlock, dataset.docLengths);
    this.shuffleTokens = options.shuffleTokens ?? 2 ** 24;
    this.fingerprint = `${dataset.fingerprint}:${this.split.train.length}:${checksum(this.split.train)}`;
    const c = options.cursor;
    if (c) checkCursor(c, this.fingerprint, dataset.path);
    this.epochIndex = c?.epoch ?? 0;
    this.docIndex = c?.docIndex ?? 0;
    this.tokenOffset = c?.tokenOffset ?? 0;
    this.epochState = c ? [...c.rngState] : Rng.fromSeed(options.seed ?? 0).state();
    this.plan = planEpoch(this.blockDocs, this.epochState, this.shuffleTokens);
    if (this.docIndex > this.plan.order.length) {
      throw new UsageError(
        `data cursor: docIndex ${this.docIndex} is past the epoch's ${this.plan.order.length} documents`,
      );
    }
  }

  get epoch(): number {
    return this.epochIndex;
  }

  cursor(): Cursor {
    return {
      epoch: this.epochIndex,
      docIndex: this.docIndex,
      tokenOffset: this.tokenOffset,
      rngState: [...this.epochState],
      dataset: this.fingerprint,
    };
  }

  async nextBatch(): Promise<Batch> {
    const { seqLen: T, batchSize: B } = this.options;
    const window = new Int32Array(T + 1);
    const batch = { ids: new Int32Array(B * T), targets: new Int32Array(B * T), batchSize: B, seqLen: T };
    for (let b = 0; b < B; b++) {
      await this.fill(window);
      batch.ids.set(window.subarray(0, T), b * T);
      batch.targets.set(window.subarray(1), b * T);
    }
    return batch;
  }

  /** The validation batches: the same every call (held-out documents in file order, not shuffled). */
  async valBatches(): Promise<Batch[]> {
    if (this.valCache) return this.valCache;
    const { seqLen: T, batchSize: B } = this.options;
    const docs = await readDocs(this.dataset, this.split.val);
    const windows = packWindows(this.split.val, docs, T + 1, this.dataset.eotId);
    const count = windows.length >= B ? Math.floor(windows.length / B) * B : windows.length;
    const batches: Batch[] = [];
    for (let i = 0; i < count; i += B) {
      const rows = windows.slice(i, Math.min(i + B, count));
      const batch = {
        ids: new Int32Array(rows.length * T),
        targets: new Int32Array(rows.length * T),
        batchSize: rows.length,
        seqLen: T,
      };
      rows.forEach((w, r) => {
        batch.ids.set(w.subarray(0, T), r * T);
        batch.targets.set(w.subarray(1), r * T);
      });
      batches.push(batch);
    }
    this.valCache = batches;
    return batches;
  }

  /** Copies the next window.length training tokens into window, advancing the cursor. */
  private async fill(window: Int32Array): Promise<void> {
    const eot = this.dataset.eotId;
    let filled = 0;
    while (filled < window.length) {
      if (this.docIndex >= this.plan.order.length) this.nextEpoch();
      const doc = await this.doc(this.docIndex);
      const length = doc.length + (eot === undefined ? 0 : 1);
      const take = Math.min(window.length - filled, length - this.tokenOffset);
      const fromDoc = Math.min(take, doc.length - this.tokenOffset);
      window.set(doc.subarray(this.tokenOffset, this.tokenOffset + fromDoc), filled);
      if (fromDoc < take) window[filled + fromDoc] = eot!;
      filled += take;
      this.tokenOffset += take;
      if (this.tokenOffset === length) {
        this.docIndex++;
        this.tokenOffset = 0;
      }
    }
  }

  private nextEpoch(): void {
    this.epochIndex++;
    this.epochState = this.plan.nextState;
    this.plan = planEpoch(this.blockDocs, this.epochState, this.shuffleTokens);
    this.docIndex = 0;
    this.tokenOffset = 0;
    this.group = { index: -1, docs: new Map() };
  }

  /** The document at a position of the epoch order, loading its shuffle group when needed. */
  private async doc(position: number): Promise<Int32Array> {
    const ends = this.plan.groupEnds;
    let g = this.group.index;
    if (g < 0 || position >= ends[g] || position < (g === 0 ? 0 : ends[g - 1])) {
      g = ends.findIndex((end) => position < end);
      const ids = this.plan.order.subarray(g === 0 ? 0 : ends[g - 1], ends[g]);
      this.group = { index: -1, docs: new Map() }; // drop the old group before reading the new one
      this.group = { index: g, docs: await readDocs(this.dataset, ids) };
    }
    return this.group.docs.get(this.plan.order[position])!;
  }
}

/** Reads the given documents, touching each record batch that holds any of them once. */
async function readDocs(ds: Dataset, ids: Int32Array): Promise<Map<number, Int32Array>> {
  const byBlock = new Map<number, number[]>();
  for (const d of ids) {
    const b = ds.docBlock[d];
    const list = byBlock.get(b);
    if (list) list.push(d);
    else byBlock.set(b, [d]);
  }
  const out = new Map<number, Int32Array>();
  for (const b of [...byBlock.keys()].sort((x, y) => x - y)) {
    const rows = await readBlockDocs(ds, b);
    for (const d of byBlock.get(b)!) out.set(d, rows[d - ds.blocks[b].firstDoc]);
  }
  return out;
}

function packWindows(
  ids: Int32Array,
  docs: Map<number, Int32Array>,
  size: number,
  eot?: number,
): Int32Array[] {
  const windows: Int32Array[] = [];
  let current = new Int32Array(size);
  let filled = 0;
  const push = (t: number) => {
    current[filled++] = t;
    if (filled === size) {
      windows.push(current);
      current = new Int32Array(size);
      filled = 0;
    }
  };
  for (const d of ids) {
    for (const t of docs.get(d)!) push(t);
    if (eot !== undefined) push(eot);
  }
  return windows;
}

function checkCursor(c: Cursor, fingerprint: string, where: string): void {
  const ok =
    c !== null &&
    typeof c === "object" &&
    [c.epoch, c.docIndex, c.tokenOffset].every((v) => Number.isSafeInteger(v) && v >= 0) &&
    Array.isArray(c.rngState) &&
    c.rngState.length === 4 &&
    c.rngState.every((x) => Number.isInteger(x) && x >= 0 && x < 2 ** 32) &&
    c.rngState.some((x) => x !== 0);
  if (!ok) throw new UsageError(`data cursor: malformed ${JSON.stringify(c)}`);
  if (c.dataset !== fingerprint) {
    throw new UsageError(
      `data cursor: saved for other data or another split (${c.dataset}), not ${where} (${fingerprint})`,
    );
  }
}

function checksum(a: Int32Array): string {
  let h = 0x811c9dc5;
  for (const v of a) h = Math.imul(h ^ v, 0x01000193);
  return (h >>> 0).toString(16);
}

/**
 * Windows repeat the data when it is shorter than one of them (a 1-token dataset "trained" on the
 * same token forever), and a split without one held-out window gives a validation loss of NaN:
 * both are refused with the counts. The eot separator counts, as the windows include it.
 */
function checkEnoughTokens(ds: Dataset, split: Split, seqLen: number, validate: boolean): void {
  const tokens = (ids: Int32Array) =>
    ids.reduce((a, d) => a + ds.docLengths[d] + (ds.eotId === undefined ? 0 : 1), 0);
  const window = seqLen + 1;
  const train = tokens(split.train);
  if (train < window)
    throw new UsageError(
      `${ds.path}: ${train} training tokens, fewer than one window of seq_len + 1 = ${window}`,
    );
  const val = tokens(split.val);
  if (validate && val < window)
    throw new UsageError(
      `${ds.path}: the held-out documents hold ${val} tokens, fewer than one validation window of seq_len + 1 = ${window} (a dataset needs at least two documents and ${2 * window} tokens)`,
    );
}
