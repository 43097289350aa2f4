export interface Tokenizer {
  /** Ids are in [0, vocabSize). */
  readonly vocabSize: number;
  /** End-of-text id, inserted between documents when packing; undefined for byte level. */
  readonly eotId: number | undefined;
  encode(text: string): Int32Array;
  decode(ids: ArrayLike<number>): string;
}
