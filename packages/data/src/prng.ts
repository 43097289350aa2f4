// xoshiro128** (Blackman & Vigna): fast, good quality, and its whole state is four uint32s, so it is
// saved in the data cursor as JSON and a resumed run draws exactly the same numbers.
export type RngState = [number, number, number, number];

export class Rng {
  private readonly s: Uint32Array;

  constructor(state: readonly number[]) {
    if (state.length !== 4 || state.every((x) => x === 0))
      throw new Error("Rng: state must be 4 uint32s, not all 0");
    this.s = Uint32Array.from(state);
  }

  /** Expands any integer seed into a full state with splitmix32, as the xoshiro authors advise. */
  static fromSeed(seed: number): Rng {
    let x = (seed >>> 0) ^ Math.imul(Math.floor(seed / 2 ** 32) >>> 0, 0x9e3779b1);
    const next = () => {
      x = (x + 0x9e3779b9) | 0;
      let z = x;
      z = Math.imul(z ^ (z >>> 16), 0x21f0aaad);
      z = Math.imul(z ^ (z >>> 15), 0x735a2d97);
      return (z ^ (z >>> 15)) >>> 0;
    };
    return new Rng([next(), next(), next(), next()]);
  }

  state(): RngState {
    return [this.s[0], this.s[1], this.s[2], this.s[3]];
  }

  nextU32(): number {
    const s = this.s;
    const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  }

  /** Uniform integer in [0, n); multiply-shift, whose bias is negligible for n far below 2^32. */
  below(n: number): number {
    return Math.floor((this.nextU32() / 2 ** 32) * n);
  }

  /** Fisher-Yates, in place. */
  shuffle(a: Int32Array): Int32Array {
    for (let i = a.length - 1; i > 0; i--) {
      const j = this.below(i + 1);
      const t = a[i];
      a[i] = a[j];
      a[j] = t;
    }
    return a;
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}
