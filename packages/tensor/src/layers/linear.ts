// Policy-driven Linear layers (y = x W^T). Each of the three GEMMs (Fprop, Dgrad, Wgrad) runs as
// fp8-core's gemmPlan decides for its role under the package's LinearPrecision: the kernel's
// precision and each operand's quantisation (docs/numerics.md, "The three GEMMs of a Linear"). For
// grouped expert weights Wgrad's 128x1 column tiles restart at each expert's rows. Precision is an
// argument passed to the backend, never a separate code path (docs/runtime.md rule 4).
import {
  describeOperands,
  type GemmPackageName,
  type GemmPlan,
  type GemmRole,
  gemmPlan,
  type LinearPrecision,
  type QuantizeOptions,
} from "@moe8/fp8-core";
import type { Backend, GradQuant, MatmulOptions } from "../backend.ts";
import type { Tensor } from "../tensor.ts";
import type { Param } from "./param.ts";
import type { PrecisionTrace } from "./trace.ts";

export interface LinearOptions {
  precision: LinearPrecision;
  /** The package whose policy the Linear follows, and its layer name, for the precision trace. */
  pkg: GemmPackageName;
  layer: string;
  trace?: PrecisionTrace;
  /** Expert weights [E, out, in] applied to rows grouped by expert (`offsets`) instead of [out, in]. */
  grouped?: boolean;
  /**
   * When the policy rounds outputs to BF16, outputs come back as bf16 tensors: the same values in
   * half the bytes, for consumers that read BF16. Grouped Linears: Fprop's y and Dgrad's dx (unless
   * added into another tensor; the experts' swiglu, combine and permute backward read them). Dense
   * Linears: Fprop's y only (the output head's logits, read by the cross-entropy; a dense MLP's
   * gate|up, read by swiglu).
   */
  storeBf16?: boolean;
}

/** An output gradient its producer handed over already quantised as Linear.gradQuant asked. */
export interface QuantisedGrad {
  /** The Dgrad operand, quantize(dy, gradQuant().dgrad). */
  dgrad: Tensor;
  /** The Wgrad operand, quantize(dy, gradQuant().wgrad). */
  wgrad: Tensor;
}

/**
 * A quantisation as a memo key: under one package policy (one eps) equal keys quantise the same
 * values to the same bits.
 */
function quantKey(q: QuantizeOptions | null): string {
  return q ? `${q.group}/${q.format}/${q.unit ? 1 : 0}/${q.pow2Scales ? 1 : 0}` : "";
}

interface Saved {
  x: Tensor | null;
  xq: Tensor | null;
  wq: Tensor | null;
  wqKey: string;
  offsets: Tensor | null;
  memo: QuantMemo | null;
}

/**
 * Low-precision copies of one input shared by the Linears that read it (gate and up, q and kv_a):
 * under FP8 the input is quantised once in forward and its Wgrad column tiles are made once in
 * backward; under BF16 it is rounded once. The copies are the same values either way; sharing saves
 * the second pass over the same bytes. Create one per input per forward and pass it to each Linear
 * that reads that input.
 */
export class QuantMemo {
  private readonly m = new Map<string, Tensor>();
  /** The memoised copy for `key`, or make() (then remembered). */
  get(key: string, make: () => Tensor): Tensor {
    let t = this.m.get(key);
    if (!t || t.disposed) {
      t = make();
      this.m.set(key, t);
    }
    return t;
  }

  /**
   * The input quantised as `opts` for Fprop, as a Linear given this memo looks it up, or make()
   * (then remembered): a caller that already holds that quantisation (the MoE layer's permuted
   * copy of its quantised tokens) hands it to the Linear this way.
   */
  fprop(opts: QuantizeOptions, make: () => Tensor): Tensor {
    return this.get(fpropKey(opts), make);
  }

  /**
   * A memo holding `copy` as the input quantised for Fprop as `opts`: what a producer that made the
   * copy itself (Linear.producerQuant) passes with it.
   */
  static holding(opts: QuantizeOptions, copy: Tensor): QuantMemo {
    const memo = new QuantMemo();
    memo.fprop(opts, () => copy);
    return memo;
  }
}

function fpropKey(q: QuantizeOptions): string {
  return `fprop ${quantKey(q)}`;
}

/** get() through a memo when there is one. */
function memoised(memo: QuantMemo | null, key: string, make: () => Tensor): Tensor {
  return memo ? memo.get(key, make) : make();
}

