// FP8 quantisation, requantisation and dequantisation (quant.cu), and the FP8 code transpose the
// GEMMs use. Group layouts and codes: docs/numerics.md; the codes passed to the kernels are
// common.cuh's (G_*, FMT_*, SCALE_*), read from the generated table.
import {
  batchDims,
  type Fp8Format,
  type HeadPart,
  isFp8,
  type QuantGroup,
  type QuantizeOptions,
  type RopeOptions,
  requantizeViaF32,
  scaleCount,
  swigluWidth,
  type Tensor,
} from "@moe8/tensor";
import type { DeviceBuffer } from "../../native.d.cts";
import { DEFINES } from "../cuda/kernels.generated.ts";
import { type CudaContext, cdiv, KERNELS, type Operand } from "./context.ts";
import { concatLayout, ropeTable, ropeWide } from "./nn.ts";

const C = DEFINES.common;

/** The kernels' quantisation group codes. */
export const GROUP: Record<QuantGroup, number> = {
  tile: C.G_TILE,
  block: C.G_BLOCK,
  "column-tile": C.G_COLTILE,
  row: C.G_ROW,
  tensor: C.G_TENSOR,
};

/** The kernels' FP8 format codes. */
export const FMT: Record<Fp8Format, number> = { e4m3: C.FMT_E4M3, e5m2: C.FMT_E5M2 };

/** The FP8 tensor (codes and scales, zeroed where segments leave gaps) quantize(x, opts) fills. */
export function quantOutput(cx: CudaContext, shape: readonly number[], opts: QuantizeOptions) {
  const rows = shape.length >= 2 ? shape[shape.length - 2] : 1;
  const cols = shape.length >= 1 ? shape[shape.length - 1] : 1;
  const batch = rows * cols === 0 ? 1 : shape.reduce((a, b) => a * b, 1) / (rows * cols);
  const format: Fp8Format = opts.format ?? "e4m3";
  if (!(format in FMT)) throw new Error(`unknown FP8 format "${format}" (allowed: e4m3, e5m2)`);
  if (!(opts.group in GROUP)) throw new Error(`unknown quantisation group "${opts.group}"`);
  const fmt = FMT[format];
  const mode = opts.unit ? C.SCALE_UNIT : opts.pow2Scales ? C.SCALE_POW2 : C.SCALE_AMAX;
  const eps = Math.fround(opts.eps ?? 1e-12);
  if (!opts.unit && !(eps > 0 && Number.isFinite(eps)))
    throw new Error(`quantize: eps must be a positive finite f32 (got ${opts.eps})`);
  const seg = opts.segments;
  let nScales: number;
  if (seg) {
    if (opts.group !== "column-tile" || batch !== 1)
      throw new Error("quantize: segments need a 2-D column-tile");
    const E = seg.size - 1;
    nScales = (cdiv(rows, 128) + E) * cols; // capacity: the exact count depends on device data
  } else {
    nScales = batch * scaleCount(opts.group, rows, cols);
  }
  // Weights (block groups) on tensor-core contexts carry their transpose for the Dgrad.
  const withT =
    cx.useTensorCores && opts.group === "block" && rows % 16 === 0 && cols % 16 === 0 && rows * cols > 0;
  const scales = withT ? cx.makeWithRoom([nScales], "f32", 8 * nScales) : cx.make([nScales], "f32");
  const quant = { group: opts.group, format, scales, segments: seg };
  const pitch = kMajorPitch(cx, opts.group, format, batch, rows, cols, seg);
  const n = batch * rows * cols;
  const q = pitch
    ? cx.makeKMajor(rows, cols, pitch, quant)
    : withT
      ? cx.makeWithRoom(shape, format, 2 * n, quant)
      : cx.make(shape, format, quant);
  if (withT) cx.blockTransposed.add(q);
  if (seg) {
    cx.segScales.set(scales, { segments: seg, cols });
    cx.n.cudaMemset8(cx.buf(scales), 0, 0, nScales * 4);
    // Rows outside every segment read as zero codes (the K-major layout has no such rows).
    if (!pitch) cx.n.cudaMemset8(cx.buf(q), 0, 0, q.size);
  }
  return { q, batch, rows, cols, fmt, mode, eps };
}

