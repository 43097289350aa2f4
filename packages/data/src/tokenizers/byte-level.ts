// GPT-2's byte-level conventions, as Hugging Face's ByteLevel pre-tokenizer and decoder implement them:
// every byte is shown as a printable character, and text is split into words before BPE.

/** byte -> character: printable Latin-1 bytes map to themselves, the others to U+0100 upwards. */
export const BYTE_TO_CHAR: string[] = (() => {
  const printable = (b: number) =>
    (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  const out: string[] = [];
  let next = 256;
  for (let b = 0; b < 256; b++) out[b] = String.fromCodePoint(printable(b) ? b : next++);
  return out;
})();

export const CHAR_TO_BYTE: Map<string, number> = new Map(BYTE_TO_CHAR.map((c, b) => [c, b]));

/** The pre-tokenisation pattern of GPT-2 (ByteLevel with use_regex: true). */
export const PRE_TOKENIZE = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

const encoder = new TextEncoder();

/** Splits text into words as they appear in the text (GPT-2 pre-tokenisation). */
export function preTokenize(text: string): string[] {
  return text.match(PRE_TOKENIZE) ?? [];
}

/** A word's byte-level string (e.g. " the" -> "Ġthe"). */
export function toByteLevel(word: string): string {
  let w = "";
  for (const b of encoder.encode(word)) w += BYTE_TO_CHAR[b];
  return w;
}

export function byteLevelWords(text: string): string[] {
  return preTokenize(text).map(toByteLevel);
}
