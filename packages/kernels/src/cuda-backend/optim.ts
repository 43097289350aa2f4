// Loss and optimiser (optim.cu): fused cross-entropy, the global gradient norm for clipping and
// AdamW. The norm and AdamW each take a fixed number of launches whatever the number of tensors:
// one kernel walks all of them through a device table (a row per tensor: its addresses, size and
// first block) that is built and uploaded once, when the optimiser prepares its tensor list, and
// reused every step (nothing is uploaded inside a step, which a CUDA graph needs). Every sum has a
// fixed order (docs/runtime.md rule 7).
import {
  type AdamWSlot,
  checkAdamWSlots,
  type PreparedAdamW,
  type PreparedClipScale,
  type Tensor,
} from "@moe8/tensor";
import type { DeviceBuffer } from "../../native.d.cts";
import { DEFINES } from "../cuda/kernels.generated.ts";
import { type CudaContext, cdiv, KERNELS } from "./context.ts";

const { SUMSQ_ROW, ADAMW_ROW, ADAMW_CHUNK, ADAMW_M_BF16, ADAMW_V_BF16, ADAMW_DECAY } = DEFINES.optim;

export function crossEntropy(
  cx: CudaContext,
  logits: Tensor,
  targets: Tensor,
  gradScale: number,
  storeBf16: boolean,
) {
  const N = logits.rows;
  const V = logits.cols;
  const l16 = logits.dtype === "bf16";
  const dlogits = cx.make(logits.shape, storeBf16 ? "bf16" : "f32");
  const loss = cx.make([1], "f32");
  const rows = cx.scratch(N * 8);
  if (N > 0)
    cx.launch(KERNELS.optim.cross_entropy_rows, cx.rowsGrid(N), 256, {
      logits: l16 ? cx.p(logits) : cx.f32p(logits, "crossEntropy"),
      l16: l16 ? 1 : 0,
      targets: cx.i32p(targets, "crossEntropy"),
      dlogits: cx.p(dlogits),
      d16: storeBf16 ? 1 : 0,
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

/** Rows of i64 (device addresses, sizes, block counts) in device memory, until freed. */
function uploadTable(cx: CudaContext, rows: number[][], width: number): DeviceBuffer {
  const host = new BigInt64Array(Math.max(1, rows.length * width));
  rows.forEach((row, i) => {
    row.forEach((x, j) => {
      host[i * width + j] = BigInt(x);
    });
  });
  const table = new cx.n.DeviceBuffer(host.byteLength);
  cx.n.cudaHtod(table, 0, new Uint8Array(host.buffer));
  return table;
}

/** What a prepared op does with its tensors before each use: a disposed one is an error. */
function checkLive(cx: CudaContext, tensors: readonly Tensor[], what: string, disposed: boolean): void {
  if (disposed) throw new Error(`${what}: used after dispose()`);
  for (const t of tensors) cx.buf(t);
}

/**
 * The gradient norm over `grads`: each tensor's sum of squares in up to 256 partials of at least
 * 2,048 elements (one block each), all tensors in one launch, then one block adds the partials in
 * order and computes the clip factor. The partials buffer is the plan's, reused every step.
 */
export function prepareClipScale(cx: CudaContext, grads: Tensor[]): PreparedClipScale {
  const list = [...grads];
  for (const g of list) cx.f32p(g, "clipScale");
  const rows: number[][] = [];
  let total = 0;
  for (const g of list) {
    const n = g.size;
    const parts = Math.max(1, Math.min(cdiv(n, 256 * 8), 256));
    rows.push([cx.p(g), n, total, Math.max(1, cdiv(n, parts))]);
    total += parts;
  }
  const table = uploadTable(cx, rows, SUMSQ_ROW);
  const part = new cx.n.DeviceBuffer(Math.max(1, total) * 8);
  let disposed = false;
  return {
    clipScale(maxNorm: number) {
      checkLive(cx, list, "clipScale", disposed);
      if (total > 0)
        cx.launch(KERNELS.optim.sumsq_multi, [total], 256, {
          tab: table.ptr,
          T: list.length,
          part: part.ptr,
        });
      const norm = cx.make([1], "f32");
      const scale = cx.make([1], "f32");
      cx.launch(KERNELS.optim.clip_final, [1], 256, {
        part: part.ptr,
        nparts: total,
        maxNorm,
        norm: cx.p(norm),
        scale: cx.p(scale),
      });
      return { norm, scale };
    },
    dispose() {
      if (disposed) return;
      disposed = true;
      table.free();
      part.free();
    },
  };
}

export function clipScale(cx: CudaContext, grads: Tensor[], maxNorm: number) {
  const plan = prepareClipScale(cx, grads);
  try {
    return plan.clipScale(maxNorm);
  } finally {
    plan.dispose(); // stream-ordered: after the launches that read the table
  }
}

/**
 * AdamW over `slots`: one launch of blocks of ADAMW_CHUNK elements over all the tensors (empty ones
 * have no row), each element updated as the single-tensor reference does.
 */
export function prepareAdamW(cx: CudaContext, slots: AdamWSlot[]): PreparedAdamW {
  checkAdamWSlots(slots);
  const list = slots.filter((s) => s.p.size > 0).map((s) => ({ ...s }));
  const tensors = list.flatMap((s) => [s.p, s.g, s.m, s.v]);
  const rows: number[][] = [];
  let chunks = 0;
  for (const { p, g, m, v, decay } of list) {
    const flags =
      (m.dtype === "bf16" ? ADAMW_M_BF16 : 0) |
      (v.dtype === "bf16" ? ADAMW_V_BF16 : 0) |
      (decay ? ADAMW_DECAY : 0);
    rows.push([cx.p(p), cx.p(g), cx.p(m), cx.p(v), p.size, chunks, flags, 0]);
    chunks += cdiv(p.size, ADAMW_CHUNK);
  }
  const table = uploadTable(cx, rows, ADAMW_ROW);
  let disposed = false;
  return {
    update(o) {
      checkLive(cx, tensors, "adamw", disposed);
      const gradScale = cx.f32p(o.gradScale, "adamw");
      if (chunks === 0) return;
      cx.launch(KERNELS.optim.adamw_multi, [chunks], 256, {
        tab: table.ptr,
        T: list.length,
        gradScale,
        lr: o.lr,
        beta1: o.beta1,
        beta2: o.beta2,
        eps: o.eps,
        decay: 1 - o.lr * o.weightDecay,
        bc1: 1 - o.beta1 ** o.step,
        bc2: 1 - o.beta2 ** o.step,
      });
    },
    dispose() {
      if (disposed) return;
      disposed = true;
      table.free();
    },
  };
}