/**
 * The chunk pitch when a column-tile quantisation is stored K-major ([cols, pitch]: each column's
 * 128-token chunks contiguous, each segment's tokens padded to whole chunks, as gemm_sm90.cu's Wgrad
 * loads them with TMA; no transpose before it), or 0 for the logical row-major layout. K-major only
 * on sm_90 with the sm90 GEMMs (CudaContext.kMajorColTiles) and for what that Wgrad takes: one E4M3
 * matrix, cols % 16 == 0, at most SM90_MAX_E segments.
 */
function kMajorPitch(
  cx: CudaContext,
  group: QuantGroup,
  format: Fp8Format,
  batch: number,
  rows: number,
  cols: number,
  seg: Tensor | undefined,
): number {
  if (!cx.kMajorColTiles || group !== "column-tile" || format !== "e4m3" || batch !== 1) return 0;
  const E = seg ? seg.size - 1 : 0;
  if (rows === 0 || cols === 0 || cols % 16 !== 0 || E > DEFINES.gemm_sm90.SM90_MAX_E) return 0;
  return (cdiv(rows, 128) + E) * 128;
}

/**
 * The row-major codes [rows, cols] of a K-major column-tile matrix, in scratch the caller frees
 * (coltile_kmajor_rows; rows outside every segment zero).
 */
export function rowMajorBuffer(cx: CudaContext, t: Tensor): DeviceBuffer {
  const km = cx.kMajor.get(t);
  if (!km) throw new Error(`rowMajorBuffer: ${t} is not stored K-major`);
  const out = cx.scratch(t.size);
  const seg = t.quant!.segments;
  if (seg) cx.n.cudaMemset8(out, 0, 0, t.size);
  const d = colTileTarget(cx, t, 1);
  if (d)
    cx.launch(KERNELS.quant.coltile_kmajor_rows, d.grid, 256, {
      kq: d.q,
      q: out.ptr,
      seg: d.seg,
      nseg: d.nseg,
      rows: d.rows,
      cols: d.cols,
      kpitch: km.pitch,
    });
  return out;
}

/**
 * An FP8 tensor's codes in its logical (row-major) layout: its own storage, or for a K-major
 * column-tile matrix a converted copy (the consumers other than the sm90 Wgrad: the tiled GEMMs,
 * dequantize, fp8Flow, requantize, read). free() after the launches that read it.
 */
export function rowMajorCodes(cx: CudaContext, t: Tensor): Operand {
  if (!cx.kMajor.has(t)) return { ptr: cx.p(t), free: () => {} };
  const b = rowMajorBuffer(cx, t);
  return { ptr: b.ptr, free: () => b.free() };
}

export function quantize(cx: CudaContext, x: Tensor, opts: QuantizeOptions): Tensor {
  const xp = cx.f32p(x, "quantize");
  const { q, batch, rows, cols, fmt, mode, eps } = quantOutput(cx, x.shape, opts);
  if (x.size === 0) return q;
  const scales = q.quant!.scales;
  const R = batch * rows;
  const sp = cx.p(scales);
  const qp = opts.group === "column-tile" ? 0 : cx.p(q); // column tiles: colTileTarget's pointer
  switch (opts.group) {
    case "tile":
    case "row": {
      const gw = opts.group === "tile" ? 128 : cols;
      if (gw === 128) {
        // TILE_LANES threads per tile, 256 a block.
        const tiles = R * cdiv(cols, 128);
        cx.launch(
          KERNELS.quant.quant_tile128,
          [Math.max(1, cdiv(tiles, 256 / DEFINES.quant.TILE_LANES))],
          256,
          {
            x: xp,
            q: qp,
            scales: sp,
            R,
            C: cols,
            fmt,
            mode,
            eps,
          },
        );
        break;
      }
      const yz = C.GRID_YZ_MAX;
      cx.launch(KERNELS.quant.quant_rowgroups, [cdiv(cols, gw), Math.min(R, yz), cdiv(R, yz)], 128, {
        x: xp,
        q: qp,
        scales: sp,
        R,
        C: cols,
        gw,
        fmt,
        mode,
        eps,
      });
      break;
    }
    case "block": {
      const withT = cx.blockTransposed.has(q);
      cx.launch(KERNELS.quant.quant_block, [cdiv(cols, 128), cdiv(rows, 128), batch], 256, {
        x: xp,
        q: qp,
        scales: sp,
        rows,
        cols,
        fmt,
        mode,
        eps,
        qt: withT ? qp + q.size : 0,
        st: withT ? sp + scales.size * 4 : 0,
      });
      break;
    }
    case "column-tile": {
      const d = colTileTarget(cx, q, batch);
      if (d)
        cx.launch(KERNELS.quant.quant_coltile, d.grid, 256, {
          x: xp,
          q: d.q,
          scales: d.scales,
          seg: d.seg,
          nseg: d.nseg,
          rows: d.rows,
          cols: d.cols,
          fmt,
          mode,
          eps,
          kpitch: d.kpitch,
        });
      break;
    }
    case "tensor": {
      const per = rows * cols;
      const amax = cx.scratch(batch * 4);
      cx.n.cudaMemset32(amax, 0, 0, batch);
      const gx = Math.max(1, Math.min(cdiv(per, 256), 1024));
      cx.launch(KERNELS.quant.quant_tensor_amax, [gx, batch], 256, { x: xp, amax: amax.ptr, n: per });
      cx.launch(KERNELS.quant.quant_tensor_encode, [gx, batch], 256, {
        x: xp,
        q: qp,
        amax: amax.ptr,
        scales: sp,
        n: per,
        fmt,
        mode,
        eps,
      });
      amax.free();
      break;
    }
  }
  return q;
}

