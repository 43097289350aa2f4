// Byte-level tokenizer: token = UTF-8 byte. Vocabulary 256, nothing to train, any text encodes.
import type { Tokenizer } from "./types.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder(); // replaces invalid sequences (a window cut inside a character) with U+FFFD

export class ByteTokenizer implements Tokenizer {
  readonly vocabSize = 256;
  readonly eotId = undefined;

  encode(text: string): Int32Array {
    return Int32Array.from(encoder.encode(text));
  }

  decode(ids: ArrayLike<number>): string {
    return decoder.decode(Uint8Array.from(ids as ArrayLike<number>));
  }
}
