// SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts, and,
// with grouped weights, for the routed experts (one grouped GEMM per projection, not one per expert).
import type { GemmPackageName } from "@moe8/fp8-core";
import {
  type Backend,
  intoBf16,
  Linear,
  type LinearPrecision,
  Param,
  type PrecisionTrace,
  QuantMemo,
  type Tensor,
} from "@moe8/tensor";

export type InitFn = (n: number) => Float32Array;

export interface SwiGluMlpOptions {
  /** Checkpoint name prefix: the weights are `<prefix>.{gate,up,down}_proj.weight`. */
  prefix: string;
  /** Model width d (input and output). */
  hidden: number;
  /** Width of the gated hidden layer. */
  intermediate: number;
  precision: LinearPrecision;
  init: InitFn;
  /** The package the GEMMs belong to, for the precision trace. */
  pkg: GemmPackageName;
  /**
   * > 0: a grouped MLP of this many experts, weights [E, out, in], run over expert-sorted rows
   * (per-expert checkpoint names are made by the checkpoint writer from the stacked weight).
   */
  experts?: number;
  trace?: PrecisionTrace;
}

export class SwiGluMlp {
  readonly params: Param[] = [];
  readonly gate: Linear;
  readonly up: Linear;
  readonly down: Linear;
  readonly prefix: string;
  readonly pkg: GemmPackageName;
  readonly experts: number;
  private saved: { g: Tensor; u: Tensor }[] = [];

  constructor(
    readonly b: Backend,
    opts: SwiGluMlpOptions,
  ) {
    const { prefix, hidden: d, intermediate: inter, precision, init, pkg, trace } = opts;
    const E = opts.experts ?? 0;
    this.prefix = prefix;
    this.pkg = pkg;
    this.experts = E;
    const lin = (name: string, out: number, inp: number) => {
      const shape = E > 0 ? [E, out, inp] : [out, inp];
      const p = Param.create(b, {
        name: `${prefix}.${name}.weight`,
        init: init(shape.reduce((x, y) => x * y)),
        shape,
        decay: true,
      });
      this.params.push(p);
      return new Linear(p, { precision, pkg, layer: `${prefix}.${name}`, trace, grouped: E > 0 });
    };
    this.gate = lin("gate_proj", inter, d);
    this.up = lin("up_proj", inter, d);
    this.down = lin("down_proj", d, inter);
  }

  clearSaved(): void {
    this.saved.length = 0;
    for (const l of [this.gate, this.up, this.down]) l.clearSaved();
  }

  setPrecision(p: LinearPrecision): void {
    for (const l of [this.gate, this.up, this.down]) l.precision = p;
  }

  /** Whether the output is rounded to BF16 (so that BF16 storage of it is exact). */
  get outputsBf16(): boolean {
    return this.down.precision.outputs === "bf16";
  }

  forward(x: Tensor, offsets: Tensor | null = null): Tensor {
    const memo = new QuantMemo(); // gate and up read the same x: one FP8 copy of it
    const g = this.gate.forward(x, offsets, memo);
    const u = this.up.forward(x, offsets, memo);
    const h = this.b.swiglu(g, u);
    if (this.gate.precision.outputs === "bf16" && this.up.precision.outputs === "bf16") {
      // The projections round their outputs to BF16, so BF16 storage keeps g and u exactly for the
      // backward in half the bytes (the routed experts' pair is 2 x [tokens*k, inter] per layer).
      this.saved.push({ g: intoBf16(this.b, g), u: intoBf16(this.b, u) });
    } else {
      this.saved.push({ g, u });
    }
    const y = this.down.forward(h, offsets);
    if (!this.down.retains(h)) h.dispose(); // backward uses its FP8 copy only
    return y;
  }

  /** Whether a saved forward holds the input `t` itself (see Linear.retains). */
  retains(t: Tensor): boolean {
    return this.gate.retains(t) || this.up.retains(t);
  }

  /** Returns dx, or adds it into `into` (see Linear.backward). */
  backward(dy: Tensor, into: Tensor | null = null): Tensor {
    const s = this.saved.pop();
    if (!s) throw new Error(`${this.prefix}: backward without forward`);
    const dh = this.down.backward(dy);
    const f32 = (t: Tensor) => (t.dtype === "f32" ? t : this.b.cast(t, "f32"));
    const [g, u] = [f32(s.g), f32(s.u)];
    const { dg, du } = this.b.swigluBackward(dh, g, u);
    for (const t of [g, u, s.g, s.u]) t.dispose();
    dh.dispose();
    const dx = this.gate.backward(dg, into);
    this.up.backward(du, dx);
    for (const t of [dg, du]) t.dispose();
    return dx;
  }
}
