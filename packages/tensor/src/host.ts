// Lifetimes for every backend: a registry of live tensors, a stack of per-step arenas and views that
// share storage, plus the plumbing host backends (ts, cpu) use. A device backend overrides
// register/freeStorage/read/write/upload/zeros and keeps the arena logic.
import { decodeBf16 } from "@moe8/fp8-core";
import type { Backend, BackendName, Words, WordsKind } from "./backend.ts";
import { type QuantInfo, Tensor } from "./tensor.ts";
import { scaleCount } from "./ts/linear.ts";
import { BYTES_PER_ELEMENT, type DType, type HostArray, hostArray, isFp8, numel } from "./types.ts";

/**
 * MOE8_POISON=1: a released host tensor's storage is overwritten (NaN, or all ones in integer
 * types), so that a use after release — harmless on the host, where the garbage collector keeps the
 * array alive, but a read of recycled memory on a device — changes results and fails the tests.
 */
function poisonReleased(): boolean {
  return (
    (globalThis as { process?: { env?: Record<string, string | undefined> } }).process?.env?.MOE8_POISON ===
    "1"
  );
}

export abstract class HostLifetimes {
  abstract readonly name: BackendName;
  private live = new Set<Tensor>();
  private liveBytes = 0;
  private peak = 0;
  private arenas: Set<Tensor>[] = [];
  private views = new WeakSet<Tensor>();

  protected wrap(
    data: HostArray,
    shape: readonly number[],
    dtype: DType,
    quant: QuantInfo | null = null,
  ): Tensor {
    if (data.length !== numel(shape)) throw new Error(`data of ${data.length} elements for shape [${shape}]`);
    return this.register(new Tensor(this as unknown as Backend, shape, dtype, data, quant));
  }

  /** Makes a new tensor live and owned by the current arena (device backends call this directly). */
  protected register(t: Tensor): Tensor {
    this.live.add(t);
    this.liveBytes += t.size * BYTES_PER_ELEMENT[t.dtype];
    if (this.liveBytes > this.peak) this.peak = this.liveBytes;
    this.arenas.at(-1)?.add(t);
    return t;
  }

  /** Frees a released tensor's storage; host storage is left to the garbage collector. */
  protected freeStorage(_t: Tensor): void {}

  protected alloc(shape: readonly number[], dtype: DType = "f32"): Tensor {
    return this.wrap(hostArray(dtype, numel(shape)), shape, dtype);
  }

  upload(data: HostArray, shape: readonly number[], dtype: DType = "f32"): Tensor {
    return this.wrap(data.slice() as HostArray, shape, dtype);
  }

  zeros(shape: readonly number[], dtype: DType = "f32"): Tensor {
    return this.alloc(shape, dtype);
  }

  rows(t: Tensor, start: number, count: number): Tensor {
    const w = rowSpan(t, start, count, "rows");
    return this.wrap(
      host(t).slice(start * w, (start + count) * w) as HostArray,
      [count, ...t.shape.slice(1)],
      t.dtype,
    );
  }

  setRows(dst: Tensor, start: number, src: Tensor): void {
    const w = rowSpan(dst, start, src.shape[0] ?? 0, "setRows");
    if (src.dtype !== dst.dtype || src.size !== (src.shape[0] ?? 0) * w)
      throw new Error(`setRows: ${src} does not fit rows of ${dst}`);
    host(dst).set(host(src) as never, start * w);
  }

  async read(t: Tensor): Promise<HostArray> {
    return (host(t) as HostArray).slice() as HostArray;
  }

  write(t: Tensor, data: HostArray): void {
    const dst = host(t);
    if (dst.length !== data.length || dst.constructor !== data.constructor)
      throw new Error(`write: ${data.constructor.name}(${data.length}) into ${t}`);
    dst.set(data as never);
  }

  release(t: Tensor): void {
    if (t.disposed || this.views.has(t)) return;
    t.disposed = true;
    if (this.live.delete(t)) this.liveBytes -= t.size * BYTES_PER_ELEMENT[t.dtype];
    t.quant?.scales.dispose();
    if (ArrayBuffer.isView(t.storage) && poisonReleased()) {
      const a = t.storage as HostArray;
      if (a instanceof Float32Array) a.fill(Number.NaN);
      else a.fill(-1 as never);
    }
    this.freeStorage(t);
    t.storage = null;
  }

