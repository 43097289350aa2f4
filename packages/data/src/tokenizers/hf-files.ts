// A tokenizer as the files of a Hugging Face model folder: tokenizer.json (the `tokenizers` library's
// format) and tokenizer_config.json (what `AutoTokenizer.from_pretrained` reads first), and the way
// back. The byte-level tokenizer is written as a byte-level BPE without merges: its 256 tokens are
// GPT-2's byte characters with id = byte value, so `tokenizers` encodes every text to its UTF-8
// bytes exactly as ByteTokenizer does.
import { UsageError } from "@moe8/fp8-core";
import { BpeTokenizer } from "./bpe.ts";
import { BYTE_TO_CHAR } from "./byte-level.ts";
import type { Tokenizer } from "./types.ts";

export const TOKENIZER_FILE = "tokenizer.json";
export const TOKENIZER_CONFIG_FILE = "tokenizer_config.json";

/** The tokenizer as a BPE over byte characters (the byte-level one: no merges, no special tokens). */
function asBpe(tok: Tokenizer): BpeTokenizer {
  if (tok instanceof BpeTokenizer) return tok;
  if (tok.vocabSize === 256 && tok.eotId === undefined) return new BpeTokenizer(BYTE_TO_CHAR, [], []);
  throw new UsageError(`cannot write a tokenizer.json for a ${tok.constructor.name}`);
}

/**
 * tokenizer.json and tokenizer_config.json for `tok`. modelMaxLength: the longest context the model
 * was trained on. The end-of-text token, when there is one, is the BOS, EOS and padding token.
 */
export function hfTokenizerFiles(tok: Tokenizer, modelMaxLength: number): Record<string, string> {
  const bpe = asBpe(tok);
  const eot = bpe.eotId === undefined ? null : bpe.vocab[bpe.eotId];
  const config = {
    tokenizer_class: "PreTrainedTokenizerFast",
    model_max_length: modelMaxLength,
    // transformers would otherwise "clean up" decoded text (" ." -> "."), which breaks round trips.
    clean_up_tokenization_spaces: false,
    add_bos_token: false,
    add_eos_token: false,
    bos_token: eot,
    eos_token: eot,
    pad_token: eot,
    unk_token: null,
  };
  return {
    [TOKENIZER_FILE]: `${JSON.stringify(bpe.toJSON(), null, 2)}\n`,
    [TOKENIZER_CONFIG_FILE]: `${JSON.stringify(config, null, 2)}\n`,
  };
}