/**
 * A dense Linear (one weight [out, in]) or a grouped expert Linear (weight [E, out, in], rows of x
 * grouped by expert with `offsets`). Activations saved by forward live in the step's arena.
 */
export class Linear {
  private saved: Saved[] = [];
  precision: LinearPrecision;
  readonly pkg: GemmPackageName;
  readonly layer: string;
  readonly trace: PrecisionTrace | undefined;
  readonly grouped: boolean;
  readonly storeBf16: boolean;
  /** The weight's BF16 copy shared by the GEMMs inside withWeightCopy, else null. */
  private weightBf16: Tensor | null = null;

  constructor(
    readonly weight: Param,
    opts: LinearOptions,
  ) {
    this.precision = opts.precision;
    this.pkg = opts.pkg;
    this.layer = opts.layer;
    this.trace = opts.trace;
    this.grouped = opts.grouped ?? false;
    this.storeBf16 = opts.storeBf16 ?? false;
  }

  private get b(): Backend {
    return this.weight.value.backend;
  }

  /** How the `role` GEMM runs under the current policy, recorded in the precision trace. */
  private plan(role: GemmRole): GemmPlan {
    const plan = gemmPlan(role, this.precision);
    this.trace?.record({
      pkg: this.pkg,
      layer: this.layer,
      role,
      precision: plan.precision,
      operands: describeOperands(plan) || undefined,
    });
    return plan;
  }

  /**
   * Runs fn with the weight cast to BF16 once for all of fn's BF16 GEMMs, instead of once per GEMM
   * (the output head's row chunks: one cast of the [vocab, d] weight a step instead of two a chunk).
   * The copy is made in the caller's arena and released after fn; under a policy whose Fprop does
   * not read a BF16 weight, fn runs as is.
   */
  withWeightCopy<T>(fn: () => T): T {
    const plan = gemmPlan("fprop", this.precision);
    if (this.weightBf16 || plan.kernel !== "bf16" || plan.a.quant || plan.b.quant) return fn();
    this.weightBf16 = this.b.cast(this.weight.value, "bf16");
    try {
      return fn();
    } finally {
      this.b.release(this.weightBf16);
      this.weightBf16 = null;
    }
  }

  /** The weight in BF16: the shared copy, or a new one the caller releases (see dropCopy). */
  private bf16Weight(): Tensor {
    return this.weightBf16 ?? this.b.cast(this.weight.value, "bf16");
  }

  /** Releases a weight copy bf16Weight made for one GEMM (not the shared one, nor the weight). */
  private dropCopy(w: Tensor): void {
    if (w !== this.weightBf16 && w !== this.weight.value) this.b.release(w);
  }

  /** y = a w^T (Fprop) or dy w (Dgrad), with BF16 storage where `storeBf16` allows it. */
  private mm(
    a: Tensor,
    w: Tensor,
    offsets: Tensor | null,
    o: MatmulOptions,
    role: "fprop" | "dgrad",
  ): Tensor {
    const storeBf16 = this.storeBf16 && !!o.outBf16 && !o.accumulate && (this.grouped || role === "fprop");
    if (!this.grouped) return this.b.matmul(a, w, storeBf16 ? { ...o, storeBf16 } : o);
    return this.b.groupedMatmul(a, w, offsets!, { ...o, segment: "m", storeBf16 });
  }

  /**
   * Whether backward reads its gradient in BF16 only (Dgrad and Wgrad both BF16 GEMMs): a producer
   * may then hand it over as a bf16 tensor (the cross-entropy's dlogits), saving the rounded copy.
   */
  readsGradInBf16(): boolean {
    const dg = gemmPlan("dgrad", this.precision);
    const quantised = !!(dg.a.quant && dg.b.quant);
    return !quantised && dg.kernel === "bf16" && this.precision.wgrad.precision === "bf16";
  }

  /**
   * How the next backward (the last saved forward's) quantises its output gradient for Dgrad and
   * for Wgrad (a grouped Linear's Wgrad restarting at that forward's expert offsets), when both are
   * FP8 GEMMs reading dy only through those copies; else null. A producer that can emit them
   * without an f32 dy (the MoE combine's and SwiGLU's backward) passes them to backward as a
   * QuantisedGrad. Nothing is recorded in the trace.
   */
  gradQuant(): GradQuant | null {
    const s = this.saved[this.saved.length - 1];
    return s ? this.gradQuantFor(s.offsets) : null;
  }

