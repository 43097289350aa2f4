// Elementwise ops, copies, casts and sums (elementwise.cu), and the operand conversions the other
// modules use: BF16 copies for kernels that read BF16, f32 copies for those that read f32.
import {
  BYTES_PER_ELEMENT,
  fromWordsLayout,
  type NoiseOptions,
  rowSpan,
  sameShape,
  type Tensor,
  type Words,
  type WordsKind,
  wordsLayout,
} from "@moe8/tensor";
import { type CudaContext, cdiv, KERNELS, type Operand, u8view } from "./context.ts";
import { rowMajorBuffer } from "./quant.ts";

export function add(cx: CudaContext, a: Tensor, b: Tensor): Tensor {
  sameShape(a, b, "add");
  const out = cx.make(a.shape, "f32");
  cx.launch(KERNELS.elementwise.add_f32, cx.g1(a.size), 256, {
    a: cx.f32p(a, "add"),
    b: cx.f32p(b, "add"),
    out: cx.p(out),
    n: a.size,
  });
  return out;
}

export function addInto(cx: CudaContext, dst: Tensor, src: Tensor, alpha: number): void {
  sameShape(dst, src, "addInto");
  cx.launch(KERNELS.elementwise.add_into_f32, cx.g1(dst.size), 256, {
    dst: cx.f32p(dst, "addInto"),
    src: cx.f32p(src, "addInto"),
    alpha,
    n: dst.size,
  });
}

export function scale(cx: CudaContext, a: Tensor, s: number): Tensor {
  const out = cx.make(a.shape, "f32");
  cx.launch(KERNELS.elementwise.scale_f32, cx.g1(a.size), 256, {
    x: cx.f32p(a, "scale"),
    out: cx.p(out),
    s,
    n: a.size,
  });
  return out;
}

export function fill(cx: CudaContext, t: Tensor, value: number): void {
  const b = cx.buf(t);
  if (t.dtype === "f32") {
    const v = new DataView(new ArrayBuffer(4));
    v.setFloat32(0, value, true);
    cx.n.cudaMemset32(b, 0, v.getUint32(0, true), t.size);
  } else if (t.dtype === "i32") {
    cx.n.cudaMemset32(b, 0, value >>> 0, t.size);
  } else if (t.dtype === "e4m3" || t.dtype === "e5m2") {
    cx.n.cudaMemset8(b, 0, value & 0xff, t.size);
  } else {
    // bf16 storage holds raw bits, as a Uint16Array fill would set them.
    const h = value & 0xffff;
    const host = new Uint16Array(t.size).fill(h);
    cx.n.cudaHtod(b, 0, u8view(host));
  }
}

/** The codes without their scales (rows() refuses quantised tensors); K-major ones row-major. */
export function copy(cx: CudaContext, t: Tensor): Tensor {
  const out = cx.make(t.shape, t.dtype);
  const src = cx.kMajor.has(t) ? rowMajorBuffer(cx, t) : null;
  cx.n.cudaDtod(cx.buf(out), 0, src ?? cx.buf(t), 0, t.size * BYTES_PER_ELEMENT[t.dtype]);
  src?.free();
  return out;
}

export function rows(cx: CudaContext, t: Tensor, start: number, count: number): Tensor {
  const w = rowSpan(t, start, count, "rows");
  const out = cx.make([count, ...t.shape.slice(1)], t.dtype);
  const e = BYTES_PER_ELEMENT[t.dtype];
  if (count > 0 && w > 0) cx.n.cudaDtod(cx.buf(out), 0, cx.buf(t), start * w * e, count * w * e);
  return out;
}

export function setRows(cx: CudaContext, dst: Tensor, start: number, src: Tensor): void {
  const w = rowSpan(dst, start, src.shape[0] ?? 0, "setRows");
  if (src.dtype !== dst.dtype || src.size !== (src.shape[0] ?? 0) * w)
    throw new Error(`setRows: ${src} does not fit rows of ${dst}`);
  const e = BYTES_PER_ELEMENT[dst.dtype];
  if (src.size > 0) cx.n.cudaDtod(cx.buf(dst), start * w * e, cx.buf(src), 0, src.size * e);
}

/** Backend.toWords: device copies of the bytes (as i32 words) and of the scales. */
export function toWords(cx: CudaContext, t: Tensor): Words {
  const { per, width } = wordsLayout(t);
  if (cx.kMajor.has(t)) throw new Error(`toWords: ${t} is stored K-major`);
  const words = cx.make([t.rows, width], "i32");
  if (words.size > 0) cx.n.cudaDtod(cx.buf(words), 0, cx.buf(t), 0, words.size * 4);
  if (!t.quant) return { words, scales: null };
  const scales = cx.make([t.rows, per], "f32");
  if (scales.size > 0) cx.n.cudaDtod(cx.buf(scales), 0, cx.buf(t.quant.scales), 0, scales.size * 4);
  return { words, scales };
}

