// Policy-driven Linear layers (y = x W^T). Each of the three GEMMs (Fprop, Dgrad, Wgrad) runs in the
// precision its role is given, with the operand quantisation FP8.md prescribes:
//   Fprop  x: 1x128 tiles, W: 128x128 blocks      Dgrad  dy: 1x128 tiles, W: the same blocks
//   Wgrad  dy and x: 128x1 tiles along tokens (restarting at each expert's rows for experts)
// Precision is an argument passed to the backend, never a separate code path (RUNTIME.md rule 4).
import type { Backend, MatmulOptions, QuantizeOptions } from "../backend.ts";
import type { Tensor } from "../tensor.ts";
import type { Fp8Format, QuantGroup } from "../types.ts";
import type { Param } from "./param.ts";
import type { GemmRole, PrecisionTrace } from "./trace.ts";

export type GemmPrecision = "f32" | "bf16" | "fp8" | "fp8-tensorwise" | "fp8-unscaled";

export interface GemmSpec {
  precision: GemmPrecision;
  /** FP8 format of the operand that role quantises afresh (the gradient in Dgrad/Wgrad). */
  format: Fp8Format;
}

export interface LinearPrecision {
  fprop: GemmSpec;
  dgrad: GemmSpec;
  wgrad: GemmSpec;
  /** What Wgrad's x comes from: the FP8 Fprop operand (dequantised, requantised 128x1) or a BF16 copy. */
  cacheActivations: "fp8" | "bf16";
  pow2Scales: boolean;
  promotion: number;
  /** Floor on a group's amax (default 1e-12). */
  eps?: number;
  /** Output type of Fprop and Dgrad GEMMs. */
  outputs: "bf16" | "f32";
}

/** Where a GEMM came from, for the precision trace. */
export interface GemmSite {
  pkg: string;
  layer: string;
  trace?: PrecisionTrace;
}

const isFp8 = (p: GemmPrecision) => p.startsWith("fp8");

/** The quantisation of one operand for a role, or null when the role does not run in FP8. */
export function operandQuant(
  spec: GemmSpec,
  natural: QuantGroup,
  format: Fp8Format,
  pol: LinearPrecision,
): QuantizeOptions | null {
  if (!isFp8(spec.precision)) return null;
  if (spec.precision === "fp8-unscaled") return { group: "tensor", format, unit: true };
  if (spec.precision === "fp8-tensorwise") return { group: "tensor", format };
  return { group: natural, format, pow2Scales: pol.pow2Scales, eps: pol.eps };
}

