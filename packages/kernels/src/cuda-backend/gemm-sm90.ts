// The Hopper grouped FP8 GEMM (gemm_sm90.cu: TMA loads, mbarrier ring, wgmma, persistent CTAs over
// the experts' tiles) for the experts' Fprop and Dgrad on a compute-capability-9.0 GPU. It takes
// E4M3 x E4M3 with 1x128 activation tiles and 128x128 weight blocks, promotion 128, both operands
// K-contiguous; gemm.ts asks it first and falls back to the mma.sync kernels of gemm.cu for
// anything else (Wgrad's column tiles, E5M2 operands, other GPUs, MOE8_SM90_GEMM=0).
// Numerics: wgmma keeps ~14 bits while it sums FP8 products inside one instruction, so results
// differ from the reference's exact chunked sums by ~2.5e-4 relative (packages/kernels/notes/sm90-gemm.md).
import type { Fp8Format, QuantGroup } from "@moe8/fp8-core";
import { DEFINES, KERNELS } from "../cuda/kernels.generated.ts";
import type { CudaContext } from "./context.ts";

const SM90 = DEFINES.gemm_sm90;

/** Which kernels run the grouped FP8 GEMMs (Fprop, Dgrad) of the experts, and why. */
export interface GroupedGemmPath {
  kernel: "sm90-wgmma" | "mma.sync";
  reason: string;
}

/**
 * The grouped-GEMM path on a GPU of this compute capability (e.g. "9.0") under the environment:
 * the wgmma kernels on sm_90 unless MOE8_SM90_GEMM=0, the mma.sync kernels elsewhere.
 */
export function groupedGemmPath(
  computeCapability: string | null | undefined,
  env: Record<string, string | undefined> = process.env,
): GroupedGemmPath {
  if (computeCapability !== "9.0")
    return {
      kernel: "mma.sync",
      reason: `compute capability ${computeCapability ?? "unknown"}: wgmma needs 9.0 (sm_90a)`,
    };
  if (env.MOE8_SM90_GEMM === "0") return { kernel: "mma.sync", reason: "MOE8_SM90_GEMM=0" };
  return {
    kernel: "sm90-wgmma",
    reason: "sm_90a: TMA + wgmma for E4M3 Fprop/Dgrad (1x128 x 128x128); Wgrad and E5M2 on mma.sync",
  };
}

/** The operands of a grouped GEMM with segments along M, both K-contiguous (after gemm.ts's Dgrad transpose). */
export interface Sm90Operands {
  a: number;
  aScales: number;
  aFormat: Fp8Format;
  aGroup: QuantGroup;
  /** [E, N, K] codes and [E, ceil(N/128), ceil(K/128)] scales. */
  b: number;
  bScales: number;
  bFormat: Fp8Format;
  bGroup: QuantGroup;
  c: number;
  offsets: number;
  /** Rows of A and C (all experts). */
  M: number;
  N: number;
  K: number;
  E: number;
  promotion: number;
  accumulate: boolean;
  outBf16: boolean;
}

/** Why these operands cannot take the sm90 kernels, or null when they can. */
export function sm90Refusal(o: Sm90Operands): string | null {
  if (o.aFormat !== "e4m3" || o.bFormat !== "e4m3") return "operands not E4M3 x E4M3";
  if (o.aGroup !== "tile" || o.bGroup !== "block") return "not 1x128 tiles x 128x128 blocks";
  if (o.promotion !== 128) return "promotion is not 128";
  if (o.K % 16 !== 0) return "K % 16 != 0 (TMA row pitch)";
  if (o.N % 8 !== 0) return "N % 8 != 0";
  if (o.E < 1 || o.E > SM90.SM90_MAX_E) return `E outside 1..${SM90.SM90_MAX_E}`;
  if (o.a % 16 !== 0 || o.b % 16 !== 0 || o.c % 16 !== 0) return "an operand is not 16-byte aligned";
  return null;
}

/**
 * Enqueues C (+)= A B_e^T over the experts' row segments with gemm_sm90.cu when the GPU and the
 * operands allow it; returns false (nothing enqueued) otherwise.
 */
export function sm90Grouped(cx: CudaContext, o: Sm90Operands): boolean {
  if (!cx.sm90Gemm || sm90Refusal(o) !== null) return false;
  // 128 x 256 tiles when K is long enough to amortise them; 128 x 128 with two accumulator sets for
  // short K (K = 256: two chunks per tile), as measured in notes/sm90-gemm.md.
  const wide = o.K >= 512;
  const kernel = wide
    ? KERNELS.gemm_sm90.gemm_sm90_fp8_grouped_128x256
    : KERNELS.gemm_sm90.gemm_sm90_fp8_grouped_128x128;
  const bn = wide ? 256 : 128;
  const map = cx.n.cudaTensorMap2D;
  let maps: { tA: Uint8Array; tB: Uint8Array; tC: Uint8Array };
  try {
    maps = {
      tA: map(o.a, "u8", o.K, o.M, 128, SM90.SM90_BM),
      tB: map(o.b, "u8", o.K, o.E * o.N, 128, bn),
      tC: map(o.c, "f32", o.N, o.M, 32, 64),
    };
  } catch {
    // The driver refused a tensor map (its rules are the last word on them): the mma.sync kernels
    // take any GEMM of this layout. The op suite checks that the model's shapes do run here.
    return false;
  }
  cx.launch(
    kernel,
    [cx.multiprocessors],
    SM90.SM90_THREADS,
    {
      ...maps,
      As: o.aScales,
      Bs: o.bScales,
      C: o.c,
      off: o.offsets,
      E: o.E,
      N: o.N,
      K: o.K,
      accumulate: o.accumulate ? 1 : 0,
      outBf16: o.outBf16 ? 1 : 0,
    },
    wide ? SM90.SM90_SMEM_128x256 : SM90.SM90_SMEM_128x128,
  );
  return true;
}
