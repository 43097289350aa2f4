// What every benchmark shares: a median wall-clock timer and the `key=value` row printed per result.

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

/** Median wall time of `fn` in ms after one warm-up run; stops early after `budgetMs`. */
export async function timeIt(fn: () => Promise<void> | void, reps: number, budgetMs = 4000): Promise<number> {
  await fn();
  const times: number[] = [];
  const start = performance.now();
  for (let i = 0; i < reps && (i < 3 || performance.now() - start < budgetMs); i++) {
    const t = performance.now();
    await fn();
    times.push(performance.now() - t);
  }
  return median(times);
}

/** One result as printed without --json: `key=value` pairs separated by two spaces. */
export function formatRow(row: object): string {
  return Object.entries(row)
    .map(([k, v]) => `${k}=${v}`)
    .join("  ");
}