function gemmPrecision(p: GemmPrecision): MatmulOptions["precision"] {
  return isFp8(p) ? "fp8" : (p as "f32" | "bf16");
}

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

  constructor(
    readonly weight: Param,
    public precision: LinearPrecision,
    readonly site: GemmSite,
    readonly grouped = false,
  ) {}

  private get b(): Backend {
    return this.weight.value.backend;
  }

  private record(role: GemmRole, p: GemmPrecision) {
    this.site.trace?.record({ pkg: this.site.pkg, layer: this.site.layer, role, precision: p });
  }

  private mm(a: Tensor, w: Tensor, offsets: Tensor | null, o: MatmulOptions): Tensor {
    if (this.grouped) return this.b.groupedMatmul(a, w, offsets!, { ...o, segment: "m" });
    return this.b.matmul(a, w, o);
  }

  forward(x: Tensor, offsets: Tensor | null = null, memo: QuantMemo | null = null): Tensor {
    const b = this.b;
    const pol = this.precision;
    const spec = pol.fprop;
    const out = pol.outputs === "bf16";
    this.record("fprop", spec.precision);
    const xqOpt = operandQuant(spec, "tile", spec.format, pol);
    const wqOpt = operandQuant(spec, "block", "e4m3", pol);
    let y: Tensor;
    const s: Saved = { x, xq: null, wq: null, wqKey: "", offsets, memo };
    if (xqOpt && wqOpt) {
      s.xq = memoised(memo, `fprop ${quantKey(xqOpt)}`, () => b.quantize(x, xqOpt));
      this.site.trace?.flow.add(b, x, s.xq);
      s.wq = b.quantize(this.weight.value, wqOpt);
      s.wqKey = quantKey(wqOpt);
      y = this.mm(s.xq, s.wq, offsets, {
        transB: true,
        precision: "fp8",
        outBf16: out,
        promotion: pol.promotion,
      });
      if (pol.cacheActivations === "fp8") s.x = null; // keep only the FP8 copy, as DeepSeek-V3 does
    } else if (spec.precision === "bf16") {
      // One BF16 copy of x serves this GEMM, the other Linears reading x (memo) and Wgrad, which
      // then keeps it instead of x: the same values at half the bytes, rounded once.
      const xb = memoised(memo, "bf16", () => b.cast(x, "bf16"));
      const wb = b.cast(this.weight.value, "bf16");
      y = this.mm(xb, wb, offsets, { transB: true, precision: "bf16", outBf16: out });
      b.release(wb);
      if (pol.wgrad.precision === "bf16") s.x = xb;
    } else {
      y = this.mm(x, this.weight.value, offsets, {
        transB: true,
        precision: gemmPrecision(spec.precision),
        outBf16: out,
      });
    }
    this.saved.push(s);
    return y;
  }

  /**
   * Accumulates dW into the weight's gradient and returns dx, or adds dx into `into` (the Dgrad
   * GEMM accumulates there: no separate dx and addInto when several branches read one input).
   */
  backward(dy: Tensor, into: Tensor | null = null): Tensor {
    const s = this.saved.pop();
    if (!s) throw new Error(`${this.site.layer}: backward without a saved forward`);
    const b = this.b;
    const pol = this.precision;
    const out = pol.outputs === "bf16";

    // Dgrad: dx = dy W (W stored [out, in] is B without transposition).
    const dg = pol.dgrad;
    this.record("dgrad", dg.precision);
    const dyQ = operandQuant(dg, "tile", dg.format, pol);
    const wQ = operandQuant(dg, "block", "e4m3", pol);
    let dx: Tensor;
    let dyb: Tensor | null = null;
    if (dyQ && wQ) {
      const wq = s.wq && s.wqKey === quantKey(wQ) ? s.wq : b.quantize(this.weight.value, wQ);
      const dyq = b.quantize(dy, dyQ);
      this.site.trace?.flow.add(b, dy, dyq);
      dx = this.mm(dyq, wq, s.offsets, {
        precision: "fp8",
        outBf16: out,
        promotion: pol.promotion,
        accumulate: into ?? undefined,
      });
    } else {
      // dy rounded to BF16 once when both Dgrad and Wgrad read it in BF16.
      const bf16 = dg.precision === "bf16";
      if (bf16 && pol.wgrad.precision === "bf16") dy = dyb = b.cast(dy, "bf16");
      const w = bf16 ? b.cast(this.weight.value, "bf16") : this.weight.value;
      dx = this.mm(dy, w, s.offsets, {
        precision: gemmPrecision(dg.precision),
        outBf16: out,
        accumulate: into ?? undefined,
      });
      if (w !== this.weight.value) b.release(w);
    }

    // Wgrad: dW += dy^T x, reduced over tokens (per expert for grouped weights).
    const wg = pol.wgrad;
    this.record("wgrad", wg.precision);
    const segments = this.grouped ? (s.offsets ?? undefined) : undefined;
    const gQ = operandQuant(wg, "column-tile", wg.format, pol);
    const xQ = operandQuant(wg, "column-tile", "e4m3", pol);
    const o: MatmulOptions = {
      transA: true,
      precision: gemmPrecision(wg.precision),
      accumulate: this.weight.grad,
    };
    if (gQ && xQ) {
      const seg = gQ.group === "column-tile" ? segments : undefined;
      const dyq = b.quantize(dy, { ...gQ, segments: seg });
      this.site.trace?.flow.add(b, dy, dyq);
      // With only the FP8 cache saved, its values are quantised again in column tiles (fused on a
      // device backend: the f32 activation is never rebuilt).
      const xo = { ...xQ, segments: seg };
      const xq = memoised(s.memo, `wgrad ${quantKey(xQ)} ${seg ? "segments" : ""}`, () =>
        s.x ? b.quantize(s.x, xo) : b.requantize(s.xq!, xo),
      );
      if (this.grouped)
        b.groupedMatmul(dyq, xq, s.offsets!, {
          ...o,
          precision: "fp8",
          promotion: pol.promotion,
          segment: "k",
        });
      else b.matmul(dyq, xq, { ...o, precision: "fp8", promotion: pol.promotion });
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
