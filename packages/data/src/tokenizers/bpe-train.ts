// Byte-level BPE training: count the words of the corpus once (GPT-2 pre-tokenisation), then merge
// the most frequent adjacent pair of symbols until the vocabulary is full. Pair counts are kept up to
// date incrementally and the best pair comes from a heap, so each merge costs only the words that
// contain it.
import { BYTE_TO_CHAR, byteLevelWords } from "./byte-level.ts";

export const EOT_TOKEN = "<|endoftext|>";

export interface BpeModel {
  /** Token strings by id: special tokens, then the 256 byte characters, then one per merge. */
  vocab: string[];
  merges: [string, string][];
  special: string[];
}

// Pair keys pack two ids into one number (ids stay below 2^21, keys below 2^42: exact in a double).
const SHIFT = 2 ** 21;
const key = (a: number, b: number) => a * SHIFT + b;

export class BpeTrainer {
  private readonly counts = new Map<string, number>();

  /** Adds a text's words to the counts; special-token strings in it are not counted as text. */
  feed(text: string): void {
    for (const part of text.split(EOT_TOKEN)) {
      for (const w of byteLevelWords(part)) this.counts.set(w, (this.counts.get(w) ?? 0) + 1);
    }
  }

  /** Learns merges until vocabSize tokens, or until no pair occurs minFrequency times. */
  train(vocabSize: number, minFrequency = 2): BpeModel {
    const special = [EOT_TOKEN];
    const vocab = [...special, ...BYTE_TO_CHAR];
    if (vocabSize < vocab.length || vocabSize >= SHIFT) {
      throw new RangeError(`BPE vocab size must be in [${vocab.length}, ${SHIFT}), got ${vocabSize}`);
    }
    const idOf = new Map(vocab.map((t, i) => [t, i]));
    const words = [...this.counts.keys()].map((w) => Array.from(w, (c) => idOf.get(c)!));
    const freq = [...this.counts.values()];
    const pairs = new Map<number, number>();
    const where = new Map<number, number[]>();
    const heap = new PairHeap();
    words.forEach((w, i) => {
      for (let j = 0; j + 1 < w.length; j++) {
        const k = key(w[j], w[j + 1]);
        pairs.set(k, (pairs.get(k) ?? 0) + freq[i]);
        addWhere(where, k, i);
      }
    });
    for (const [k, n] of pairs) heap.push(n, k);
    const merges: [string, string][] = [];
    const seen = new Int32Array(words.length).fill(-1);
    while (vocab.length < vocabSize && heap.size > 0) {
      const [count, k] = heap.pop();
      const current = pairs.get(k) ?? 0;
      if (current !== count) {
        if (current > 0 && current < count) heap.push(current, k); // stale entry of a pair that fell
        continue;
      }
      if (count < minFrequency) break;
      const a = Math.floor(k / SHIFT);
      const b = k % SHIFT;
      const c = vocab.length;
      vocab.push(vocab[a] + vocab[b]);
      merges.push([vocab[a], vocab[b]]);
      for (const wi of where.get(k) ?? []) {
        if (seen[wi] === c) continue; // a word is listed once per occurrence of the pair
        seen[wi] = c;
        const merged = mergeWord(words[wi], a, b, c);
        if (merged === words[wi]) continue;
        updatePairs(words[wi], merged, freq[wi], wi, c, pairs, where, heap);
        words[wi] = merged;
      }
      where.delete(k);
      pairs.delete(k);
    }
    return { vocab, merges, special };
  }
}

export function mergeWord(w: number[], a: number, b: number, c: number): number[] {
  let out: number[] | null = null;
  for (let i = 0; i < w.length; i++) {
    if (w[i] === a && w[i + 1] === b) {
      out ??= w.slice(0, i);
      out.push(c);
      i++;
    } else {
      out?.push(w[i]);
    }
  }
  return out ?? w;
}

function updatePairs(
  before: number[],
  after: number[],
  n: number,
  wi: number,
  c: number,
  pairs: Map<number, number>,
  where: Map<number, number[]>,
  heap: PairHeap,
): void {
  for (let j = 0; j + 1 < before.length; j++) {
    const k = key(before[j], before[j + 1]);
    pairs.set(k, (pairs.get(k) ?? 0) - n);
  }
  const grown = new Set<number>();
  for (let j = 0; j + 1 < after.length; j++) {
    const k = key(after[j], after[j + 1]);
    pairs.set(k, (pairs.get(k) ?? 0) + n);
    if (after[j] === c || after[j + 1] === c) {
      addWhere(where, k, wi);
      grown.add(k);
    }
  }
  for (const k of grown) heap.push(pairs.get(k)!, k);
}

function addWhere(where: Map<number, number[]>, k: number, wi: number): void {
  const list = where.get(k);
  if (list) list.push(wi);
  else where.set(k, [wi]);
}

/** Max-heap of (count, pair key); ties go to the smaller key, so training is deterministic. */
class PairHeap {
  private counts: number[] = [];
  private keys: number[] = [];

  get size(): number {
    return this.counts.length;
  }

  push(count: number, k: number): void {
    this.counts.push(count);
    this.keys.push(k);
    let i = this.counts.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.above(i, p)) break;
      this.swap(i, p);
      i = p;
    }
  }

  pop(): [number, number] {
    const top: [number, number] = [this.counts[0], this.keys[0]];
    const lastCount = this.counts.pop()!;
    const lastKey = this.keys.pop()!;
    if (this.counts.length > 0) {
      this.counts[0] = lastCount;
      this.keys[0] = lastKey;
      let i = 0;
      while (true) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < this.counts.length && this.above(l, m)) m = l;
        if (r < this.counts.length && this.above(r, m)) m = r;
        if (m === i) break;
        this.swap(i, m);
        i = m;
      }
    }
    return top;
  }

  private above(i: number, j: number): boolean {
    return (
      this.counts[i] > this.counts[j] || (this.counts[i] === this.counts[j] && this.keys[i] < this.keys[j])
    );
  }

  private swap(i: number, j: number): void {
    [this.counts[i], this.counts[j]] = [this.counts[j], this.counts[i]];
    [this.keys[i], this.keys[j]] = [this.keys[j], this.keys[i]];
  }
}