/** Backend.fromWords: the inverse of toWords. */
export function fromWords(cx: CudaContext, words: Tensor, scales: Tensor | null, kind: WordsKind): Tensor {
  const { rows, cols, per } = fromWordsLayout(words, scales, kind);
  let out: Tensor;
  if (kind.dtype === "bf16") out = cx.make([rows, cols], "bf16");
  else {
    const s = cx.make([rows * per], "f32");
    if (s.size > 0) cx.n.cudaDtod(cx.buf(s), 0, cx.buf(scales!), 0, s.size * 4);
    out = cx.make([rows, cols], kind.dtype, { group: kind.group, format: kind.dtype, scales: s });
  }
  if (words.size > 0) cx.n.cudaDtod(cx.buf(out), 0, cx.buf(words), 0, words.size * 4);
  return out;
}

export function cast(cx: CudaContext, t: Tensor, dtype: "f32" | "bf16"): Tensor {
  if (t.dtype === dtype) return cx.backend.copy(t);
  if (t.dtype === "f32" && dtype === "bf16") {
    const out = cx.make(t.shape, "bf16");
    toBf16(cx, cx.p(t), cx.p(out), t.size);
    return out;
  }
  if (t.dtype === "bf16" && dtype === "f32") {
    const out = cx.make(t.shape, "f32");
    cx.launch(KERNELS.elementwise.bf16_to_f32, cx.g1(t.size), 256, { x: cx.p(t), out: cx.p(out), n: t.size });
    return out;
  }
  throw new Error(`cast: ${t.dtype} to ${dtype} is not supported (use quantize/dequantize for FP8)`);
}

/** n f32 values at x rounded to BF16 at out (four per thread when both are aligned for it). */
function toBf16(cx: CudaContext, x: number, out: number, n: number): void {
  const x4 = x % 16 === 0 && out % 8 === 0;
  const kernel = x4 ? KERNELS.elementwise.f32_to_bf16_x4 : KERNELS.elementwise.f32_to_bf16;
  cx.launch(kernel, cx.g1(x4 ? cdiv(n, 4) : n), 256, { x, out, n });
}

/**
 * BF16 values of an f32 or bf16 tensor for a kernel that reads BF16: a bf16 tensor itself, or a
 * copy in scratch memory. The caller calls free() once its kernels are enqueued.
 */
export function bf16Operand(cx: CudaContext, t: Tensor, op: string): Operand {
  if (t.dtype === "bf16") return { ptr: cx.p(t), free: () => {} };
  const buf = cx.scratch(t.size * 2);
  toBf16(cx, cx.f32p(t, op), buf.ptr, t.size);
  return buf;
}

/** f32 values of an f32 tensor, or of a bf16 one (a copy in scratch), for the f32-reading fallbacks. */
export function f32Operand(cx: CudaContext, t: Tensor, op: string): Operand {
  if (t.dtype !== "bf16") return { ptr: cx.f32p(t, op), free: () => {} };
  const buf = cx.scratch(t.size * 4);
  cx.launch(KERNELS.elementwise.bf16_to_f32, cx.g1(t.size), 256, { x: cx.p(t), out: buf.ptr, n: t.size });
  return buf;
}

/** Checks a bf16-precision GEMM or attention input: f32, or bf16 (already rounded). */
export function lowpInput(cx: CudaContext, t: Tensor, op: string): void {
  if (t.dtype !== "bf16") cx.f32p(t, op);
  else cx.buf(t);
}

export function sum(cx: CudaContext, t: Tensor): Tensor {
  const n = t.size;
  const out = cx.make([1], "f32");
  const parts = Math.max(1, Math.min(cdiv(n, 256 * 16), 1024));
  const chunk = Math.max(1, cdiv(n, parts));
  const tmp = cx.scratch(parts * 8);
  cx.launch(KERNELS.elementwise.sum_partial, [parts], 256, { x: cx.f32p(t, "sum"), part: tmp.ptr, n, chunk });
  cx.launch(KERNELS.elementwise.sum_final, [1], 256, { part: tmp.ptr, nparts: parts, out: cx.p(out) });
  tmp.free();
  return out;
}

/** Backend.addUniformNoise (add_uniform_noise: the reference's uniformNoise bits). */
export function addUniformNoise(cx: CudaContext, x: Tensor, o: NoiseOptions): void {
  if (x.shape.length !== 2) throw new Error(`addUniformNoise: x must be 2-D, got [${x.shape}]`);
  if (x.size === 0) return;
  const t = o.params?.table;
  if (t && !(t.shape.length === 2 && t.shape[1] === 2 && o.params!.row >= 0 && o.params!.row < t.shape[0]))
    throw new Error(`addUniformNoise: no row ${o.params!.row} in a noise table of shape [${t.shape}]`);
  cx.launch(KERNELS.elementwise.add_uniform_noise, cx.g1(x.size), 256, {
    x: cx.f32p(x, "addUniformNoise"),
    rows: x.rows,
    cols: x.cols,
    seed: o.seed >>> 0,
    rowOffset: o.rowOffset,
    scale: o.scale,
    // The table's row (i32 [rows, 2]) in place of seed and scale.
    params: o.params ? cx.i32p(o.params.table, "addUniformNoise") + 8 * o.params.row : 0,
  });
}
