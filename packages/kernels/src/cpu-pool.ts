// The cpu backend's host memory: a pool of ArrayBuffers in size classes. Every tensor the backend
// makes takes its storage from here and gives it back when it is released (its arena ends, or
// `release()`/`dispose()`), so after the first step a training step reuses the buffers of the step
// before and asks the OS for nothing. Without it each op's output was a fresh zero-filled array:
// the first touch of every page is a minor fault and the freed memory went back to the OS, which on
// two cores cost a third of the step in the kernel (issue #20). The cuda backend's caching allocator
// (src/cuda/alloc.rs) does the same for device memory.
import { BYTES_PER_ELEMENT, type DType, type HostArray } from "@moe8/tensor";

/** What the pool has done since it was made: the counters a leak or churn test reads. */
export interface PoolStats {
  /** Buffers handed out from the free lists. */
  hits: number;
  /** Buffers that had to be allocated (new memory from the OS). */
  misses: number;
  /** Bytes of all the buffers ever allocated and still owned by the pool (in use or free). */
  ownedBytes: number;
  /** Bytes of the buffers waiting in the free lists. */
  freeBytes: number;
}

/** The smallest class: below it one class holds everything (a scalar costs 256 bytes, not a miss). */
const MIN_CLASS = 256;
/** Classes per power of two: a buffer is at most 25% larger than asked for. */
const CLASSES_PER_OCTAVE = 4;

/** The capacity in bytes of the buffer that holds `bytes` (a multiple of 64 above MIN_CLASS). */
export function sizeClass(bytes: number): number {
  if (bytes <= MIN_CLASS) return MIN_CLASS;
  let base = MIN_CLASS;
  while (base * 2 < bytes) base *= 2;
  const step = base / CLASSES_PER_OCTAVE;
  return base + Math.ceil((bytes - base) / step) * step;
}

function view(dtype: DType, buf: ArrayBuffer, n: number): HostArray {
  switch (dtype) {
    case "f32":
      return new Float32Array(buf, 0, n);
    case "bf16":
      return new Uint16Array(buf, 0, n);
    case "e4m3":
    case "e5m2":
      return new Uint8Array(buf, 0, n);
    case "i32":
      return new Int32Array(buf, 0, n);
  }
}

export class HostBufferPool {
  private readonly free = new Map<number, ArrayBuffer[]>();
  /** Buffers this pool made: only those are taken back. */
  private readonly owned = new WeakSet<ArrayBuffer>();
  /** Buffers in the free lists, so that giving one back twice cannot hand it out twice. */
  private readonly idle = new Set<ArrayBuffer>();
  private counts: PoolStats = { hits: 0, misses: 0, ownedBytes: 0, freeBytes: 0 };

  /**
   * An array of `n` elements of `dtype` at the start of a pooled buffer. Its contents are whatever
   * the buffer held last: `zeroed` clears them, `poison` fills them with 0xff bytes (NaN in f32)
   * so that an output a kernel leaves unwritten shows in the results. `capacity` (elements) sizes
   * the buffer for the largest array of a kind whose length varies from step to step, so that
   * every step's array fits the same class.
   */
  take(dtype: DType, n: number, init: "zeroed" | "poison" | "any", capacity = n): HostArray {
    const bytes = n * BYTES_PER_ELEMENT[dtype];
    const cls = sizeClass(Math.max(n, capacity) * BYTES_PER_ELEMENT[dtype]);
    let buf = this.free.get(cls)?.pop();
    if (buf) {
      this.idle.delete(buf);
      this.counts.hits++;
      this.counts.freeBytes -= cls;
      if (init === "zeroed") new Uint8Array(buf, 0, bytes).fill(0);
    } else {
      buf = new ArrayBuffer(cls);
      this.owned.add(buf);
      this.counts.misses++;
      this.counts.ownedBytes += cls;
    }
    if (init === "poison") new Uint8Array(buf, 0, bytes).fill(0xff);
    return view(dtype, buf, n);
  }

  /** Takes back the buffer behind `a` if it is one of this pool's (others are left to the GC). */
  give(a: HostArray): void {
    const buf = a.buffer as ArrayBuffer;
    if (!this.owned.has(buf) || this.idle.has(buf)) return;
    const list = this.free.get(buf.byteLength);
    if (list) list.push(buf);
    else this.free.set(buf.byteLength, [buf]);
    this.idle.add(buf);
    this.counts.freeBytes += buf.byteLength;
  }

  /** Drops the free buffers (the GC returns them to the OS); buffers in use stay owned. */
  trim(): void {
    for (const list of this.free.values())
      for (const buf of list) {
        this.idle.delete(buf);
        this.owned.delete(buf);
        this.counts.ownedBytes -= buf.byteLength;
      }
    this.free.clear();
    this.counts.freeBytes = 0;
  }

  stats(): PoolStats {
    return { ...this.counts };
  }
}
