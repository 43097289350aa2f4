// Reference GEMMs and quantisation for the ts backend, on top of @moe8/fp8-core.
// f32/bf16 products accumulate in f64 and round once (at least as accurate as an f32 accumulator);
// FP8 products follow the chunked promotion of docs/numerics.md through fp8-core's scaledMatmul.
import {
  dequantize as fp8Dequantize,
  quantize as fp8Quantize,
  type GemmLayout,
  roundBf16,
  scaledMatmul,
} from "@moe8/fp8-core";
import type { QuantizeOptions } from "../backend.ts";
import type { Tensor } from "../tensor.ts";
import { type Fp8Format, isFp8, type QuantGroup } from "../types.ts";

/** Matrices per tensor (leading dims beyond the last two) and the size of each. */
export function batchDims(t: Tensor): { batch: number; rows: number; cols: number } {
  const s = t.shape;
  const rows = s.length >= 2 ? s[s.length - 2] : 1;
  const cols = s.length >= 1 ? s[s.length - 1] : 1;
  return { batch: t.size / (rows * cols), rows, cols };
}

export function scaleCount(group: QuantGroup, rows: number, cols: number): number {
  const t = (n: number) => Math.ceil(n / 128);
  switch (group) {
    case "tile":
      return rows * t(cols);
    case "block":
      return t(rows) * t(cols);
    case "column-tile":
      return t(rows) * cols;
    case "row":
      return rows;
    case "tensor":
      return 1;
  }
}

/**
 * How a tensor's rows split into the matrices quantised on their own: `batch` stacked `rows` x
 * `cols` matrices, or with `segments` (E+1 row offsets) one matrix cut into each expert's rows.
 */
export interface HostLayout {
  batch: number;
  rows: number;
  cols: number;
  segments: Int32Array | null;
}

/** [first row, row count] of each matrix of the layout. */
function pieces({ batch, rows, segments }: HostLayout): [number, number][] {
  const out: [number, number][] = [];
  if (segments)
    for (let e = 0; e + 1 < segments.length; e++) out.push([segments[e], segments[e + 1] - segments[e]]);
  else for (let b = 0; b < batch; b++) out.push([b * rows, rows]);
  return out;
}

/** Quantises `x` matrix by matrix (over leading dims, or by segment for column tiles). */
export function quantizeHost(
  x: Float32Array,
  layout: HostLayout,
  opts: QuantizeOptions,
): { data: Uint8Array; scales: Float32Array } {
  const { cols } = layout;
  const format = opts.format ?? "e4m3";
  const q = (xs: Float32Array, r: number) =>
    fp8Quantize(xs, r, cols, {
      group: opts.group,
      format,
      pow2Scales: opts.pow2Scales,
      eps: opts.eps,
      unit: opts.unit,
    });
  if (layout.segments && (opts.group !== "column-tile" || layout.batch !== 1))
    throw new Error("quantize: segments need a 2-D column-tile");
  const data = new Uint8Array(x.length);
  const parts: Float32Array[] = [];
  for (const [r0, r] of pieces(layout)) {
    if (r === 0) continue;
    const res = q(x.subarray(r0 * cols, (r0 + r) * cols), r);
    data.set(res.data, r0 * cols);
    parts.push(res.scales);
  }
  const scales = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    scales.set(p, o);
    o += p.length;
  }
  return { data, scales };
}

/** FP8 codes and scales of a tensor quantised as `quantizeHost` does it, and how. */
export interface HostQuantized {
  data: Uint8Array;
  scales: Float32Array;
  group: QuantGroup;
  format: Fp8Format;
}

export function dequantizeHost(q: HostQuantized, layout: HostLayout): Float32Array {
  const { cols } = layout;
  const { data, scales, group, format } = q;
  const out = new Float32Array(data.length);
  let so = 0;
  for (const [r0, r] of pieces(layout)) {
    if (r === 0) continue;
    const n = scaleCount(group, r, cols);
    const d = fp8Dequantize(
      { data: data.subarray(r0 * cols, (r0 + r) * cols), scales: scales.subarray(so, so + n) },
      r,
      cols,
      { group, format },
    );
    out.set(d, r0 * cols);
    so += n;
  }
  return out;
}

/** C[M,N] = op(A) op(B) with f64 accumulation; `a`/`b` already rounded as the precision asks. */
export function gemmF32(
  a: Float32Array,
  b: Float32Array,
  c: Float32Array,
  { M, N, K }: { M: number; N: number; K: number },
  layout: GemmLayout,
): void {
  const transA = !!layout.transA;
  const transB = !!layout.transB;
  const acc = new Float64Array(N);
  for (let m = 0; m < M; m++) {
    acc.fill(0);
    for (let k = 0; k < K; k++) {
      const av = transA ? a[k * M + m] : a[m * K + k];
      if (av === 0) continue;
      if (transB) for (let n = 0; n < N; n++) acc[n] += av * b[n * K + k];
      else {
        const row = k * N;
        for (let n = 0; n < N; n++) acc[n] += av * b[row + n];
      }
    }
    for (let n = 0; n < N; n++) c[m * N + n] = acc[n];
  }
}

export interface Fp8Operand {
  data: Uint8Array;
  scales: Float32Array;
  rows: number;
  cols: number;
  group: QuantGroup;
  format: Fp8Format;
  trans: boolean;
}

export function gemmFp8(a: Fp8Operand, b: Fp8Operand, promotion: number): Float32Array {
  return scaledMatmul(a, b, { promotion });
}

export function roundInPlaceBf16(x: Float32Array): Float32Array {
  x.set(roundBf16(x));
  return x;
}

export function checkFp8(t: Tensor, what: string): void {
  if (!isFp8(t.dtype) || !t.quant)
    throw new Error(`matmul fp8: ${what} must be a quantised FP8 tensor, got ${t}`);
}
