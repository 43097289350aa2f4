// The train/validation split, by whole documents so no validation text is ever trained on. It depends
// only on the data (not on the seed), so every run on a dataset validates on the same documents.
import { UsageError } from "@moe8/fp8-core";

export interface SplitOptions {
  /** Share of the tokens held out (default 0.01); 0 disables validation. */
  valFraction?: number;
  /** Hold out at least this many tokens (e.g. a few windows), data permitting. */
  minValTokens?: number;
  /** And at most this many, so validation stays cheap on big data (default 1 Mi tokens). */
  maxValTokens?: number;
}

export interface Split {
  /** Document indices in file order. */
  train: Int32Array;
  val: Int32Array;
}

export function splitDocuments(docLengths: Int32Array, options: SplitOptions = {}, where = "dataset"): Split {
  const fraction = options.valFraction ?? 0.01;
  const total = docLengths.reduce((a, n) => a + n, 0);
  const ids = Int32Array.from({ length: docLengths.length }, (_, i) => i).filter((i) => docLengths[i] > 0);
  const target =
    fraction > 0
      ? Math.min(
          options.maxValTokens ?? 2 ** 20,
          Math.max(Math.ceil(fraction * total), options.minValTokens ?? 0),
        )
      : 0;
  // Candidates in a fixed pseudo-random order (a hash of the index), so validation documents are spread
  // over the whole corpus rather than all taken from its end.
  const order = Array.from(ids).sort((a, b) => hash32(a) - hash32(b) || a - b);
  const isVal = new Uint8Array(docLengths.length);
  let valTokens = 0;
  for (const i of order) {
    if (valTokens >= target) break;
    if (valTokens + docLengths[i] > total / 2) continue; // never hold out more than half the data
    isVal[i] = 1;
    valTokens += docLengths[i];
  }
  const train = ids.filter((i) => !isVal[i]);
  const val = ids.filter((i) => isVal[i] === 1);
  if (train.length === 0) throw new UsageError(`${where}: no training tokens (all documents are empty)`);
  return { train, val };
}

function hash32(i: number): number {
  let z = Math.imul(i ^ 0x5bd1e995, 0x9e3779b1);
  z = Math.imul(z ^ (z >>> 15), 0x85ebca6b);
  return (z ^ (z >>> 13)) >>> 0;
}