  private gradQuantFor(offsets: Tensor | null): GradQuant | null {
    const dg = gemmPlan("dgrad", this.precision);
    const wg = gemmPlan("wgrad", this.precision);
    if (!dg.a.quant || !dg.b.quant || !wg.a.quant || !wg.b.quant || this.trace?.flow.enabled) return null;
    const seg = this.grouped && wg.a.quant.group === "column-tile" ? (offsets ?? undefined) : undefined;
    return { dgrad: dg.a.quant, wgrad: { ...wg.a.quant, segments: seg } };
  }

  /**
   * How Fprop quantises this Linear's input when backward keeps only that FP8 copy (so the input
   * itself is never read after Fprop), or null. Nothing is recorded in the trace.
   */
  fp8InputOnly(): QuantizeOptions | null {
    const plan = gemmPlan("fprop", this.precision);
    if (!plan.a.quant || !plan.b.quant || this.precision.cacheActivations !== "fp8") return null;
    return plan.a.quant;
  }

  /**
   * How a producer of this Linear's input (RMSNorm, SwiGLU) may hand it over already quantised
   * (Backend.rmsnormQuantized, swigluQuantized: no f32 copy made only to be quantised): the 1x128
   * tiles Fprop reads, when backward keeps only that copy and FP8 range counting, which compares the
   * copy with the f32 input, is off; else null. The producer passes the copy as x, with a memo
   * holding it (QuantMemo.fprop), and does not release it: it is this Linear's saved input.
   */
  producerQuant(): QuantizeOptions | null {
    const q = this.fp8InputOnly();
    return q && q.group === "tile" && !q.segments && !this.trace?.flow.enabled ? q : null;
  }

  /**
   * x: the input; with a memo, the copies other Linears reading the same input made (or will
   * use), looked up before quantising or rounding x again.
   */
  forward(x: Tensor, offsets: Tensor | null = null, memo: QuantMemo | null = null): Tensor {
    const b = this.b;
    const pol = this.precision;
    const plan = this.plan("fprop");
    const layout = { transA: plan.a.trans, transB: plan.b.trans };
    const out = pol.outputs === "bf16";
    const xqOpt = plan.a.quant;
    const wqOpt = plan.b.quant;
    let y: Tensor;
    const s: Saved = { x, xq: null, wq: null, wqKey: "", offsets, memo };
    if (xqOpt && wqOpt) {
      s.xq = memoised(memo, fpropKey(xqOpt), () => b.quantize(x, xqOpt));
      this.trace?.flow.add(b, x, s.xq);
      s.wq = b.quantize(this.weight.value, wqOpt);
      s.wqKey = quantKey(wqOpt);
      y = this.mm(
        s.xq,
        s.wq,
        offsets,
        { ...layout, precision: plan.kernel, outBf16: out, promotion: pol.promotion },
        "fprop",
      );
      if (pol.cacheActivations === "fp8") s.x = null; // keep only the FP8 copy, as DeepSeek-V3 does
    } else if (plan.kernel === "bf16") {
      // One BF16 copy of x serves this GEMM, the other Linears reading x (memo) and Wgrad, which
      // then keeps it instead of x: the same values at half the bytes, rounded once.
      const xb = memoised(memo, "bf16", () => b.cast(x, "bf16"));
      const wb = this.bf16Weight();
      y = this.mm(xb, wb, offsets, { ...layout, precision: "bf16", outBf16: out }, "fprop");
      this.dropCopy(wb);
      if (pol.wgrad.precision === "bf16") s.x = xb;
    } else {
      y = this.mm(
        x,
        this.weight.value,
        offsets,
        { ...layout, precision: plan.kernel, outBf16: out },
        "fprop",
      );
    }
    this.saved.push(s);
    return y;
  }

