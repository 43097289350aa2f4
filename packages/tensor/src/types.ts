// Element types and the host arrays that hold them. The FP8 formats and quantisation groups are
// @moe8/fp8-core's, re-exported for the packages that import them from here.
import type { Fp8Format } from "@moe8/fp8-core";

export type { Fp8Format, QuantGroup } from "@moe8/fp8-core";
export type DType = "f32" | "bf16" | Fp8Format | "i32";
export type HostArray = Float32Array | Uint16Array | Uint8Array | Int32Array;

export const BYTES_PER_ELEMENT: Record<DType, number> = { f32: 4, bf16: 2, e4m3: 1, e5m2: 1, i32: 4 };

/** Whether a tensor of this element type holds FP8 codes (see fp8-core's isFp8Precision for policies). */
export function isFp8(dtype: DType): dtype is Fp8Format {
  return dtype === "e4m3" || dtype === "e5m2";
}

/** Allocates the host array that stores `n` elements of `dtype` (bf16 as raw bits, fp8 as codes). */
export function hostArray(dtype: DType, n: number): HostArray {
  switch (dtype) {
    case "f32":
      return new Float32Array(n);
    case "bf16":
      return new Uint16Array(n);
    case "e4m3":
    case "e5m2":
      return new Uint8Array(n);
    case "i32":
      return new Int32Array(n);
  }
}

export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}