/**
 * Where quant_coltile or requant_coltile writes column tiles of q, restarted at each matrix of the
 * batch or at each segment of q.quant.segments, and their grid; null when there is nothing to write.
 */
function colTileTarget(cx: CudaContext, q: Tensor, batch: number) {
  const { rows, cols } = batchDims(q);
  const seg = q.quant!.segments;
  const pieces = seg ? seg.size - 1 : batch;
  const segp = seg ? cx.i32p(seg, "quantize segments") : 0;
  if (pieces === 0) return null;
  // CT_COLS columns of one 128-row group per block.
  const ct = DEFINES.quant.CT_COLS;
  const grid: [number, number, number] = seg
    ? [cdiv(cols, ct), cdiv(batch * rows, 128) + pieces, 1]
    : [cdiv(cols, ct), cdiv(rows, 128), pieces];
  const kpitch = cx.kMajor.get(q)?.pitch ?? 0;
  return {
    grid,
    q: cx.kMajorBuf(q).ptr,
    scales: cx.p(q.quant!.scales),
    seg: segp,
    nseg: pieces,
    rows,
    cols,
    kpitch,
  };
}

/**
 * quantize(dequantize(q), opts) bit for bit. Column tiles of a 2-D FP8 matrix (the Wgrad operand
 * made from the forward's FP8 activation cache) take one kernel that never writes the f32 values.
 */
export function requantize(cx: CudaContext, q: Tensor, opts: QuantizeOptions): Tensor {
  if (!isFp8(q.dtype) || !q.quant) throw new Error(`requantize: ${q} is not an FP8 tensor`);
  const { batch } = batchDims(q);
  if (opts.group !== "column-tile" || batch !== 1 || q.quant.segments || q.size === 0)
    return requantizeViaF32(cx.backend, q, opts);
  const { q: out, fmt, mode, eps } = quantOutput(cx, q.shape, opts);
  const src = q.quant;
  const d = colTileTarget(cx, out, 1);
  const xq = rowMajorCodes(cx, q);
  if (d) {
    const args = {
      xq: xq.ptr,
      xs: cx.p(src.scales),
      xfmt: FMT[src.format],
      q: d.q,
      scales: d.scales,
      seg: d.seg,
      nseg: d.nseg,
      rows: d.rows,
      cols: d.cols,
      fmt,
      mode,
      eps,
      kpitch: d.kpitch,
    };
    // The model's case, a 1x128-tile cache into K-major column tiles: 128 columns a block.
    if (d.kpitch > 0 && src.group === "tile" && d.cols % 128 === 0)
      cx.launch(KERNELS.quant.requant_tile_kmajor, [d.cols / 128, d.grid[1], d.grid[2]], 256, args);
    else cx.launch(KERNELS.quant.requant_coltile, d.grid, 256, { ...args, xgroup: GROUP[src.group] });
  }
  xq.free();
  return out;
}