  /**
   * Accumulates dW into the weight's gradient and returns dx, or adds dx into `into` (the Dgrad
   * GEMM accumulates there: no separate dx and addInto when several branches read one input).
   * dy may come quantised as gradQuant asks (QuantisedGrad).
   */
  backward(grad: Tensor | QuantisedGrad, into: Tensor | null = null): Tensor {
    const s = this.saved.pop();
    if (!s) throw new Error(`${this.layer}: backward without a saved forward`);
    const given = "dgrad" in grad ? grad : null;
    if (given) {
      const gq = this.gradQuantFor(s.offsets);
      if (gq?.dgrad.group !== given.dgrad.quant?.group || gq?.wgrad.group !== given.wgrad.quant?.group)
        throw new Error(`${this.layer}: a quantised gradient that is not the one gradQuant() asks for`);
    }
    // With a QuantisedGrad only its two copies are read (the FP8 branches below); dy stands in.
    let dy = given ? given.dgrad : (grad as Tensor);
    const b = this.b;
    const pol = this.precision;
    const out = pol.outputs === "bf16";

    // Dgrad: dx = dy W (W stored [out, in] is B without transposition).
    const dg = this.plan("dgrad");
    const dgLayout = { transA: dg.a.trans, transB: dg.b.trans };
    const dyQ = dg.a.quant;
    const wQ = dg.b.quant;
    let dx: Tensor;
    let dyb: Tensor | null = null;
    if (dyQ && wQ) {
      const wq = s.wq && s.wqKey === quantKey(wQ) ? s.wq : b.quantize(this.weight.value, wQ);
      const dyq = given ? given.dgrad : b.quantize(dy, dyQ);
      if (!given) this.trace?.flow.add(b, dy, dyq);
      dx = this.mm(
        dyq,
        wq,
        s.offsets,
        {
          ...dgLayout,
          precision: dg.kernel,
          outBf16: out,
          promotion: pol.promotion,
          accumulate: into ?? undefined,
        },
        "dgrad",
      );
    } else {
      // dy rounded to BF16 once when both Dgrad and Wgrad read it in BF16 (unless it came so).
      const bf16 = dg.kernel === "bf16";
      if (bf16 && pol.wgrad.precision === "bf16" && dy.dtype !== "bf16") dy = dyb = b.cast(dy, "bf16");
      const w = bf16 ? this.bf16Weight() : this.weight.value;
      dx = this.mm(
        dy,
        w,
        s.offsets,
        { ...dgLayout, precision: dg.kernel, outBf16: out, accumulate: into ?? undefined },
        "dgrad",
      );
      this.dropCopy(w);
    }

    // Wgrad: dW += dy^T x, reduced over tokens (per expert for grouped weights).
    const wg = this.plan("wgrad");
    const segments = this.grouped ? (s.offsets ?? undefined) : undefined;
    const gQ = wg.a.quant;
    const xQ = wg.b.quant;
    const o: MatmulOptions = {
      transA: wg.a.trans,
      transB: wg.b.trans,
      precision: wg.kernel,
      accumulate: this.weight.grad,
      // The step's first Wgrad into a cleared gradient may write instead of add (Param.gradZero).
      accumulateZero: this.weight.gradZero,
    };
    this.weight.gradZero = false;
    if (gQ && xQ) {
      const seg = gQ.group === "column-tile" ? segments : undefined;
      const dyq = given ? given.wgrad : b.quantize(dy, { ...gQ, segments: seg });
      if (!given) this.trace?.flow.add(b, dy, dyq);
      // With only the FP8 cache saved, its values are quantised again in column tiles (fused on a
      // device backend: the f32 activation is never rebuilt).
      const xo = { ...xQ, segments: seg };
      const xq = memoised(s.memo, `wgrad ${quantKey(xQ)} ${seg ? "segments" : ""}`, () =>
        s.x ? b.quantize(s.x, xo) : b.requantize(s.xq!, xo),
      );
      if (this.grouped)
        b.groupedMatmul(dyq, xq, s.offsets!, { ...o, promotion: pol.promotion, segment: "k" });
      else b.matmul(dyq, xq, { ...o, promotion: pol.promotion });
    } else {
      const x = s.x ?? b.dequantize(s.xq!);
      if (this.grouped) b.groupedMatmul(dy, x, s.offsets!, { ...o, segment: "k" });
      else b.matmul(dy, x, o);
      if (x !== s.x) b.release(x);
    }
    if (dyb) b.release(dyb);
    return dx;
  }

  /**
   * Whether a saved forward holds `t` itself (not only its FP8 copy): a caller that is done with
   * an input may release it when no layer retains it.
   */
  retains(t: Tensor): boolean {
    return this.saved.some((s) => s.x === t);
  }

  /** Drops saved activations (e.g. after an evaluation-only forward). */
  clearSaved(): void {
    this.saved.length = 0;
  }
}
