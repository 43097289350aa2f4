// Dense layers' ops (nn.cu): RMSNorm, RoPE, head slicing and concatenation, SwiGLU, embeddings.
import {
  accumulateNorm,
  type HeadPart,
  type HeadSliceOptions,
  numel,
  type RmsnormAccumulate,
  type RopeOptions,
  swigluWidth,
  type Tensor,
} from "@moe8/tensor";
import { DEFINES } from "../cuda/kernels.generated.ts";
import { type CudaContext, cdiv, KERNELS } from "./context.ts";
import { f32Operand } from "./elementwise.ts";

export function rmsnorm(cx: CudaContext, x: Tensor, w: Tensor, eps: number) {
  const R = x.rows;
  const C = x.cols;
  const y = cx.make(x.shape, "f32");
  const rstd = cx.make([R], "f32");
  const xp = cx.f32p(x, "rmsnorm");
  const wp = cx.f32p(w, "rmsnorm");
  // Four columns a thread, kept in registers, when the rows are 16-byte aligned and fit 256 x 16.
  const vec4 = C % 4 === 0 && C <= 256 * 16 && xp % 16 === 0 && wp % 16 === 0 ? 1 : 0;
  if (R > 0)
    cx.launch(KERNELS.nn.rmsnorm_fwd, cx.rowsGrid(R), 256, {
      x: xp,
      w: wp,
      y: cx.p(y),
      rstd: cx.p(rstd),
      R,
      C,
      eps,
      vec4,
    });
  return { y, rstd };
}

/**
 * dx and dw; with accumulate, added into its tensors (the one-pass kernel adds dx as it writes it and
 * colsum_final adds dw, the f32 sums addInto makes; the two-pass path adds afterwards).
 */
export function rmsnormBackward(
  cx: CudaContext,
  dy: Tensor,
  x: Tensor,
  w: Tensor,
  rstd: Tensor,
  accumulate?: RmsnormAccumulate,
) {
  const R = x.rows;
  const C = x.cols;
  const ptrs = { dy: cx.f32p(dy, "rmsnormBackward"), x: cx.p(x), w: cx.p(w), rstd: cx.p(rstd) };
  // One pass for dx and dw's partial sums (RMS_ROWS = 128 rows a chunk) at the model's widths with
  // 16-byte aligned rows; two passes otherwise.
  const fused = C % 128 === 0 && C <= 1024 && [ptrs.dy, ptrs.x, ptrs.w].every((p) => p % 16 === 0);
  const target = (t: Tensor | undefined, shape: readonly number[], what: string) => {
    if (!t) return null;
    if (t.dtype !== "f32" || t.size !== numel(shape))
      throw new Error(`rmsnormBackward: accumulate.${what} must be f32 of shape [${shape}], got ${t}`);
    return t;
  };
  const dxInto = fused ? target(accumulate?.dx, x.shape, "dx") : null;
  const dwInto = target(accumulate?.dw, w.shape, "dw");
  const dx = dxInto ?? cx.make(x.shape, "f32");
  const dw = dwInto ?? cx.make(w.shape, "f32");
  const rowsPer = fused ? 128 : 256;
  const chunks = Math.max(1, cdiv(R, rowsPer));
  const part = cx.scratch(chunks * C * 8);
  if (fused && R > 0) {
    cx.launch(KERNELS.nn.rmsnorm_bwd_fused, [chunks], 256, {
      ...ptrs,
      dx: cx.p(dx),
      part: part.ptr,
      R,
      C,
      accum: dxInto ? 1 : 0,
    });
  } else {
    if (R > 0) cx.launch(KERNELS.nn.rmsnorm_bwd_dx, cx.rowsGrid(R), 256, { ...ptrs, dx: cx.p(dx), R, C });
    cx.launch(KERNELS.nn.rmsnorm_bwd_dw_partial, [cdiv(C, 256), chunks], 256, {
      dy: ptrs.dy,
      x: ptrs.x,
      rstd: ptrs.rstd,
      part: part.ptr,
      R,
      C,
      rowsPer,
    });
  }
  cx.launch(KERNELS.nn.colsum_final, [cdiv(C, 256)], 256, {
    part: part.ptr,
    out: cx.p(dw),
    chunks,
    C,
    accum: dwInto ? 1 : 0,
  });
  part.free();
  // The two-pass path adds dx afterwards, as the host backends do.
  return fused ? { dx, dw } : accumulateNorm(cx.backend, { dx, dw }, { dx: accumulate?.dx });
}

