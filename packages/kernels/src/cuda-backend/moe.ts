// Mixture-of-experts ops (moe.cu): routing, the balance loss, the permutation of tokens to experts
// and back, and the bias update. Routing stays on the device (docs/runtime.md rule 2).
import {
  type BiasUpdateOptions,
  type PermuteResult,
  type RouterResult,
  rowScales,
  type Tensor,
} from "@moe8/tensor";
import type { DeviceBuffer } from "../../native.d.cts";
import { DEFINES } from "../cuda/kernels.generated.ts";
import { type CudaContext, cdiv, KERNELS } from "./context.ts";

const { ROUTER_MAX_EXPERTS, PERMUTE_MAX_EXPERTS, PCHUNK, BIAS_SIGN, BIAS_ERROR, BIAS_CLIPPED } = DEFINES.moe;

export function router(
  cx: CudaContext,
  logits: Tensor,
  bias: Tensor,
  k: number,
  scaling: number,
): RouterResult {
  const N = logits.rows;
  const E = logits.cols;
  if (E > ROUTER_MAX_EXPERTS) throw new Error(`router: ${E} experts (at most ${ROUTER_MAX_EXPERTS} on cuda)`);
  if (k > E) throw new Error(`router: top-${k} of ${E} experts`);
  const scores = cx.make([N, E], "f32");
  const topIdx = cx.make([N, k], "i32");
  const weights = cx.make([N, k], "f32");
  cx.launch(KERNELS.moe.router, [Math.max(1, cdiv(N, 128))], 128, {
    logits: cx.f32p(logits, "router"),
    bias: cx.f32p(bias, "router"),
    scores: cx.p(scores),
    topIdx: cx.p(topIdx),
    weights: cx.p(weights),
    N,
    E,
    k,
    scaling,
  });
  return { scores, topIdx, weights };
}

export function routerBackward(
  cx: CudaContext,
  dweights: Tensor,
  scores: Tensor,
  topIdx: Tensor,
  scaling: number,
  dscores?: Tensor,
): Tensor {
  const N = scores.rows;
  const E = scores.cols;
  const k = topIdx.cols;
  const out = cx.make([N, E], "f32");
  cx.launch(KERNELS.moe.router_bwd, cx.g1(N * E), 256, {
    dweights: cx.f32p(dweights, "routerBackward"),
    scores: cx.f32p(scores, "routerBackward"),
    topIdx: cx.i32p(topIdx, "routerBackward"),
    dscores: dscores ? cx.f32p(dscores, "routerBackward") : 0,
    dlogits: cx.p(out),
    N,
    E,
    k,
    scaling,
  });
  return out;
}

export function balanceLoss(
  cx: CudaContext,
  scores: Tensor,
  topIdx: Tensor,
  o: { batch: number; seq: number; alpha: number },
) {
  const E = scores.cols;
  const k = topIdx.cols;
  const { batch: B, seq: T, alpha } = o;
  const f = cx.scratch(B * E * 8);
  const P = cx.scratch(B * E * 8);
  const part = cx.scratch(B * 8);
  const loss = cx.make([1], "f32");
  const dscores = cx.make(scores.shape, "f32");
  const Z = cx.scratch(Math.max(1, B * T) * 8);
  cx.launch(KERNELS.moe.balance_z, [Math.max(1, cdiv(B * T, 256))], 256, {
    scores: cx.f32p(scores, "balanceLoss"),
    Z: Z.ptr,
    N: B * T,
    E,
  });
  const term = cx.scratch(Math.max(1, B * T * E) * 8);
  const cnt = cx.scratch(Math.max(1, B * E) * 4);
  cx.n.cudaMemset32(cnt, 0, 0, Math.max(1, B * E));
  cx.launch(KERNELS.moe.balance_terms, [Math.max(1, cdiv(B * T * Math.max(E, k), 256))], 256, {
    scores: cx.p(scores),
    topIdx: cx.i32p(topIdx, "balanceLoss"),
    Zs: Z.ptr,
    term: term.ptr,
    cnt: cnt.ptr,
    B,
    T,
    E,
    k,
  });
  cx.launch(KERNELS.moe.balance_stats, [Math.max(1, B)], 1024, {
    term: term.ptr,
    cnt: cnt.ptr,
    f: f.ptr,
    P: P.ptr,
    lossPart: part.ptr,
    B,
    T,
    E,
    k,
    alpha,
  });
  cx.launch(KERNELS.moe.balance_loss, [1], 32, { lossPart: part.ptr, B, loss: cx.p(loss) });
  cx.launch(KERNELS.moe.balance_grad, [Math.max(1, cdiv(B * T, 128))], 128, {
    scores: cx.p(scores),
    f: f.ptr,
    dscores: cx.p(dscores),
    B,
    T,
    E,
    alpha,
  });
  for (const b of [f, P, part, Z, term, cnt]) b.free();
  return { loss, dscores };
}

