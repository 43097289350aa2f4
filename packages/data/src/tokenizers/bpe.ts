// A byte-level BPE tokenizer that reads and writes Hugging Face's tokenizer.json (model BPE,
// pre-tokenizer and decoder ByteLevel), so `tokenizers.Tokenizer.from_file` and transformers load
// what we train, and GPT-2-style tokenizer.json files load here.
import { UsageError } from "@moe8/fp8-core";
import { reason } from "../errors.ts";
import { readRegularFile, writeFileAtomic } from "../files.ts";
import { BpeTrainer, EOT_TOKEN, mergeWord } from "./bpe-train.ts";
import { BYTE_TO_CHAR, CHAR_TO_BYTE, preTokenize, toByteLevel } from "./byte-level.ts";
import type { Tokenizer } from "./types.ts";

const decoder = new TextDecoder();
const CACHE_LIMIT = 100_000;

export class BpeTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly eotId: number | undefined;
  private readonly ids: Map<string, number>;
  private readonly ranks = new Map<number, number>(); // pair key -> merge rank
  private readonly results = new Map<number, number>(); // pair key -> merged id
  private readonly byteIds: Int32Array;
  private readonly cache = new Map<string, Int32Array>();

  constructor(
    readonly vocab: string[],
    readonly merges: [string, string][],
    readonly special: string[] = [EOT_TOKEN],
  ) {
    this.vocabSize = vocab.length;
    this.ids = new Map(vocab.map((t, i) => [t, i]));
    this.eotId = this.ids.get(EOT_TOKEN);
    this.byteIds = Int32Array.from(BYTE_TO_CHAR, (c) => {
      const id = this.ids.get(c);
      if (id === undefined) throw new UsageError(`BPE vocabulary lacks the byte token ${JSON.stringify(c)}`);
      return id;
    });
    merges.forEach(([a, b], rank) => {
      const [ia, ib, ic] = [this.ids.get(a), this.ids.get(b), this.ids.get(a + b)];
      if (ia === undefined || ib === undefined || ic === undefined) {
        throw new UsageError(`BPE merge ${rank} "${a} ${b}" uses a token missing from the vocabulary`);
      }
      this.ranks.set(ia * this.vocabSize + ib, rank);
      this.results.set(ia * this.vocabSize + ib, ic);
    });
  }

  /** Trains on texts (read once to count words) to a vocabulary of vocabSize tokens at most. */
  static async train(
    texts: Iterable<string> | AsyncIterable<string>,
    vocabSize: number,
  ): Promise<BpeTokenizer> {
    const trainer = new BpeTrainer();
    for await (const t of texts) trainer.feed(t);
    const model = trainer.train(vocabSize);
    return new BpeTokenizer(model.vocab, model.merges, model.special);
  }

  encode(text: string): Int32Array {
    const out: number[] = [];
    // Without an end-of-text token (the byte-level vocabulary as a BPE) its text is plain text.
    const parts = this.eotId === undefined ? [text] : text.split(EOT_TOKEN);
    parts.forEach((part, i) => {
      if (i > 0) out.push(this.eotId!);
      for (const w of preTokenize(part)) for (const id of this.encodeWord(w)) out.push(id);
    });
    return Int32Array.from(out);
  }

  decode(ids: ArrayLike<number>): string {
    const bytes: number[] = [];
    let text = "";
    for (const id of Array.from(ids)) {
      const token = this.vocab[id];
      if (token === undefined)
        throw new UsageError(`BPE decode: id ${id} is outside the vocabulary [0, ${this.vocabSize})`);
      if (this.special.includes(token)) {
        text += decoder.decode(Uint8Array.from(bytes.splice(0))) + token;
        continue;
      }
      for (const ch of token) bytes.push(CHAR_TO_BYTE.get(ch) ?? 0x3f);
    }
    return text + decoder.decode(Uint8Array.from(bytes));
  }

  /** Lowest-rank merge first, all its occurrences, until no known pair is left (GPT-2's algorithm). */
  private encodeWord(word: string): Int32Array {
    const hit = this.cache.get(word);
    if (hit) return hit;
    let symbols = Array.from(toByteLevel(word), (ch) => this.byteIds[CHAR_TO_BYTE.get(ch)!]);
    while (symbols.length > 1) {
      let best = -1;
      let bestRank = Infinity;
      for (let i = 0; i + 1 < symbols.length; i++) {
        const rank = this.ranks.get(symbols[i] * this.vocabSize + symbols[i + 1]);
        if (rank !== undefined && rank < bestRank) {
          bestRank = rank;
          best = symbols[i] * this.vocabSize + symbols[i + 1];
        }
      }
      if (best < 0) break;
      const a = Math.floor(best / this.vocabSize);
      symbols = mergeWord(symbols, a, best % this.vocabSize, this.results.get(best)!);
    }
    const ids = Int32Array.from(symbols);
    if (this.cache.size >= CACHE_LIMIT) this.cache.clear();
    this.cache.set(word, ids);
    return ids;
  }

  toJSON(): object {
    return {
      version: "1.0",
      truncation: null,
      padding: null,
      added_tokens: this.special.map((content) => ({
        id: this.ids.get(content),
        content,
        single_word: false,
        lstrip: false,
        rstrip: false,
        normalized: false,
        special: true,
      })),
      normalizer: null,
      pre_tokenizer: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
      post_processor: null,
      decoder: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
      model: {
        type: "BPE",
        dropout: null,
        unk_token: null,
        continuing_subword_prefix: null,
        end_of_word_suffix: null,
        fuse_unk: false,
        byte_fallback: false,
        ignore_merges: false,
        vocab: Object.fromEntries(this.vocab.map((t, i) => [t, i])),
        // "a b" strings: byte-level tokens never contain a space, and every tokenizers version reads them.
        merges: this.merges.map(([a, b]) => `${a} ${b}`),
      },
    };
  }

  async save(path: string): Promise<void> {
    await writeFileAtomic(path, `${JSON.stringify(this.toJSON(), null, 2)}\n`);
  }

  static async load(path: string): Promise<BpeTokenizer> {
    // 1 GiB: far beyond any tokenizer.json (a 1M-token vocabulary with its merges is ~100 MB).
    const text = (await readRegularFile(path, "tokenizer file", 2 ** 30)).toString("utf8");
    let json: HfTokenizerJson;
    try {
      json = JSON.parse(text);
    } catch (err) {
      throw new UsageError(`${path}: unreadable tokenizer.json (${reason(err)})`);
    }
    return BpeTokenizer.fromJSON(json, path);
  }

  static fromJSON(json: HfTokenizerJson, where = "tokenizer.json"): BpeTokenizer {
    const model = json?.model;
    if (model?.type !== "BPE" || typeof model.vocab !== "object" || !Array.isArray(model.merges)) {
      throw new UsageError(
        `${where}: field "model" must be a BPE model with vocab and merges, got type ${JSON.stringify(model?.type)}`,
      );
    }
    if (json.pre_tokenizer?.type !== "ByteLevel") {
      throw new UsageError(
        `${where}: field "pre_tokenizer" must be ByteLevel, got ${JSON.stringify(json.pre_tokenizer?.type)}`,
      );
    }
    const added = json.added_tokens ?? [];
    const vocab: string[] = [];
    for (const [token, id] of Object.entries(model.vocab)) vocab[id] = token;
    for (const t of added) vocab[t.id] ??= t.content;
    const dense = Array.from(vocab); // holes become undefined
    if (dense.some((t) => t === undefined) || dense.length !== new Set(dense).size) {
      throw new UsageError(`${where}: field "model.vocab" must map distinct tokens to the ids 0..N-1`);
    }
    const merges = model.merges.map((m) => (typeof m === "string" ? (m.split(" ") as [string, string]) : m));
    const special = added.filter((t) => t.special).map((t) => t.content);
    return new BpeTokenizer(dense, merges, special);
  }
}

/** The parts of Hugging Face's tokenizer.json that a byte-level BPE needs. */
export interface HfTokenizerJson {
  model?: { type?: string; vocab: Record<string, number>; merges: (string | [string, string])[] };
  pre_tokenizer?: { type?: string } | null;
  added_tokens?: { id: number; content: string; special?: boolean }[];
}