/**
 * The device address of the angles' cosines and sines for o's positions (rope_table), made once per
 * (seqLen, dim, start, theta) and kept; the inverse rotation negates the sines as it reads them.
 */
export function ropeTable(cx: CudaContext, o: RopeOptions): number {
  const { seqLen, dim, theta } = o;
  const half = Math.floor(dim / 2);
  const start = o.start ?? 0;
  return cx.kept(`rope/${seqLen}/${dim}/${start}/${theta}`, seqLen * half * 16, (cs) =>
    cx.launch(KERNELS.nn.rope_table, cx.g1(seqLen * half), 256, { cs, seqLen, half, dim, start, theta }),
  );
}

/** Whether RoPE's kernels may take four columns at once (no group of four straddles a pair or a head). */
export function ropeWide(o: RopeOptions): boolean {
  return o.width % 4 === 0 && o.offset % 4 === 0 && o.dim % 4 === 0;
}

export function rope(cx: CudaContext, x: Tensor, o: RopeOptions): Tensor {
  const R = x.rows;
  const y = cx.make(x.shape, o.storeBf16 ? "bf16" : "f32");
  const xp = cx.f32p(x, "rope");
  const { heads, width, offset, dim, seqLen } = o;
  if (R === 0) return y;
  const table = ropeTable(cx, o);
  const wide = ropeWide(o);
  cx.launch(
    wide ? KERNELS.nn.rope_rows4 : KERNELS.nn.rope_rows,
    cx.rowsGrid(R),
    rowBlock((heads * width) / (wide ? 4 : 1)),
    {
      x: xp,
      y: cx.p(y),
      cs: table,
      R,
      heads,
      width,
      offset,
      dim,
      seqLen,
      inverse: o.inverse ? 1 : 0,
      out16: o.storeBf16 ? 1 : 0,
    },
  );
  return y;
}

/** Threads for one block per row of n elements: whole warps, at most 256. */
function rowBlock(n: number): number {
  return Math.min(256, Math.max(32, Math.ceil(n / 32) * 32));
}

export function headSlice(cx: CudaContext, x: Tensor, o: HeadSliceOptions): Tensor {
  const R = x.rows;
  const outHeads = o.sumHeads ? 1 : o.heads;
  const y = cx.make([R, outHeads * o.len], o.storeBf16 ? "bf16" : "f32");
  if (R === 0) return y;
  // Four columns a thread when no group of four straddles a head.
  const wide = o.width % 4 === 0 && o.start % 4 === 0 && o.len % 4 === 0;
  const kernel = wide ? KERNELS.nn.head_slice4 : KERNELS.nn.head_slice;
  cx.launch(kernel, cx.rowsGrid(R), rowBlock((outHeads * o.len) / (wide ? 4 : 1)), {
    x: cx.f32p(x, "headSlice"),
    y: cx.p(y),
    R,
    heads: o.heads,
    width: o.width,
    start: o.start,
    len: o.len,
    sumHeads: o.sumHeads ? 1 : 0,
    out16: o.storeBf16 ? 1 : 0,
  });
  return y;
}

export function headScatterAdd(cx: CudaContext, dst: Tensor, src: Tensor, o: HeadSliceOptions): void {
  const R = dst.rows;
  if (R === 0) return;
  cx.launch(KERNELS.nn.head_scatter_add, cx.rowsGrid(R), rowBlock(o.heads * o.len), {
    dst: cx.f32p(dst, "headScatterAdd"),
    src: cx.f32p(src, "headScatterAdd"),
    R,
    heads: o.heads,
    width: o.width,
    start: o.start,
    len: o.len,
  });
}

/**
 * Where headConcat's output columns come from: each output head is a's `la` columns from `a0` of
 * its `aw`-wide head, then b's `lb` (its one head, or the same head); `wide` when no group of four
 * columns straddles a head or the a|b boundary (the four-column kernels).
 */
export function concatLayout(a: Tensor, b: Tensor, heads: number, bHeads: number, aPart?: HeadPart) {
  const la = aPart ? aPart.len : a.cols / heads;
  const lb = b.cols / bHeads;
  const aw = aPart ? aPart.width : la;
  const a0 = aPart ? aPart.start : 0;
  const wide = la % 4 === 0 && lb % 4 === 0 && aw % 4 === 0 && a0 % 4 === 0;
  return { heads, bHeads, la, lb, aw, a0, cols: heads * (la + lb), wide };
}