/** pos[selection] = row of xs (the inverse permutation), in scratch memory. */
function positions(cx: CudaContext, slot: Tensor): DeviceBuffer {
  const rows = slot.size;
  const pos = cx.scratch(rows * 4);
  cx.launch(KERNELS.moe.invert_slots, [Math.max(1, cdiv(rows, 256))], 256, {
    slot: cx.i32p(slot, "moe"),
    pos: pos.ptr,
    rows,
  });
  return pos;
}

export function moePermute(cx: CudaContext, x: Tensor, topIdx: Tensor, experts: number): PermuteResult {
  const N = topIdx.rows;
  const k = topIdx.cols;
  const E = experts;
  if (E > PERMUTE_MAX_EXPERTS)
    throw new Error(`moePermute: ${E} experts (at most ${PERMUTE_MAX_EXPERTS} on cuda)`);
  const total = N * k;
  const d = x.cols;
  // FP8 rows (1x128 tiles or rows): codes and scales are moved together, the codes as 4-byte words.
  const per = x.quant ? rowScales(x, "moePermute") : 0;
  if (x.quant && d % 4 !== 0)
    throw new Error(`moePermute: FP8 rows of ${d} codes (cuda moves them as 4-byte words: d % 4 == 0)`);
  if (!x.quant) cx.f32p(x, "moePermute");
  // One block of PCHUNK threads per chunk of PCHUNK selections.
  const chunks = cdiv(total, PCHUNK);
  const counts = cx.scratch(chunks * E * 4);
  const base = cx.scratch(chunks * E * 4);
  const slot = cx.make([total], "i32");
  const offsets = cx.make([E + 1], "i32");
  const tp = cx.i32p(topIdx, "moePermute");
  // The per-chunk histogram lives in E ints of dynamic shared memory.
  cx.launch(KERNELS.moe.permute_count, [chunks], PCHUNK, { topIdx: tp, counts: counts.ptr, total, E }, E * 4);
  cx.launch(KERNELS.moe.permute_scan, [1], 256, {
    counts: counts.ptr,
    base: base.ptr,
    offsets: cx.p(offsets),
    chunks,
    E,
  });
  cx.launch(KERNELS.moe.permute_scatter, [chunks], PCHUNK, {
    topIdx: tp,
    base: base.ptr,
    slot: cx.p(slot),
    pos: 0, // null: the inverse permutation is made when needed (positions)
    total,
    E,
  });
  counts.free();
  base.free();
  /** Rows of `w` 4-byte words of src gathered into dst (f32 values, or FP8 codes as words: a bit copy). */
  const gather = (src: number, w: number, dst: number) =>
    cx.launch(KERNELS.moe.gather_rows, cx.g1(total * w), 256, {
      x: src,
      slot: cx.p(slot),
      xs: dst,
      rows: total,
      d: w,
      k,
    });
  if (!x.quant) {
    const xs = cx.make([total, d], "f32");
    gather(cx.f32p(x, "moePermute"), d, cx.p(xs));
    return { xs, slot, offsets };
  }
  const scales = cx.make([total * per], "f32");
  const xs = cx.make([total, d], x.dtype, { ...x.quant, scales });
  gather(cx.f32p(x.quant.scales, "moePermute"), per, cx.p(scales));
  gather(cx.p(x), d / 4, cx.p(xs));
  return { xs, slot, offsets };
}

