// Causal attention, forward and backward. BF16 attention with a head shape flash_sm90.cu instantiates
// runs its wgmma kernels on a compute-capability-9.0 GPU (forward; backward as a dq kernel and a
// dk/dv kernel, each summing in a fixed order: no atomics, the same bits every run); flash.cu's
// mma.sync kernels take the other head shapes it instantiates (and every shape off Hopper);
// attention.cu's simple kernels every other case, and the forward with fewer queries than keys
// (kvSeq > seq: a KV-cache decode step).
import { type AttentionOptions, attentionRowsError, type Tensor } from "@moe8/tensor";
// KERNELS from the generated table itself, not through context.ts: context.ts imports this module
// (attentionPath), and the shape sets below read KERNELS while the modules load.
import { DEFINES, KERNELS } from "../cuda/kernels.generated.ts";
import { type CudaContext, cdiv } from "./context.ts";
import { bf16Operand, f32Operand } from "./elementwise.ts";

/** The head shapes "<dqk>_<dv>" flash.cu has entry points for (flash_fwd_<dqk>_<dv> and the rest). */
type FlashShape = keyof typeof KERNELS.flash extends infer N
  ? N extends `flash_fwd_${infer S}`
    ? S
    : never
  : never;

const FLASH_SHAPES = new Set(
  Object.keys(KERNELS.flash)
    .filter((n) => n.startsWith("flash_fwd_"))
    .map((n) => n.slice("flash_fwd_".length)),
) as ReadonlySet<string>;

/** The head shapes "<dqk>_<dv>" flash_sm90.cu has entry points for (fa3_fwd_<dqk>_<dv> and the rest). */
type Fa3Shape = keyof typeof KERNELS.flash_sm90 extends infer N
  ? N extends `fa3_fwd_${infer S}`
    ? S
    : never
  : never;

const FA3_SHAPES = new Set(
  Object.keys(KERNELS.flash_sm90)
    .filter((n) => n.startsWith("fa3_fwd_"))
    .map((n) => n.slice("fa3_fwd_".length)),
) as ReadonlySet<string>;
const FA3 = DEFINES.flash_sm90;

/** Which kernels run BF16 attention on the tensor cores, and why (doctor prints it). */
export interface AttentionPath {
  kernel: "sm90-wgmma" | "mma.sync";
  reason: string;
}

/**
 * The attention path on a GPU of this compute capability (e.g. "9.0") under the environment: the
 * wgmma kernels of flash_sm90.cu for their head shapes on sm_90 unless MOE8_SM90_ATTENTION=0, the
 * mma.sync kernels of flash.cu otherwise.
 */
export function attentionPath(
  computeCapability: string | null | undefined,
  env: Record<string, string | undefined> = process.env,
): AttentionPath {
  if (computeCapability !== "9.0")
    return {
      kernel: "mma.sync",
      reason: `compute capability ${computeCapability ?? "unknown"}: wgmma needs 9.0 (sm_90a)`,
    };
  if (env.MOE8_SM90_ATTENTION === "0") return { kernel: "mma.sync", reason: "MOE8_SM90_ATTENTION=0" };
  const shapes = [...FA3_SHAPES].map((s) => s.replace("_", "/")).join(", ");
  return {
    kernel: "sm90-wgmma",
    reason: `sm_90a: TMA + wgmma for q.k/v head sizes ${shapes}; flash.cu's mma.sync for other sizes`,
  };
}

/** Query (or key) rows per block of attention.cu: one warp each. */
const ROWS_PER_BLOCK = DEFINES.attention.WARPS;
/** attention.cu's largest head dimension: MAXD values per lane of a warp. */
const MAX_HEAD_DIM = 32 * DEFINES.attention.MAXD;
/** Query (or key) rows per block of flash.cu. */
const FLASH_ROWS = DEFINES.flash.FROWS;

function attnDims(q: Tensor, v: Tensor, o: AttentionOptions) {
  const dqk = q.cols / o.heads;
  const dv = v.cols / o.heads;
  if (dqk > MAX_HEAD_DIM || dv > MAX_HEAD_DIM)
    throw new Error(`attention: head dimensions ${dqk}/${dv} above ${MAX_HEAD_DIM}`);
  const rows = o.batch * o.heads * o.seq;
  return {
    dqk,
    dv,
    grid: [Math.max(1, cdiv(rows, ROWS_PER_BLOCK))] as [number],
    lowp: o.precision === "bf16" ? 1 : 0,
  };
}

