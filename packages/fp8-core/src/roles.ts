// Which GEMM role quantises what (docs/numerics.md, "The three GEMMs of a Linear"). A Linear
// y = x W^T runs three GEMMs, and this module is the one place that turns a package's
// LinearPrecision into the way each of them runs: Linear (@moe8/tensor) asks gemmPlan before every
// GEMM and records the plan in the precision trace, so what --trace-precision prints is what ran.
//   fprop  y  = x W^T   A = x  1x128 tiles                  B = W 128x128 blocks (stored [out, in]: transB)
//   dgrad  dx = dy W    A = dy 1x128 tiles                  B = W 128x128 blocks
//   wgrad  dW = dy^T x  A = dy 128x1 column tiles (transA)  B = x 128x1 column tiles
// Formats: the role's GemmSpec.format for A, and under fprop for B too; W in dgrad and x in wgrad
// stay E4M3. fp8-tensorwise gives every operand one plain amax scale per tensor (pow2Scales and eps
// are not applied) and fp8-unscaled a scale fixed at 1; f32 and bf16 quantise nothing.

import type { Fp8Format } from "./formats.ts";
import type { MatmulPrecision } from "./gemm.ts";
import {
  type GemmPrecision,
  type GemmRole,
  type GemmSpec,
  isFp8Precision,
  type LinearPrecision,
} from "./policy.ts";
import type { QuantGroup, QuantizeOptions } from "./quantize.ts";

/** The tensors a Linear's GEMMs read: x [T, in], W [out, in], dy [T, out]. */
export type GemmOperandName = "x" | "w" | "dy";

/** One operand of a planned GEMM. */
export interface GemmOperand {
  tensor: GemmOperandName;
  /** The GEMM reads the tensor as stored, transposed: transA for operand A, transB for B. */
  trans: boolean;
  /** How the tensor is quantised before the GEMM; null when the role does not run in FP8. */
  quant: QuantizeOptions | null;
}

/** How one GEMM of a Linear runs: C = op(A) op(B). */
export interface GemmPlan {
  role: GemmRole;
  /** The role's precision in the policy. */
  precision: GemmPrecision;
  /** The kernel that computes it: the three fp8 precisions all run the FP8 GEMM. */
  kernel: MatmulPrecision;
  a: GemmOperand;
  b: GemmOperand;
}

interface OperandRule {
  tensor: GemmOperandName;
  /** The recipe's group (the fine-grained `fp8` precision). */
  group: QuantGroup;
  trans: boolean;
  /** Takes the role's format; otherwise E4M3. */
  roleFormat: boolean;
}

const RULES: Record<GemmRole, { a: OperandRule; b: OperandRule }> = {
  fprop: {
    a: { tensor: "x", group: "tile", trans: false, roleFormat: true },
    b: { tensor: "w", group: "block", trans: true, roleFormat: true },
  },
  dgrad: {
    a: { tensor: "dy", group: "tile", trans: false, roleFormat: true },
    b: { tensor: "w", group: "block", trans: false, roleFormat: false },
  },
  wgrad: {
    a: { tensor: "dy", group: "column-tile", trans: true, roleFormat: true },
    b: { tensor: "x", group: "column-tile", trans: false, roleFormat: false },
  },
};

function quantOf(
  spec: GemmSpec,
  group: QuantGroup,
  format: Fp8Format,
  linear: LinearPrecision,
): QuantizeOptions | null {
  switch (spec.precision) {
    case "fp8":
      return { group, format, pow2Scales: linear.pow2Scales, eps: linear.eps };
    case "fp8-tensorwise":
      return { group: "tensor", format };
    case "fp8-unscaled":
      return { group: "tensor", format, unit: true };
    default:
      return null;
  }
}

/** How the `role` GEMM of a Linear under `linear` runs: its kernel and each operand's quantisation. */
export function gemmPlan(role: GemmRole, linear: LinearPrecision): GemmPlan {
  const spec = linear[role];
  const operand = (r: OperandRule): GemmOperand => ({
    tensor: r.tensor,
    trans: r.trans,
    quant: quantOf(spec, r.group, r.roleFormat ? spec.format : "e4m3", linear),
  });
  const kernel: MatmulPrecision = isFp8Precision(spec.precision) ? "fp8" : (spec.precision as "f32" | "bf16");
  return { role, precision: spec.precision, kernel, a: operand(RULES[role].a), b: operand(RULES[role].b) };
}

/** A quantisation in a few characters: `tile/e4m3`, `block/e5m2/pow2`, `tensor/e4m3/unit`. */
export function describeQuant(q: QuantizeOptions): string {
  const flags = `${q.pow2Scales ? "/pow2" : ""}${q.unit ? "/unit" : ""}`;
  return `${q.group}/${q.format ?? "e4m3"}${flags}`;
}

/** The operands of an FP8 plan, e.g. `x tile/e4m3, w block/e4m3`; empty when nothing is quantised. */
export function describeOperands(plan: GemmPlan): string {
  return [plan.a, plan.b]
    .filter((o) => o.quant)
    .map((o) => `${o.tensor} ${describeQuant(o.quant!)}`)
    .join(", ");
}
