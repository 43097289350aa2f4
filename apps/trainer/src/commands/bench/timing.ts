// What every benchmark shares: a median wall-clock timer, a device-op timer and the `key=value` row
// printed per result.
import type { Backend, Tensor } from "@moe8/tensor";

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

/** A backend that times the kernels of a run with device events (the cuda backend). */
interface KernelTimer {
  timeKernels(run: () => Promise<unknown>): Promise<{ spanMs: number }>;
}

/**
 * Median ms of one call of a device op. On a backend that times its kernels with device events
 * (cuda), the GPU time of each call from its first kernel's start to its last kernel's end, median
 * of 20 calls after `reps` warm-up calls: what PyTorch's CUDA-event timers measure (the baselines'
 * `time_it`), so that a ratio against them compares the same thing. Elsewhere over batches of
 * `reps` calls, each batch synchronised once: by reading one row of `sync` (one stream: it waits
 * for the batch), or without it one row of the op's last output (read as f32: outputs may be stored
 * as BF16).
 */
export async function deviceMs(b: Backend, op: () => Tensor, reps = 10, sync?: Tensor): Promise<number> {
  if ("timeKernels" in b) {
    const timer = b as unknown as KernelTimer;
    const one = () => timer.timeKernels(() => b.scope(async () => void op()));
    for (let i = 0; i < reps; i++) await one();
    const spans: number[] = [];
    for (let i = 0; i < 20; i++) spans.push((await one()).spanMs);
    return median(spans);
  }
  const batch = async () => {
    await b.scope(async () => {
      let y: Tensor | null = null;
      for (let i = 0; i < reps; i++) y = op();
      await b.sum(b.cast(b.rows(sync ?? y!, 0, 1), "f32")).item();
    });
  };
  await batch();
  const times: number[] = [];
  for (let i = 0; i < 5; i++) {
    const t = performance.now();
    await batch();
    times.push((performance.now() - t) / reps);
  }
  return median(times);
}