/** flash.cu's entry-point suffix for a BF16 attention of these head sizes, or null (attention.cu). */
function flashShape(
  cx: CudaContext,
  dqk: number,
  dv: number,
  lowp: number,
  ...ts: Tensor[]
): FlashShape | null {
  const shape = `${dqk}_${dv}`;
  if (!lowp || !cx.useTensorCores || !FLASH_SHAPES.has(shape)) return null;
  // The kernels read BF16: bf16 inputs as they are, f32 ones as copies in fresh (aligned) scratch.
  return ts.every((t) => t.dtype === "f32" || (t.dtype === "bf16" && cx.p(t) % 16 === 0))
    ? (shape as FlashShape)
    : null;
}

/**
 * The flash_sm90.cu shape for a flash shape on a GPU that runs it, with its BF16 operands where TMA
 * can read them (16-byte-aligned addresses), or null (flash.cu then).
 */
function fa3Shape(cx: CudaContext, flash: FlashShape, ...operands: { ptr: number }[]): Fa3Shape | null {
  return cx.sm90Attention && FA3_SHAPES.has(flash) && operands.every((x) => x.ptr % 16 === 0)
    ? (flash as Fa3Shape)
    : null;
}

/**
 * A tensor map over a BF16 [B*T, H*D] operand for flash_sm90.cu: 32-column boxes (64 bytes, the
 * 64-byte swizzle) of `rows` rows.
 */
function fa3Map(cx: CudaContext, ptr: number, o: AttentionOptions, d: number, rows: number) {
  return cx.n.cudaTensorMap2D(ptr, "bf16", o.heads * d, o.batch * o.seq, 32, rows, 64);
}

export function attention(cx: CudaContext, q: Tensor, k: Tensor, v: Tensor, o: AttentionOptions) {
  const { dqk, dv, grid, lowp } = attnDims(q, v, o);
  const Tk = o.kvSeq ?? o.seq;
  // With batch 1, k and v may be a longer cache: the kernels read their first Tk rows only.
  const bad = attentionRowsError(q.rows, k.rows, v.rows, o);
  if (bad) throw new Error(bad);
  const out = cx.make([q.rows, v.cols], "f32");
  const lse = cx.make([o.batch * o.heads * o.seq], "f32");
  const flash = Tk === o.seq ? flashShape(cx, dqk, dv, lowp, q, k, v) : null;
  if (flash) {
    const [qb, kb, vb] = [q, k, v].map((t) => bf16Operand(cx, t, "attention"));
    const fa3 = fa3Shape(cx, flash, qb, kb, vb);
    if (fa3) {
      const grid: [number, number] = [cdiv(o.seq, FA3.FA3_BM), o.batch * o.heads];
      cx.launch(
        KERNELS.flash_sm90[`fa3_fwd_${fa3}`],
        grid,
        FA3.FA3_THREADS,
        {
          tQ: fa3Map(cx, qb.ptr, o, dqk, FA3.FA3_BM),
          tK: fa3Map(cx, kb.ptr, o, dqk, FA3.FA3_BN),
          tV: fa3Map(cx, vb.ptr, o, dv, FA3.FA3_BN),
          o: cx.p(out),
          lse: cx.p(lse),
          T: o.seq,
          H: o.heads,
          scale: o.scale,
        },
        FA3[`FA3_FWD_SMEM_${fa3}`],
      );
    } else
      cx.launch(KERNELS.flash[`flash_fwd_${flash}`], [cdiv(o.seq, FLASH_ROWS), o.batch * o.heads], 128, {
        q: qb.ptr,
        k: kb.ptr,
        v: vb.ptr,
        o: cx.p(out),
        lse: cx.p(lse),
        T: o.seq,
        H: o.heads,
        scale: o.scale,
      });
    for (const x of [qb, kb, vb]) x.free();
    return { o: out, lse };
  }
  const [qf, kf, vf] = [q, k, v].map((t) => f32Operand(cx, t, "attention"));
  cx.launch(KERNELS.attention.attn_fwd, grid, 128, {
    q: qf.ptr,
    k: kf.ptr,
    v: vf.ptr,
    o: cx.p(out),
    lse: cx.p(lse),
    B: o.batch,
    T: o.seq,
    Tk,
    H: o.heads,
    dqk,
    dv,
    scale: o.scale,
    lowp,
  });
  for (const x of [qf, kf, vf]) x.free();
  return { o: out, lse };
}

