// SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts, and,
// with grouped weights, for the routed experts (one grouped GEMM per projection, not one per expert).
import type { GemmPackageName, QuantizeOptions } from "@moe8/fp8-core";
import {
  type Backend,
  type GradQuant,
  intoBf16,
  Linear,
  type LinearPrecision,
  Param,
  type PrecisionTrace,
  type QuantisedGrad,
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

/**
 * [gate; up] stacked along the output rows (per expert for [E, out, in]) from two [.., inter, d]
 * weights: the fused projection's initial weight holds exactly the values the separate gate and up
 * weights would (same draws, same order).
 */
function stackRows(gate: Float32Array, up: Float32Array, matrices: number): Float32Array {
  const n = gate.length / matrices;
  const out = new Float32Array(2 * gate.length);
  for (let e = 0; e < matrices; e++) {
    out.set(gate.subarray(e * n, (e + 1) * n), 2 * e * n);
    out.set(up.subarray(e * n, (e + 1) * n), (2 * e + 1) * n);
  }
  return out;
}

/**
 * The gate and up projections are one Linear, `gate_up_proj` ([2 inter, d], or [E, 2 inter, d]):
 * one GEMM with N = 2 inter for both (one read of x, twice the columns per tile), one Dgrad with
 * K = 2 inter instead of two Dgrads and an add, one Wgrad. Checkpoints still store `gate_proj` and
 * `up_proj` (the weight's two row halves; Param.parts).
 */
export class SwiGluMlp {
  readonly params: Param[] = [];
  readonly gateUp: Linear;
  readonly down: Linear;
  readonly prefix: string;
  readonly pkg: GemmPackageName;
  readonly experts: number;
  private saved: Tensor[] = [];

  constructor(
    readonly b: Backend,
    opts: SwiGluMlpOptions,
  ) {
    const { prefix, hidden: d, intermediate: inter, precision, init, pkg, trace } = opts;
    const E = opts.experts ?? 0;
    this.prefix = prefix;
    this.pkg = pkg;
    this.experts = E;
    // storeBf16: the output in BF16 storage when the policy rounds it to BF16 anyway (see Linear):
    // gate|up always (swiglu reads the codes, backward keeps them), down for the experts (the
    // combine reads BF16; a dense MLP's output is added to f32 tensors).
    const lin = (
      name: string,
      out: number,
      inp: number,
      values: () => Float32Array,
      storeBf16: boolean,
      parts?: string[],
    ) => {
      const shape = E > 0 ? [E, out, inp] : [out, inp];
      const p = Param.create(b, {
        name: `${prefix}.${name}.weight`,
        init: values(),
        shape,
        decay: true,
        parts,
      });
      this.params.push(p);
      return new Linear(p, {
        precision,
        pkg,
        layer: `${prefix}.${name}`,
        trace,
        grouped: E > 0,
        storeBf16,
      });
    };
    const n = Math.max(E, 1) * inter * d;
    this.gateUp = lin("gate_up_proj", 2 * inter, d, () => stackRows(init(n), init(n), Math.max(E, 1)), true, [
      "gate_proj",
      "up_proj",
    ]);
    this.down = lin("down_proj", d, inter, () => init(n), E > 0);
  }

  clearSaved(): void {
    this.saved.length = 0;
    for (const l of [this.gateUp, this.down]) l.clearSaved();
  }

  setPrecision(p: LinearPrecision): void {
    for (const l of [this.gateUp, this.down]) l.precision = p;
  }

  /** Whether the output is rounded to BF16 (so that BF16 storage of it is exact). */
  get outputsBf16(): boolean {
    return this.down.precision.outputs === "bf16";
  }

  /** memo: x's quantised copies shared with other readers of x (see QuantMemo). */
  forward(x: Tensor, offsets: Tensor | null = null, memo: QuantMemo | null = null): Tensor {
    const gu = this.gateUp.forward(x, offsets, memo);
    // Under FP8 SwiGLU hands the down projection its input quantised (never stored in f32), the
    // FP8 copy the projection keeps for backward.
    const hq = this.down.producerQuant();
    const h = hq ? this.b.swigluQuantized(gu, hq) : this.b.swiglu(gu);
    // When the projection rounds its outputs to BF16, BF16 storage keeps gate|up exactly for the
    // backward in half the bytes (the routed experts' [tokens*k, 2 inter] per layer), and swiglu
    // reads the codes directly.
    this.saved.push(
      this.gateUp.precision.outputs === "bf16" && gu.dtype === "f32" ? intoBf16(this.b, gu) : gu,
    );
    if (hq) return this.down.forward(h, offsets, QuantMemo.holding(hq, h));
    const y = this.down.forward(h, offsets);
    if (!this.down.retains(h)) h.dispose(); // backward uses its FP8 copy only
    return y;
  }

  /** How this MLP's producer may hand it its input quantised (Linear.producerQuant), or null. */
  producerQuant(): QuantizeOptions | null {
    return this.gateUp.producerQuant();
  }

  /** Whether a saved forward holds the input `t` itself (see Linear.retains). */
  retains(t: Tensor): boolean {
    return this.gateUp.retains(t);
  }

  /**
   * How the down projection's next backward quantises its gradient (Linear.gradQuant), for a
   * producer that hands it over quantised; null when it does not.
   */
  gradQuant(): GradQuant | null {
    return this.down.gradQuant();
  }

  /** Returns dx, or adds it into `into` (see Linear.backward); dy may come as gradQuant asks. */
  backward(dy: Tensor | QuantisedGrad, into: Tensor | null = null): Tensor {
    const gu = this.saved.pop();
    if (!gu) throw new Error(`${this.prefix}: backward without forward`);
    const dh = this.down.backward(dy);
    // Under FP8, SwiGLU's backward hands gate|up its gradient quantised (no f32 d[g | u]).
    const gq = this.gateUp.gradQuant();
    const dgu = gq ? this.b.swigluBackwardQuantized(dh, gu, gq) : this.b.swigluBackward(dh, gu);
    gu.dispose();
    dh.dispose();
    const dx = this.gateUp.backward(dgu, into);
    if ("dgrad" in dgu) {
      dgu.dgrad.dispose();
      dgu.wgrad.dispose();
    } else dgu.dispose();
    return dx;
  }
}