export function moePermuteBackward(cx: CudaContext, dxs: Tensor, slot: Tensor, tokens: number): Tensor {
  const d = dxs.cols;
  const k = slot.size / tokens;
  const dx = cx.make([tokens, d], "f32");
  const pos = positions(cx, slot);
  const bf16 = dxs.dtype === "bf16";
  cx.launch(bf16 ? KERNELS.moe.permute_bwd16 : KERNELS.moe.permute_bwd, cx.g1(tokens * d), 256, {
    dxs: bf16 ? cx.p(dxs) : cx.f32p(dxs, "moePermuteBackward"),
    pos: pos.ptr,
    dx: cx.p(dx),
    N: tokens,
    k,
    d,
  });
  pos.free();
  return dx;
}

export function moeCombine(
  cx: CudaContext,
  ys: Tensor,
  slot: Tensor,
  weights: Tensor,
  add: readonly Tensor[] = [],
): Tensor {
  const N = weights.rows;
  const k = weights.cols;
  const d = ys.cols;
  if (add.length > 2) throw new Error(`moeCombine: at most 2 tensors to add, got ${add.length}`);
  for (const a of add)
    if (a.rows !== N || a.cols !== d) throw new Error(`moeCombine: add [${a.shape}], expected [${N}, ${d}]`);
  const y = cx.make([N, d], "f32");
  const pos = positions(cx, slot);
  const bf16 = ys.dtype === "bf16";
  cx.launch(bf16 ? KERNELS.moe.combine16 : KERNELS.moe.combine, cx.g1(N * d), 256, {
    ys: bf16 ? cx.p(ys) : cx.f32p(ys, "moeCombine"),
    pos: pos.ptr,
    w: cx.f32p(weights, "moeCombine"),
    a0: add[0] ? cx.f32p(add[0], "moeCombine") : 0,
    a1: add[1] ? cx.f32p(add[1], "moeCombine") : 0,
    y: cx.p(y),
    N,
    k,
    d,
  });
  pos.free();
  return y;
}

export function moeCombineBackward(cx: CudaContext, dy: Tensor, ys: Tensor, slot: Tensor, weights: Tensor) {
  const rows = slot.size;
  const k = weights.cols;
  const d = ys.cols;
  const dys = cx.make(ys.shape, "f32");
  const dweights = cx.make(weights.shape, "f32");
  const ys16 = ys.dtype === "bf16";
  // One warp per row: 8 rows per block of 256 threads.
  cx.launch(
    ys16 ? KERNELS.moe.combine_bwd_ys16 : KERNELS.moe.combine_bwd,
    [Math.max(1, cdiv(rows, 8))],
    256,
    {
      dy: cx.f32p(dy, "moeCombineBackward"),
      ys: ys16 ? cx.p(ys) : cx.f32p(ys, "moeCombineBackward"),
      slot: cx.i32p(slot, "moeCombineBackward"),
      w: cx.f32p(weights, "moeCombineBackward"),
      dys: cx.p(dys),
      dweights: cx.p(dweights),
      rows,
      k,
      d,
    },
  );
  return { dys, dweights };
}

export function biasUpdate(cx: CudaContext, bias: Tensor, offsets: Tensor, opts: BiasUpdateOptions): void {
  const E = bias.size;
  cx.launch(KERNELS.moe.bias_update, [Math.max(1, cdiv(E, 256))], 256, {
    bias: cx.f32p(bias, "biasUpdate"),
    offsets: cx.i32p(offsets, "biasUpdate"),
    E,
    gamma: opts.gamma,
    rule: { sign: BIAS_SIGN, error: BIAS_ERROR, clipped: BIAS_CLIPPED }[opts.rule],
  });
}