export function attentionBackward(
  cx: CudaContext,
  dO: Tensor,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  out: Tensor,
  lse: Tensor,
  o: AttentionOptions,
) {
  const { dqk, dv, grid, lowp } = attnDims(q, v, o);
  const { batch: B, seq: T, heads: H } = o;
  if ((o.kvSeq ?? T) !== T) throw new Error(`attentionBackward: kvSeq ${o.kvSeq} is not seq ${T}`);
  const D = cx.scratch(B * H * T * 4);
  const dq = cx.make(q.shape, "f32");
  const dk = cx.make(k.shape, "f32");
  const dvv = cx.make(v.shape, "f32");
  const [dOf, outf] = [dO, out].map((t) => f32Operand(cx, t, "attentionBackward"));
  cx.launch(KERNELS.attention.attn_bwd_d, grid, 128, {
    dO: dOf.ptr,
    o: outf.ptr,
    D: D.ptr,
    B,
    T,
    H,
    dv,
    lowp,
  });
  dOf.free();
  outf.free();
  const flash = flashShape(cx, dqk, dv, lowp, dO, q, k, v);
  if (flash) {
    const bf = [dO, q, k, v].map((t) => bf16Operand(cx, t, "attentionBackward"));
    const [ob, qb, kb, vb] = bf;
    const fa3 = fa3Shape(cx, flash, ...bf);
    if (fa3) {
      const tK = fa3Map(cx, kb.ptr, o, dqk, FA3.FA3_BN);
      const tV = fa3Map(cx, vb.ptr, o, dv, FA3.FA3_BN);
      const grid: [number, number] = [cdiv(T, FA3.FA3_BN), B * H];
      const rest = { lse: cx.f32p(lse, "attentionBackward"), D: D.ptr, T, H, scale: o.scale };
      // dq: query tiles of FA3_BM rows (as the forward); dk, dv: key tiles with query tiles of FA3_BQ.
      cx.launch(
        KERNELS.flash_sm90[`fa3_dq_${fa3}`],
        grid,
        FA3.FA3_THREADS,
        {
          tQ: fa3Map(cx, qb.ptr, o, dqk, FA3.FA3_BM),
          tK,
          tV,
          tO: fa3Map(cx, ob.ptr, o, dv, FA3.FA3_BM),
          ...rest,
          dq: cx.p(dq),
        },
        FA3[`FA3_DQ_SMEM_${fa3}`],
      );
      cx.launch(
        KERNELS.flash_sm90[`fa3_dkdv_${fa3}`],
        grid,
        FA3.FA3_THREADS,
        {
          tQ: fa3Map(cx, qb.ptr, o, dqk, FA3.FA3_BQ),
          tK,
          tV,
          tO: fa3Map(cx, ob.ptr, o, dv, FA3.FA3_BQ),
          ...rest,
          dk: cx.p(dk),
          dv: cx.p(dvv),
        },
        FA3[`FA3_DKDV_SMEM_${fa3}`],
      );
      for (const x of bf) x.free();
      D.free();
      return { dq, dk, dv: dvv };
    }
    // The inputs both flash backward kernels read.
    const inputs = () => ({
      dO: bf[0].ptr,
      q: bf[1].ptr,
      k: bf[2].ptr,
      v: bf[3].ptr,
      lse: cx.f32p(lse, "attentionBackward"),
      D: D.ptr,
    });
    const fgrid: [number, number] = [cdiv(T, FLASH_ROWS), B * H];
    cx.launch(KERNELS.flash[`flash_dq_${flash}`], fgrid, 128, {
      ...inputs(),
      dq: cx.p(dq),
      T,
      H,
      scale: o.scale,
    });
    cx.launch(KERNELS.flash[`flash_dkdv_${flash}`], fgrid, 128, {
      ...inputs(),
      dk: cx.p(dk),
      dv: cx.p(dvv),
      T,
      H,
      scale: o.scale,
    });
    for (const x of bf) x.free();
    D.free();
    return { dq, dk, dv: dvv };
  }
  const f = [dO, q, k, v].map((t) => f32Operand(cx, t, "attentionBackward"));
  // The inputs both backward kernels read.
  const inputs = () => ({
    dO: f[0].ptr,
    q: f[1].ptr,
    k: f[2].ptr,
    v: f[3].ptr,
    lse: cx.f32p(lse, "attentionBackward"),
    D: D.ptr,
  });
  const sizes = { B, T, H, dqk, dv, scale: o.scale, lowp };
  cx.launch(KERNELS.attention.attn_bwd_dq, grid, 128, { ...inputs(), dq: cx.p(dq), ...sizes });
  cx.launch(KERNELS.attention.attn_bwd_dkdv, grid, 128, {
    ...inputs(),
    dk: cx.p(dk),
    dvo: cx.p(dvv),
    ...sizes,
  });
  for (const x of f) x.free();
  D.free();
  return { dq, dk, dv: dvv };
}