  scope<T>(fn: () => T): T {
    const arena = new Set<Tensor>();
    this.arenas.push(arena);
    const end = () => {
      this.arenas.splice(this.arenas.lastIndexOf(arena), 1);
      for (const t of arena) this.release(t);
    };
    let result: T;
    try {
      result = fn();
    } catch (e) {
      end();
      throw e;
    }
    if (result instanceof Promise) return result.finally(end) as T;
    end();
    return result;
  }

  keep<T extends Tensor>(t: T): T {
    for (const a of this.arenas) a.delete(t);
    if (t.quant) this.keep(t.quant.scales);
    return t;
  }

  peakBytes(): number {
    return this.peak;
  }

  resetPeakBytes(): void {
    this.peak = this.liveBytes;
  }

  /** The live tensors, for memory profiles (not part of the Backend interface). */
  liveTensors(): Tensor[] {
    return [...this.live];
  }

  stats(): { tensors: number; bytes: number } {
    let bytes = 0;
    for (const t of this.live) bytes += t.size * BYTES_PER_ELEMENT[t.dtype];
    return { tensors: this.live.size, bytes };
  }

  toWords(t: Tensor): Words {
    const { per, width } = wordsLayout(t);
    const src = host(t);
    const bytes = new Uint8Array(src.buffer, src.byteOffset, src.byteLength).slice();
    return {
      words: this.wrap(new Int32Array(bytes.buffer), [t.rows, width], "i32"),
      scales: t.quant ? this.wrap(f32(t.quant.scales).slice(), [t.rows, per], "f32") : null,
    };
  }

  fromWords(words: Tensor, scales: Tensor | null, kind: WordsKind): Tensor {
    const { rows, cols, per } = fromWordsLayout(words, scales, kind);
    const w = i32(words);
    const bytes = new Uint8Array(w.buffer, w.byteOffset, w.byteLength).slice();
    if (kind.dtype === "bf16") return this.wrap(new Uint16Array(bytes.buffer), [rows, cols], "bf16");
    const s = this.wrap(f32(scales!).slice(), [rows * per], "f32");
    return this.wrap(bytes, [rows, cols], kind.dtype, { group: kind.group, format: kind.dtype, scales: s });
  }

  reshape(t: Tensor, shape: readonly number[]): Tensor {
    if (numel(shape) !== t.size) throw new Error(`reshape [${t.shape}] to [${shape}]: sizes differ`);
    const v = new Tensor(this as unknown as Backend, shape, t.dtype, t.storage, t.quant);
    this.views.add(v);
    return v;
  }
}

/** Elements per row (first dimension) of t, after checking rows [start, start + count) exist. */
export function rowSpan(t: Tensor, start: number, count: number, op: string): number {
  const n = t.shape[0] ?? 0;
  if (t.quant) throw new Error(`${op}: ${t} is quantised (its scales would not follow the rows)`);
  if (!(Number.isInteger(start) && Number.isInteger(count) && start >= 0 && count >= 0 && start + count <= n))
    throw new Error(`${op}: rows [${start}, ${start + count}) outside ${t}`);
  return n === 0 ? 0 : t.size / n;
}

/**
 * Scales per row of an FP8 matrix whose scales follow its rows (1x128 `tile`: ceil(cols/128);
 * `row`: 1), so that permuting rows permutes codes and scales alike (moePermute of a quantised
 * input); an error for any other layout.
 */
export function rowScales(t: Tensor, op: string): number {
  const q = t.quant;
  if (!q || t.shape.length !== 2 || q.segments || (q.group !== "tile" && q.group !== "row"))
    throw new Error(
      `${op}: ${t} is not a 2-D FP8 matrix of 1x128 tiles or rows (other scales do not follow its rows)`,
    );
  return scaleCount(q.group, 1, t.cols);
}

