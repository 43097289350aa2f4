// A trainable parameter: the f32 master weight and its f32 gradient, both long-lived, with the
// checkpoint name (MODEL.md) and whether weight decay applies.
import type { Backend } from "../backend.ts";
import type { Tensor } from "../tensor.ts";

export class Param {
  readonly grad: Tensor;

  constructor(
    readonly name: string,
    readonly value: Tensor,
    readonly decay: boolean,
  ) {
    this.grad = value.backend.zeros(value.shape, "f32");
  }

  static create(b: Backend, name: string, init: Float32Array, shape: number[], decay: boolean): Param {
    return new Param(name, b.keep(b.upload(init, shape, "f32")), decay);
  }

  zeroGrad(): void {
    this.value.backend.fill(this.grad, 0);
  }

  dispose(): void {
    this.value.dispose();
    this.grad.dispose();
  }
}
