// One optimizer step: forward + backward in a per-step arena, global-norm clipping, AdamW, then the
// auxiliary-loss-free bias update. The host reads two numbers per step (loss and grad norm), after
// all work is enqueued (docs/runtime.md rule 1); a non-finite loss or norm skips the update.
import type { LoadStats } from "@moe8/moe-layers";
import type { AdamW } from "@moe8/optimizer";
import type { Tensor } from "@moe8/tensor";
import type { BatchShape, DeepSeekModel } from "./model.ts";

export interface StepResult {
  /** Mean token cross-entropy. */
  loss: number;
  /** Cross-entropy plus the balance losses. */
  totalLoss: number;
  gradNorm: number;
  /** The update was skipped because the loss or the gradient norm was not finite. */
  skipped: boolean;
  /** Per MoE layer: expert loads of this step. */
  load: LoadStats[];
  /** FP8 range events of the step's activations and gradients, when asked for. */
  fp8?: { overflow: number; underflow: number };
}

export async function trainStep(
  model: DeepSeekModel,
  opt: AdamW,
  ids: Tensor,
  targets: Tensor,
  shape: BatchShape,
  lr: number,
  opts: { fp8Stats?: boolean } = {},
): Promise<StepResult> {
  const b = model.b;
  const flow = model.trace.flow;
  return b.scope(async () => {
    flow.enabled = !!opts.fp8Stats;
    opt.zeroGrad();
    const { ce, total } = model.lossAndGrad(ids, targets, shape);
    const { norm, scale } = opt.gradNorm();
    const [loss, totalLoss, gradNorm] = [await ce.item(), await total.item(), await norm.item()];
    const skipped = !Number.isFinite(totalLoss) || !Number.isFinite(gradNorm);
    if (!skipped) {
      opt.update(lr, scale);
      for (const m of model.moeLayers) m.updateBias();
    }
    const load = await Promise.all(model.moeLayers.map((m) => m.loadStats()));
    const fp8 = flow.enabled ? await flow.take() : undefined;
    flow.enabled = false;
    return { loss, totalLoss, gradNorm, skipped, load, fp8 };
  });
}
