// AdamW over f32 master weights (docs/numerics.md: f32 master weights and f32 gradients, AdamW
// moments in BF16). Decoupled weight decay only for parameters marked `decay` (not norms; the MoE
// correction bias is not a parameter at all). Global-norm clipping happens on the device: the clip
// factor is a tensor the update reads, so the host never waits inside a step.
import { encodeBf16, type MomentPrecision } from "@moe8/fp8-core";
import type { Backend, Param, Tensor } from "@moe8/tensor";

export interface AdamWConfig {
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** Global-norm clipping threshold (0 disables). */
  clip: number;
  moments: MomentPrecision;
}

export const ADAMW_DEFAULTS: AdamWConfig = {
  beta1: 0.9,
  beta2: 0.95,
  eps: 1e-8,
  weightDecay: 0.1,
  clip: 1.0,
  moments: "bf16",
};

interface Slot {
  param: Param;
  m: Tensor;
  v: Tensor;
}

export class AdamW {
  step = 0;
  private slots: Slot[];

  constructor(
    readonly b: Backend,
    readonly params: Param[],
    readonly cfg: AdamWConfig,
  ) {
    this.slots = params.map((param) => ({
      param,
      m: b.keep(b.zeros(param.value.shape, cfg.moments)),
      v: b.keep(b.zeros(param.value.shape, cfg.moments)),
    }));
  }

  /** The global gradient norm and the clip factor, as one-element device tensors. */
  gradNorm(): { norm: Tensor; scale: Tensor } {
    return this.b.clipScale(
      this.params.map((p) => p.grad),
      this.cfg.clip > 0 ? this.cfg.clip : Number.POSITIVE_INFINITY,
    );
  }

  /** One update of every parameter at learning rate `lr`, gradients multiplied by `gradScale`. */
  update(lr: number, gradScale: Tensor): void {
    this.step++;
    const c = this.cfg;
    for (const s of this.slots)
      this.b.adamw(s.param.value, s.param.grad, s.m, s.v, {
        lr,
        beta1: c.beta1,
        beta2: c.beta2,
        eps: c.eps,
        weightDecay: s.param.decay ? c.weightDecay : 0,
        step: this.step,
        gradScale,
      });
  }

  zeroGrad(): void {
    for (const p of this.params) p.zeroGrad();
  }

  /** Moments by parameter name (`<name>.exp_avg`, `<name>.exp_avg_sq`) for checkpoints. */
  stateTensors(): Map<string, Tensor> {
    const out = new Map<string, Tensor>();
    for (const s of this.slots) {
      out.set(`${s.param.name}.exp_avg`, s.m);
      out.set(`${s.param.name}.exp_avg_sq`, s.v);
    }
    return out;
  }

  /** Restores moments saved by `stateTensors` (values as f32 host arrays) and the step count. */
  loadState(step: number, get: (name: string) => Float32Array | undefined): void {
    for (const s of this.slots)
      for (const [t, suffix] of [
        [s.m, "exp_avg"],
        [s.v, "exp_avg_sq"],
      ] as const) {
        const data = get(`${s.param.name}.${suffix}`);
        if (!data) throw new Error(`optimizer state: missing ${s.param.name}.${suffix}`);
        if (data.length !== t.size)
          throw new Error(
            `optimizer state: ${s.param.name}.${suffix} has ${data.length} values, want ${t.size}`,
          );
        this.b.write(t, t.dtype === "bf16" ? encodeBf16(data) : data);
      }
    this.step = step;
  }

  dispose(): void {
    for (const s of this.slots) {
      s.m.dispose();
      s.v.dispose();
    }
  }
}
