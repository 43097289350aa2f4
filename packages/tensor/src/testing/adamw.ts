// The AdamW check shared by the op suite and the cpu determinism and SIMD tests: a few steps of
// Backend.prepareAdamW on one tensor from zero moments, once with f32 moments and once with BF16
// moments.
import type { Backend } from "../backend.ts";
import type { Tensor } from "../tensor.ts";

export interface AdamwStepsOptions {
  /** Makes the parameter to update (called once per moment precision: each run starts afresh). */
  param: () => Tensor;
  grad: Tensor;
  /** The one-element clip factor the update multiplies the gradient by. */
  gradScale: Tensor;
  lr: number;
  /** Updates 1..steps (bias correction uses the step number). */
  steps: number;
}

/** A parameter after the updates, and its moments in the precision they were kept in. */
export interface AdamwRun {
  p: Tensor;
  m: Tensor;
  v: Tensor;
}

/**
 * The updates with beta1 0.9, beta2 0.95, eps 1e-8 and weight decay 0.1 (the optimizer's defaults),
 * for f32 and BF16 moments.
 */
export function adamwSteps(b: Backend, o: AdamwStepsOptions): Record<"f32" | "bf16", AdamwRun> {
  const run = (moments: "f32" | "bf16"): AdamwRun => {
    const p = o.param();
    const m = b.zeros(p.shape, moments);
    const v = b.zeros(p.shape, moments);
    const adamw = b.prepareAdamW([{ p, g: o.grad, m, v, decay: true }]);
    for (let step = 1; step <= o.steps; step++)
      adamw.update({
        lr: o.lr,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weightDecay: 0.1,
        step,
        gradScale: o.gradScale,
      });
    adamw.dispose();
    return { p, m, v };
  };
  const f32 = run("f32");
  return { f32, bf16: run("bf16") };
}
