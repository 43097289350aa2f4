// FP8 range events, counted from x, its codes and their dequantised values (no scale lookup needed:
// a saturated element decodes to exactly FMAX * scale).
import type { Fp8Format } from "@moe8/fp8-core";

const MAX_CODE = { e4m3: 0x7e, e5m2: 0x7b } as const;
/** Half an ulp of the largest value, relative to it (max = 1.75 * 2^e): up to max * (1 + this) a value
 *  rounds to max (464 for E4M3, 61440 for E5M2, ties included); beyond it saturation clipped it. */
const HALF_ULP = { e4m3: 1 / 28, e5m2: 1 / 14 } as const;

export function fp8FlowCounts(
  x: Float32Array,
  codes: Uint8Array,
  deq: Float32Array,
  format: Fp8Format,
): [number, number] {
  let over = 0;
  let under = 0;
  const top = MAX_CODE[format];
  const tol = 1 + HALF_ULP[format];
  for (let i = 0; i < x.length; i++) {
    const v = x[i];
    const c = codes[i] & 0x7f;
    if (!Number.isFinite(v) || (c === top && Math.abs(v) > Math.abs(deq[i]) * tol)) over++;
    else if (v !== 0 && c === 0) under++;
  }
  return [over, under];
}