/**
 * toWords' checks: a 2-D BF16 matrix, or an FP8 one whose scales follow its rows, whose rows are
 * whole 4-byte words; its scales per row (0 for BF16) and words per row.
 */
export function wordsLayout(t: Tensor): { per: number; width: number } {
  const e = BYTES_PER_ELEMENT[t.dtype];
  const kind = t.dtype === "bf16" || (isFp8(t.dtype) && t.quant);
  if (!kind || t.shape.length !== 2 || (t.cols * e) % 4 !== 0)
    throw new Error(`toWords: ${t} is not a 2-D BF16 or FP8 matrix whose rows are whole 4-byte words`);
  return { per: t.quant ? rowScales(t, "toWords") : 0, width: (t.cols * e) / 4 };
}

/** fromWords' checks: the rows, columns and scales per row of what `words` holds. */
export function fromWordsLayout(
  words: Tensor,
  scales: Tensor | null,
  kind: WordsKind,
): { rows: number; cols: number; per: number } {
  if (words.dtype !== "i32" || words.shape.length !== 2)
    throw new Error(`fromWords: ${words} is not an i32 matrix of words`);
  const rows = words.rows;
  const cols = (words.cols * 4) / BYTES_PER_ELEMENT[kind.dtype];
  if (kind.dtype === "bf16") {
    if (scales) throw new Error("fromWords: BF16 words come without scales");
    return { rows, cols, per: 0 };
  }
  const per = scaleCount(kind.group, 1, cols);
  if (scales?.dtype !== "f32" || scales.size !== rows * per)
    throw new Error(
      `fromWords: ${rows} rows of ${cols} FP8 codes need ${rows * per} f32 scales, got ${scales}`,
    );
  return { rows, cols, per };
}

/** The typed array behind a host tensor, checked for use after dispose. */
export function host(t: Tensor): HostArray {
  if (t.disposed || t.storage == null) throw new Error(`use of a disposed tensor ${t}`);
  return t.storage as HostArray;
}

export function f32(t: Tensor): Float32Array {
  host(t);
  if (t.dtype !== "f32") throw new Error(`expected an f32 tensor, got ${t}`);
  return host(t) as Float32Array;
}

/**
 * The values of an f32 tensor, or of a bf16 one decoded to f32 (a copy): what the ops that round
 * their inputs to BF16 read, since rounding a BF16 value again leaves it unchanged.
 */
export function f32OrBf16(t: Tensor): Float32Array {
  if (t.dtype === "bf16") return decodeBf16(host(t) as Uint16Array);
  return f32(t);
}

export function i32(t: Tensor): Int32Array {
  host(t);
  if (t.dtype !== "i32") throw new Error(`expected an i32 tensor, got ${t}`);
  return host(t) as Int32Array;
}

export function u8(t: Tensor): Uint8Array {
  return host(t) as Uint8Array;
}

export function sameShape(a: Tensor, b: Tensor, op: string): void {
  if (a.size !== b.size || a.cols !== b.cols)
    throw new Error(`${op}: shapes [${a.shape}] and [${b.shape}] differ`);
}

/**
 * The width `inter` of a packed gate|up tensor [rows, 2 inter] (every backend's swiglu checks it the
 * same way), and that dh, when given, is [rows, inter].
 */
export function swigluWidth(gu: Tensor, op: string, dh?: Tensor): number {
  if (gu.dtype !== "f32" && gu.dtype !== "bf16")
    throw new Error(`${op}: gate|up must be f32 or bf16, got ${gu}`);
  if (gu.cols % 2 !== 0) throw new Error(`${op}: gate|up has ${gu.cols} columns, want an even number`);
  const inter = gu.cols / 2;
  if (dh && dh.dtype !== "f32" && dh.dtype !== "bf16")
    throw new Error(`${op}: dh must be f32 or bf16, got ${dh}`);
  if (dh && (dh.rows !== gu.rows || dh.cols !== inter))
    throw new Error(
      `${op}: dh has shape [${dh.shape}], want [${gu.rows}, ${inter}] for gate|up [${gu.shape}]`,
    );
  return inter;
}
