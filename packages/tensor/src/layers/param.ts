// A trainable parameter: the f32 master weight and its f32 gradient, both long-lived, with the
// checkpoint name (docs/model.md) and whether weight decay applies.
import type { Backend } from "../backend.ts";
import type { Tensor } from "../tensor.ts";

export interface ParamOptions {
  /** The checkpoint name, e.g. `model.layers.0.self_attn.o_proj.weight`. */
  name: string;
  /** Initial values, row-major in `shape`. */
  init: Float32Array;
  shape: number[];
  /** AdamW's decoupled weight decay applies (weights: yes; norms: no). */
  decay: boolean;
  /**
   * The optimiser group whose learning-rate scale applies (AdamWConfig.lrScale): "router" for the MoE
   * routers' weights; absent for every other parameter.
   */
  group?: "router";
  /**
   * A weight that checkpoints store as several: its rows (each expert's rows, for stacked expert
   * weights) split into equal consecutive blocks named by these projections, e.g. the fused
   * `gate_up_proj` stored as `gate_proj` and `up_proj` (see DeepSeekModel.namedTensors).
   */
  parts?: readonly string[];
}

export class Param {
  readonly grad: Tensor;
  /**
   * Whether `grad` holds zeros that nothing has added to yet: true when created and after
   * zeroGrad(), false once the first Wgrad has written it. That Wgrad may then write its product
   * instead of adding it (MatmulOptions.accumulateZero: no read of the f32 gradient); any other code
   * that writes `grad` before it must set this false.
   */
  gradZero = true;

  constructor(
    readonly name: string,
    readonly value: Tensor,
    readonly decay: boolean,
    readonly parts?: readonly string[],
    readonly group?: "router",
  ) {
    this.grad = value.backend.zeros(value.shape, "f32");
  }

  static create(b: Backend, { name, init, shape, decay, parts, group }: ParamOptions): Param {
    return new Param(name, b.keep(b.upload(init, shape, "f32")), decay, parts, group);
  }

  zeroGrad(): void {
    this.value.backend.fill(this.grad, 0);
    this.gradZero = true;
  }

  dispose(): void {
    this.value.dispose();
    this.grad.dispose();
  }
}