export function fp8Flow(cx: CudaContext, x: Tensor, q: Tensor): Tensor {
  if (!isFp8(q.dtype) || !q.quant) throw new Error(`fp8Flow: ${q} is not an FP8 tensor`);
  const deq = cx.backend.dequantize(q);
  const out = cx.backend.zeros([2], "f32");
  const n = q.size;
  const codes = rowMajorCodes(cx, q);
  cx.launch(KERNELS.quant.fp8_flow, cx.g1(n), 256, {
    x: cx.f32p(x, "fp8Flow"),
    q: codes.ptr,
    deq: cx.p(deq),
    counts: cx.p(out),
    fmt: FMT[q.quant.format],
    n,
  });
  codes.free();
  cx.release(deq);
  return out;
}

export function dequantize(cx: CudaContext, q: Tensor): Tensor {
  if (!isFp8(q.dtype) || !q.quant) throw new Error(`dequantize: ${q} is not an FP8 tensor`);
  const { batch, rows, cols } = batchDims(q);
  const out = cx.make(q.shape, "f32");
  const seg = q.quant.segments;
  // One block per row, at most 65535 blocks (the kernel strides over the rest).
  const codes = rowMajorCodes(cx, q);
  cx.launch(KERNELS.quant.dequant_rows, [Math.max(1, Math.min(batch * rows, 65535))], 256, {
    q: codes.ptr,
    scales: cx.p(q.quant.scales),
    out: cx.p(out),
    seg: seg ? cx.p(seg) : 0,
    nseg: seg ? seg.size - 1 : 0,
    batch,
    rows,
    cols,
    group: GROUP[q.quant.group],
    fmt: FMT[q.quant.format],
  });
  codes.free();
  return out;
}

/** FP8 codes [rows, cols] (`batch` matrices) -> [cols, rows] into dst, a scratch buffer; returns dst. */
/**
 * The Dgrad's weight operand, W^T's codes and block scales for the FP8 weight t ([batch][rows][cols]
 * as codes at `codes`, scales at `scales`): what quant_block wrote beside t (blockTransposed), or a
 * transpose made now (transposedWeight). free() after the launches that read it.
 */
export function transposedOf(
  cx: CudaContext,
  t: Tensor,
  codes: number,
  scales: number,
  rows: number,
  cols: number,
  batch = 1,
): { codes: number; scales: number; free: () => void } {
  if (cx.blockTransposed.has(t) && t.size === batch * rows * cols)
    return {
      codes: cx.p(t) + t.size,
      scales: cx.p(t.quant!.scales) + t.quant!.scales.size * 4,
      free: () => {},
    };
  return transposedWeight(cx, codes, scales, rows, cols, batch);
}

/**
 * Each of `batch` block-quantised FP8 weights [rows, cols] transposed to [cols, rows], codes and
 * 128x128 block scales together (exact), into scratch: the K-contiguous B operand of a Dgrad.
 */
export function transposedWeight(
  cx: CudaContext,
  codes: number,
  scales: number,
  rows: number,
  cols: number,
  batch = 1,
): { codes: number; scales: number; free: () => void } {
  const [rb, cb] = [cdiv(rows, 128), cdiv(cols, 128)];
  const c = cx.scratch(batch * rows * cols);
  const s = cx.scratch(batch * rb * cb * 4);
  if (tiles64(codes, rows, cols, batch)) {
    // Codes and scales in one launch.
    cx.launch(KERNELS.quant.transpose_u8_64, [cols / 64, rows / 64, batch], 256, {
      x: codes,
      out: c.ptr,
      s: scales,
      sout: s.ptr,
      rows,
      cols,
    });
  } else {
    transposeCodes(cx, codes, rows, cols, c.ptr, batch);
    cx.launch(KERNELS.elementwise.transpose_f32_batched, cx.g1(batch * rb * cb), 256, {
      x: scales,
      out: s.ptr,
      R: rb,
      C: cb,
      batch,
    });
  }
  return {
    codes: c.ptr,
    scales: s.ptr,
    free: () => {
      c.free();
      s.free();
    },
  };
}

/** Whether transpose_u8_64 takes these codes: whole 64 x 64 tiles, 16-byte aligned. */
function tiles64(src: number, rows: number, cols: number, batch: number): boolean {
  return rows > 0 && cols > 0 && batch > 0 && rows % 64 === 0 && cols % 64 === 0 && src % 16 === 0;
}

