// Loss and optimiser: fused cross-entropy and AdamW (optim.cu), and the global gradient norm for
// clipping (elementwise.cu's sum of squares). Every sum has a fixed order (docs/runtime.md rule 7).
import type { AdamWOptions, Tensor } from "@moe8/tensor";
import { type CudaContext, cdiv, KERNELS } from "./context.ts";

export function crossEntropy(cx: CudaContext, logits: Tensor, targets: Tensor, gradScale: number) {
  const N = logits.rows;
  const V = logits.cols;
  const dlogits = cx.make(logits.shape, "f32");
  const loss = cx.make([1], "f32");
  const rows = cx.scratch(N * 8);
  if (N > 0)
    cx.launch(KERNELS.optim.cross_entropy_rows, cx.rowsGrid(N), 256, {
      logits: cx.f32p(logits, "crossEntropy"),
      targets: cx.i32p(targets, "crossEntropy"),
      dlogits: cx.p(dlogits),
      lossRow: rows.ptr,
      N,
      V,
      gradScale,
      bad: 0, // null: a target outside [0, V) gives loss 0 and is not reported
    });
  cx.launch(KERNELS.optim.cross_entropy_final, [1], 256, { lossRow: rows.ptr, N, loss: cx.p(loss) });
  rows.free();
  return { loss, dlogits };
}

export function clipScale(cx: CudaContext, grads: Tensor[], maxNorm: number) {
  const plan = grads.map((g) => {
    const n = g.size;
    const parts = Math.max(1, Math.min(cdiv(n, 256 * 8), 256));
    return { g, n, parts, chunk: Math.max(1, cdiv(n, parts)) };
  });
  const total = plan.reduce((s, p) => s + p.parts, 0);
  const part = cx.scratch(Math.max(1, total) * 8);
  let at = 0;
  for (const { g, n, parts, chunk } of plan) {
    cx.launch(KERNELS.elementwise.sumsq_partial, [parts], 256, {
      x: cx.f32p(g, "clipScale"),
      part: part.ptr + at * 8,
      n,
      chunk,
    });
    at += parts;
  }
  const norm = cx.make([1], "f32");
  const scale = cx.make([1], "f32");
  cx.launch(KERNELS.elementwise.clip_final, [1], 256, {
    part: part.ptr,
    nparts: total,
    maxNorm,
    norm: cx.p(norm),
    scale: cx.p(scale),
  });
  part.free();
  return { norm, scale };
}

export function adamw(cx: CudaContext, p: Tensor, g: Tensor, m: Tensor, v: Tensor, o: AdamWOptions): void {
  const n = p.size;
  const bc1 = 1 - o.beta1 ** o.step;
  const bc2 = 1 - o.beta2 ** o.step;
  const decay = 1 - o.lr * o.weightDecay;
  for (const t of [m, v])
    if (t.dtype !== "f32" && t.dtype !== "bf16")
      throw new Error(`adamw: moments must be f32 or bf16, got ${t}`);
  cx.launch(KERNELS.optim.adamw, cx.g1(n), 256, {
    p: cx.f32p(p, "adamw"),
    g: cx.f32p(g, "adamw"),
    m: cx.p(m),
    v: cx.p(v),
    mBf16: m.dtype === "bf16" ? 1 : 0,
    vBf16: v.dtype === "bf16" ? 1 : 0,
    gradScale: cx.f32p(o.gradScale, "adamw"),
    n,
    lr: o.lr,
    beta1: o.beta1,
    beta2: o.beta2,
    eps: o.eps,
    decay,
    bc1,
    bc2,
  });
}
