// Causal attention, forward and backward: flash.cu's tensor-core kernels for BF16 attention with a
// head shape that file instantiates, attention.cu's simple kernels for every other case, and for a
// forward with fewer queries than keys (kvSeq > seq: a KV-cache decode step).
import type { AttentionOptions, Tensor } from "@moe8/tensor";
import { DEFINES } from "../cuda/kernels.generated.ts";
import { type CudaContext, cdiv, KERNELS } from "./context.ts";
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

export function attention(cx: CudaContext, q: Tensor, k: Tensor, v: Tensor, o: AttentionOptions) {
  const { dqk, dv, grid, lowp } = attnDims(q, v, o);
  const Tk = o.kvSeq ?? o.seq;
  const kv = o.batch * Tk;
  if (Tk < o.seq || q.rows !== o.batch * o.seq || k.rows !== kv || v.rows !== kv)
    throw new Error(
      `attention: q ${q.rows}, k ${k.rows}, v ${v.rows} rows for batch ${o.batch} x seq ${o.seq} (kvSeq ${Tk})`,
    );
  const out = cx.make([q.rows, v.cols], "f32");
  const lse = cx.make([o.batch * o.heads * o.seq], "f32");
  const flash = Tk === o.seq ? flashShape(cx, dqk, dv, lowp, q, k, v) : null;
  if (flash) {
    const [qb, kb, vb] = [q, k, v].map((t) => bf16Operand(cx, t, "attention"));
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