export function transposeCodes(
  cx: CudaContext,
  src: number,
  rows: number,
  cols: number,
  dst: number,
  batch = 1,
) {
  if (tiles64(src, rows, cols, batch) && dst % 16 === 0) {
    cx.launch(KERNELS.quant.transpose_u8_64, [cols / 64, rows / 64, batch], 256, {
      x: src,
      out: dst,
      s: 0,
      sout: 0,
      rows,
      cols,
    });
    return dst;
  }
  cx.launch(KERNELS.quant.transpose_u8_tiled, [cdiv(cols, 32), cdiv(rows, 32), batch], 256, {
    x: src,
    out: dst,
    rows,
    cols,
  });
  return dst;
}

/** The arguments every producer's one-pass quantiser takes after its own (tiles_cols in quant.cu). */
interface TilesColsArgs {
  tq: number;
  ts: number;
  q: number;
  scales: number;
  seg: number;
  nseg: number;
  rows: number;
  cols: number;
  fmt: number;
  mode: number;
  eps: number;
  kpitch: number;
}

/**
 * The two quantised copies a producer hands the next Linear's backward (1x128 tiles for its
 * Dgrad, column tiles for its Wgrad), made by the producer's one kernel (tiles_cols in quant.cu),
 * launched with the column-tile grid of 128 columns a block: `launch(blocksPerRowGroup, args)`.
 * The producers take cols % 128 == 0.
 */
function producerQuantized(
  cx: CudaContext,
  shape: readonly number[],
  g: { dgrad: QuantizeOptions; wgrad: QuantizeOptions },
  launch: (grid: readonly [number, number, number], t: TilesColsArgs) => void,
): { dgrad: Tensor; wgrad: Tensor } {
  const tiles = quantOutput(cx, shape, g.dgrad);
  const cols = quantOutput(cx, shape, g.wgrad);
  if (shape[0] === 0) return { dgrad: tiles.q, wgrad: cols.q };
  const t = colTileTarget(cx, cols.q, 1);
  // Every row's tiles are written by the block of its column-tile group: segments must cover them.
  if (!t) throw new Error(`quantised producer: the column tiles' segments hold no rows of ${shape[0]}`);
  const { grid, ...target } = t;
  launch([t.cols / 128, grid[1], grid[2]], {
    tq: cx.p(tiles.q),
    ts: cx.p(tiles.q.quant!.scales),
    ...target,
    fmt: cols.fmt,
    mode: cols.mode,
    eps: cols.eps,
  });
  return { dgrad: tiles.q, wgrad: cols.q };
}

/** Whether g is the pair the fused producers make: 1x128 tiles, and column tiles (any segments). */
function tilesAndColumns(g: { dgrad: QuantizeOptions; wgrad: QuantizeOptions }): boolean {
  return g.dgrad.group === "tile" && !g.dgrad.segments && g.wgrad.group === "column-tile";
}

/**
 * tilesAndColumns, with the two copies' format and scaling the same, as the one-pass producers
 * (one kernel writing both) need, and amax or unit scales (power-of-two scales take the f32 path:
 * see quant_mul4 in quant.cu).
 */
function onePass(g: { dgrad: QuantizeOptions; wgrad: QuantizeOptions }): boolean {
  const same = (k: "format" | "eps" | "unit") => (g.dgrad[k] ?? null) === (g.wgrad[k] ?? null);
  const pow2 = g.dgrad.pow2Scales || g.wgrad.pow2Scales;
  return tilesAndColumns(g) && same("format") && same("eps") && same("unit") && !pow2;
}

/**
 * Backend.moeCombineBackwardQuantized in two kernels that never store d(ys) in f32: dweights with
 * d(ys)'s 1x128 tiles (combine_grad_tile128, a warp per row, as combine_bwd), then its column tiles
 * (combine_grad_coltile, quant_coltile's layout: K-major on sm_90), each reading the products
 * w[slot[r]] dy[slot[r] / k] in place. null for the layouts it does not take (the caller quantises an
 * f32 d(ys) instead): Dgrad's tiles need d % 128 == 0, Wgrad's group must be column tiles. (The other
 * producers' one-pass form was slower here, 5.8 ms against 3.2 a small step on the H200: a block
 * must walk all of a row's chunks for dweights to sum in combine_bwd's order, and at 186 registers
 * one block an SM kept too few loads in flight; notes/step.md.)
 */
