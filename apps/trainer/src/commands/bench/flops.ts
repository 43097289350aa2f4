// The FLOP model `bench step` reports model TFLOP/s with, and the GPU ceilings it divides by (MFU).
import { countParams, type ModelConfig } from "@moe8/model";

/** Training FLOPs per token: 6 x active matmul parameters (the embedding lookup is not a GEMM) plus
 *  causal attention (QK^T and PV over T/2 keys on average, x3 for forward and backward). The MTP
 *  module's positions are counted as the trunk's (one fewer a sequence: within 1/seq). */
export function trainFlopsPerToken(c: ModelConfig, seq: number): number {
  const { active } = countParams(c);
  // A multi-token prediction module runs one more attention and the shared head a second time.
  const mtp = c.num_nextn_predict_layers ?? 0;
  const matmul = active - c.vocab_size * c.hidden_size + mtp * c.vocab_size * c.hidden_size;
  const attn =
    3 *
    seq *
    c.num_attention_heads *
    (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) *
    (c.num_hidden_layers + mtp);
  return 6 * matmul + attn;
}

// Dense GEMM ceilings of one NVIDIA H200 in TFLOP/s: the denominators of `bench step`'s
// mfu_vs_fp8_ceiling and mfu_vs_bf16_ceiling on cuda. Both were measured on an H200 with cuBLASLt,
// FP8 with DeepSeek-V3's scaling (1x128 activation tiles, 128x128 weight blocks) and plain BF16, and
// were quoted with the project's GPU performance goals when these benchmarks were added (commit
// ceb51b3); no script in this repository re-measures them. For comparison, `bench gemm --backend
// cuda` on an H200 measured FP8 Fprop 16384x1024x2816 at 807 TFLOP/s (README, "GPU").

/** H200, cuBLASLt FP8 GEMM with 1x128 / 128x128 block scaling (see above). */
export const H200_FP8_GEMM_TFLOPS = 1320;
/** H200, cuBLASLt BF16 GEMM (see above). */
export const H200_BF16_GEMM_TFLOPS = 800;
