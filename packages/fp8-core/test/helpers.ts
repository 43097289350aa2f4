// Shared test helpers: a seeded generator (reproducible failures) and f32 bit utilities.

/** mulberry32: a small seeded PRNG; next() gives a uint32. */
export function rng(seed: number) {
  let s = seed >>> 0;
  const next = (): number => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
  const uniform = (): number => (next() + 0.5) / 2 ** 32;
  const normal = (): number => Math.sqrt(-2 * Math.log(uniform())) * Math.cos(2 * Math.PI * uniform());
  return { next, uniform, normal };
}

const f = new Float32Array(1);
const u = new Uint32Array(f.buffer);

export function bitsOf(x: number): number {
  f[0] = x;
  return u[0];
}

export function fromBits(bits: number): number {
  u[0] = bits;
  return f[0];
}

/** The next f32 above (toward +inf) a finite positive f32. */
export const nextUp = (x: number): number => fromBits(bitsOf(x) + 1);
/** The next f32 below a finite positive f32. */
export const nextDown = (x: number): number => fromBits(bitsOf(x) - 1);

export function randomNormal(n: number, seed: number, scale = 1): Float32Array {
  const r = rng(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = r.normal() * scale;
  return out;
}
