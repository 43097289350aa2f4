// A ts backend that records what reaches its quantisation and GEMM kernels, so tests can check that
// a layer ran what the precision policy asked for (the options of every call and the quantisation
// its FP8 operands carry), not only that the numbers came out plausible.
import type { GroupedMatmulOptions, MatmulOptions, QuantizeOptions } from "../backend.ts";
import type { Tensor } from "../tensor.ts";
import { TsBackend } from "../ts/backend.ts";

export interface QuantizeCall {
  op: "quantize" | "requantize";
  group: string;
  format: string;
  pow2Scales: boolean;
  unit: boolean;
  eps: number | undefined;
  /** Column tiles restarted at segment offsets. */
  segments: boolean;
}

export interface GemmCall {
  op: "matmul" | "groupedMatmul";
  precision: string;
  transA: boolean;
  transB: boolean;
  promotion: number | undefined;
  segment?: "m" | "k";
  /** Each operand as the kernel received it: `group/format[/segments]` for FP8, else its dtype. */
  a: string;
  b: string;
}

/** An operand as the kernel sees it. */
function operand(t: Tensor): string {
  const q = t.quant;
  return q ? `${q.group}/${q.format}${q.segments ? "/segments" : ""}` : t.dtype;
}

export class RecordingBackend extends TsBackend {
  readonly quantizeCalls: QuantizeCall[] = [];
  readonly gemmCalls: GemmCall[] = [];
  /** Inside requantize, whose own quantize (via f32) is the same call and is not recorded twice. */
  private nested = 0;

  private recordQuantize(op: QuantizeCall["op"], o: QuantizeOptions): void {
    if (this.nested > 0) return;
    this.quantizeCalls.push({
      op,
      group: o.group,
      format: o.format ?? "e4m3",
      pow2Scales: !!o.pow2Scales,
      unit: !!o.unit,
      eps: o.eps,
      segments: !!o.segments,
    });
  }

  private recordGemm(op: GemmCall["op"], a: Tensor, b: Tensor, o: MatmulOptions, segment?: "m" | "k") {
    this.gemmCalls.push({
      op,
      precision: o.precision,
      transA: !!o.transA,
      transB: !!o.transB,
      promotion: o.promotion,
      ...(segment ? { segment } : {}),
      a: operand(a),
      b: operand(b),
    });
  }

  override quantize(x: Tensor, opts: QuantizeOptions): Tensor {
    this.recordQuantize("quantize", opts);
    return super.quantize(x, opts);
  }

  override requantize(q: Tensor, opts: QuantizeOptions): Tensor {
    this.recordQuantize("requantize", opts);
    this.nested++;
    try {
      return super.requantize(q, opts);
    } finally {
      this.nested--;
    }
  }

  override matmul(a: Tensor, b: Tensor, o: MatmulOptions): Tensor {
    this.recordGemm("matmul", a, b, o);
    return super.matmul(a, b, o);
  }

  override groupedMatmul(a: Tensor, b: Tensor, offsets: Tensor, o: GroupedMatmulOptions): Tensor {
    this.recordGemm("groupedMatmul", a, b, o, o.segment);
    return super.groupedMatmul(a, b, offsets, o);
  }

  clearCalls(): void {
    this.quantizeCalls.length = 0;
    this.gemmCalls.length = 0;
  }
}