export function combineGradQuantized(
  cx: CudaContext,
  dy: Tensor,
  ys: Tensor,
  slot: Tensor,
  weights: Tensor,
  g: { dgrad: QuantizeOptions; wgrad: QuantizeOptions },
): { dweights: Tensor; dgrad: Tensor; wgrad: Tensor } | null {
  const rows = slot.size;
  const k = weights.cols;
  if (!tilesAndColumns(g) || ys.cols % 128 !== 0 || ys.shape.length !== 2 || ys.rows !== rows) return null;
  const ys16 = ys.dtype === "bf16";
  const op = "moeCombineBackwardQuantized";
  const [dyp, slotp, wp] = [cx.f32p(dy, op), cx.i32p(slot, op), cx.f32p(weights, op)];
  const ysp = ys16 ? cx.p(ys) : cx.f32p(ys, op);
  const dweights = cx.make(weights.shape, "f32");
  const tiles = quantOutput(cx, ys.shape, g.dgrad);
  const cols = quantOutput(cx, ys.shape, g.wgrad);
  if (rows === 0) return { dweights, dgrad: tiles.q, wgrad: cols.q };
  // One warp per row: 8 rows per block of 256 threads.
  cx.launch(
    ys16 ? KERNELS.quant.combine_grad_tile128_ys16 : KERNELS.quant.combine_grad_tile128,
    [cdiv(rows, 8)],
    256,
    {
      dy: dyp,
      ys: ysp,
      slot: slotp,
      w: wp,
      dweights: cx.p(dweights),
      q: cx.p(tiles.q),
      scales: cx.p(tiles.q.quant!.scales),
      rows,
      k,
      d: ys.cols,
      fmt: tiles.fmt,
      mode: tiles.mode,
      eps: tiles.eps,
    },
  );
  const t = colTileTarget(cx, cols.q, 1);
  if (t) {
    // 128 columns a block (tiles_cols's scheme: ys.cols % 128 == 0).
    const { grid, ...target } = t;
    grid[0] = ys.cols / 128;
    cx.launch(KERNELS.quant.combine_grad_coltile, grid, DEFINES.quant.TC_THREADS, {
      dy: dyp,
      slot: slotp,
      w: wp,
      k,
      ...target,
      fmt: cols.fmt,
      mode: cols.mode,
      eps: cols.eps,
    });
  }
  return { dweights, dgrad: tiles.q, wgrad: cols.q };
}

/**
 * Backend.swigluBackwardQuantized in one kernel that never stores d[g | u] in f32
 * (swiglu_grad_quant: each block computes swiglu_grad from dh and gate|up in place, as swiglu_bwd
 * does, for 128 columns of the gate half and the same columns of the up half). null for the layouts
 * it does not take: tiles need inter % 128 == 0, Wgrad's group must be column tiles, and dh in BF16
 * goes with a BF16 gate|up only (swigluBackward's combinations).
 */
export function swigluGradQuantized(
  cx: CudaContext,
  dh: Tensor,
  gu: Tensor,
  g: { dgrad: QuantizeOptions; wgrad: QuantizeOptions },
): { dgrad: Tensor; wgrad: Tensor } | null {
  const inter = swigluWidth(gu, "swigluBackwardQuantized", dh);
  if (!onePass(g) || inter % 128 !== 0 || gu.shape.length !== 2) return null;
  const gu16 = gu.dtype === "bf16";
  const dh16 = dh.dtype === "bf16";
  if (dh16 && !gu16) return null;
  const variant = dh16 ? "_bf16_dh16" : gu16 ? "_bf16" : "_f32";
  const ptrs = {
    dh: dh16 ? cx.p(dh) : cx.f32p(dh, "swigluBackwardQuantized"),
    gu: gu16 ? cx.p(gu) : cx.f32p(gu, "swigluBackwardQuantized"),
    inter,
  };
  // A block of 512 threads per 128-row group and column chunk of both halves: inter / 128 blocks a row group.
  return producerQuantized(cx, gu.shape, g, ([, gy, gz], t) =>
    cx.launch(KERNELS.quant[`swiglu_grad_quant${variant}`], [inter / 128, gy, gz], 1024, { ...ptrs, ...t }),
  );
}

/**
 * Backend.ropeQuantized without the f32 rotated copy (rope_quant), or null for the layouts it does
 * not take (row widths not a multiple of 128, groups of four straddling a pair).
 */