export function headConcat(
  cx: CudaContext,
  a: Tensor,
  b: Tensor,
  heads: number,
  bHeads: number,
  storeBf16: boolean,
  aPart?: HeadPart,
): Tensor {
  const { cols, wide, ...layout } = concatLayout(a, b, heads, bHeads, aPart);
  const R = a.rows;
  const y = cx.make([R, cols], storeBf16 ? "bf16" : "f32");
  if (R === 0) return y;
  // Four columns a thread when no group of four straddles a head or the a|b boundary.
  const kernel = wide ? KERNELS.nn.head_concat4 : KERNELS.nn.head_concat;
  cx.launch(kernel, cx.rowsGrid(R), rowBlock(cols / (wide ? 4 : 1)), {
    a: cx.f32p(a, "headConcat"),
    b: cx.f32p(b, "headConcat"),
    y: cx.p(y),
    R,
    ...layout,
    out16: storeBf16 ? 1 : 0,
  });
  return y;
}

/** gu's pointer and the kernel that reads its dtype (f32 values or BF16 codes). */
function packed(cx: CudaContext, gu: Tensor, op: string): { ptr: number; bf16: boolean } {
  if (gu.dtype === "bf16") return { ptr: cx.p(gu), bf16: true };
  return { ptr: cx.f32p(gu, op), bf16: false };
}

/** The swiglu kernels take four columns a thread when inter % 4 == 0. */
const swigluThreads = (n: number, inter: number) => (inter % 4 === 0 ? n / 4 : n);

export function swiglu(cx: CudaContext, gu: Tensor): Tensor {
  const inter = swigluWidth(gu, "swiglu");
  const h = cx.make([gu.rows, inter], "f32");
  const g = packed(cx, gu, "swiglu");
  cx.launch(
    g.bf16 ? KERNELS.nn.swiglu_fwd_bf16 : KERNELS.nn.swiglu_fwd_f32,
    cx.g1(swigluThreads(h.size, inter)),
    256,
    {
      gu: g.ptr,
      h: cx.p(h),
      rows: gu.rows,
      inter,
    },
  );
  return h;
}

export function swigluBackward(cx: CudaContext, dh: Tensor, gu: Tensor): Tensor {
  const inter = swigluWidth(gu, "swigluBackward", dh);
  const dgu = cx.make([gu.rows, 2 * inter], "f32");
  const g = packed(cx, gu, "swigluBackward");
  // dh as stored (f32, or BF16 beside a BF16 gate|up); a BF16 dh with an f32 gate|up goes through f32.
  const dh16 = dh.dtype === "bf16" && g.bf16;
  const d = dh16 ? { ptr: cx.p(dh), free: () => {} } : f32Operand(cx, dh, "swigluBackward");
  const kernel = dh16
    ? KERNELS.nn.swiglu_bwd_bf16_dh16
    : g.bf16
      ? KERNELS.nn.swiglu_bwd_bf16
      : KERNELS.nn.swiglu_bwd_f32;
  cx.launch(kernel, cx.g1(swigluThreads(dh.size, inter)), 256, {
    dh: d.ptr,
    gu: g.ptr,
    dgu: cx.p(dgu),
    rows: gu.rows,
    inter,
  });
  d.free();
  return dgu;
}

export function embedding(cx: CudaContext, w: Tensor, ids: Tensor): Tensor {
  const N = ids.size;
  const d = w.cols;
  const out = cx.make([N, d], "f32");
  cx.launch(KERNELS.nn.embedding_fwd, cx.g1(N * d), 256, {
    w: cx.f32p(w, "embedding"),
    ids: cx.i32p(ids, "embedding"),
    out: cx.p(out),
    N,
    V: w.rows,
    d,
    bad: 0, // null: an id outside [0, V) gives a zero row and is not reported
  });
  return out;
}

export function embeddingBackward(cx: CudaContext, dw: Tensor, dy: Tensor, ids: Tensor): void {
  const d = dw.cols;
  const V = dw.rows;
  // Slices of at most EMB_IDS ids: the kernel keeps a slice's rows of dw in shared memory.
  const slices = cdiv(V, DEFINES.nn.EMB_IDS);
  const threads = DEFINES.nn.EMB_THREADS;
  cx.launch(KERNELS.nn.embedding_bwd, [cdiv(d, threads), slices], threads, {
    dw: cx.f32p(dw, "embeddingBackward"),
    dy: cx.f32p(dy, "embeddingBackward"),
    ids: cx.i32p(ids, "embeddingBackward"),
    N: ids.size,
    V,
    d,
    slices,
  });
}
