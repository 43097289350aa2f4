// The error measure test tolerances are stated in. (The seeded Rng tests draw their data from lives
// in ../random.ts, since it also initialises model weights.)

/** max |a - b| / max(|b|_inf, floor): the error measure tolerances are stated in. */
export function relErr(a: ArrayLike<number>, b: ArrayLike<number>, floor = 1e-6): number {
  if (a.length !== b.length) throw new Error(`relErr: lengths ${a.length} and ${b.length}`);
  let d = 0;
  let m = floor;
  for (let i = 0; i < a.length; i++) {
    const e = Math.abs(a[i] - b[i]);
    if (!(e <= d)) d = Number.isNaN(e) ? Infinity : Math.max(d, e);
    m = Math.max(m, Math.abs(b[i]));
  }
  return d / m;
}