export function ropeQuantized(
  cx: CudaContext,
  x: Tensor,
  o: RopeOptions,
  g: { dgrad: QuantizeOptions; wgrad: QuantizeOptions },
): { dgrad: Tensor; wgrad: Tensor } | null {
  if (!onePass(g) || x.shape.length !== 2 || x.cols % 128 !== 0 || !ropeWide(o)) return null;
  if (o.heads * o.width !== x.cols) return null;
  const args = {
    x: cx.f32p(x, "ropeQuantized"),
    cs: x.rows > 0 ? ropeTable(cx, o) : 0,
    width: o.width,
    offset: o.offset,
    dim: o.dim,
    seqLen: o.seqLen,
    inverse: o.inverse ? 1 : 0,
  };
  return producerQuantized(cx, x.shape, g, (grid, t) =>
    cx.launch(KERNELS.quant.rope_quant, grid, DEFINES.quant.TC_THREADS, { ...args, ...t }),
  );
}

/**
 * Backend.headConcatQuantized without the f32 concatenation (head_concat_quant), or null for the
 * layouts it does not take (head_concat4's, in rows that are whole 1x128 tiles).
 */
export function headConcatQuantized(
  cx: CudaContext,
  a: Tensor,
  b: Tensor,
  heads: number,
  bHeads: number,
  aPart: HeadPart | undefined,
  g: { dgrad: QuantizeOptions; wgrad: QuantizeOptions },
): { dgrad: Tensor; wgrad: Tensor } | null {
  const { cols, wide, ...layout } = concatLayout(a, b, heads, bHeads, aPart);
  if (!onePass(g) || !wide || cols % 128 !== 0) return null;
  const args = { a: cx.f32p(a, "headConcatQuantized"), b: cx.f32p(b, "headConcatQuantized"), ...layout };
  return producerQuantized(cx, [a.rows, cols], g, (grid, t) =>
    cx.launch(KERNELS.quant.head_concat_quant, grid, DEFINES.quant.TC_THREADS, { ...args, ...t }),
  );
}

/**
 * Backend.rmsnormQuantized in one kernel (rmsnorm_quant_tile: y never stored), or null for what it
 * does not take (the caller quantises rmsnorm's f32 y instead): 1x128 tiles without segments, rows of
 * a multiple of 128 columns up to 4,096, 16-byte aligned.
 */
export function rmsnormQuantized(cx: CudaContext, x: Tensor, w: Tensor, eps: number, opts: QuantizeOptions) {
  const C = x.cols;
  const xp = cx.f32p(x, "rmsnormQuantized");
  const wp = cx.f32p(w, "rmsnormQuantized");
  if (opts.group !== "tile" || opts.segments || x.shape.length !== 2 || C % 128 !== 0 || C > 256 * 16)
    return null;
  if (xp % 16 !== 0 || wp % 16 !== 0) return null;
  const R = x.rows;
  const { q, fmt, mode, eps: qeps } = quantOutput(cx, x.shape, opts);
  const rstd = cx.make([R], "f32");
  if (R > 0)
    cx.launch(KERNELS.nn.rmsnorm_quant_tile, cx.rowsGrid(R), 256, {
      x: xp,
      w: wp,
      q: cx.p(q),
      scales: cx.p(q.quant!.scales),
      rstd: cx.p(rstd),
      R,
      C,
      eps,
      fmt,
      mode,
      qeps,
    });
  return { y: q, rstd };
}

/**
 * Backend.swigluQuantized in one kernel (swiglu_quant: h never stored), or null for what it does not
 * take: 1x128 tiles without segments of rows of a multiple of 128 values.
 */
export function swigluQuantized(cx: CudaContext, gu: Tensor, opts: QuantizeOptions): Tensor | null {
  const inter = swigluWidth(gu, "swigluQuantized");
  if (opts.group !== "tile" || opts.segments || gu.shape.length !== 2 || inter % 128 !== 0) return null;
  const gu16 = gu.dtype === "bf16";
  const rows = gu.rows;
  const { q, fmt, mode, eps } = quantOutput(cx, [rows, inter], opts);
  const tiles = rows * (inter / 128);
  if (tiles > 0)
    cx.launch(gu16 ? KERNELS.nn.swiglu_quant_bf16 : KERNELS.nn.swiglu_quant_f32, [cdiv(tiles, 32)], 256, {
      gu: gu16 ? cx.p(gu) : cx.f32p(gu, "swigluQuantized"),
      q: cx.p(q),
      scales: cx.p(q.quant!.scales),
      rows,
      inter,
      fmt,
      mode,
      eps,
    });
  return q;
}
