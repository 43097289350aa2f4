// What a model and step shape need in memory at the least, checked before anything is allocated or
// written: a config within the schema's bounds can still need far more than the machine has
// (--batch-size 60000), which would otherwise end in an out-of-memory kill after the run folder was
// created. The estimate stays below every peak measured, so it does not refuse a run that fits:
// the f32 master weights and their f32 gradients, the AdamW moments, one chunk of logits with its
// gradient (the loss works 4,096 rows at a time), and twice what backward certainly keeps of each
// layer (its f32 input, q, k and v and SwiGLU's g and u in BF16). Measured peaks hold 3 to 8 times
// that per token (f32 working copies, expert dispatch buffers): the small model at 6,144 tokens on
// the CPU peaks at 9.5 GB where this says 8.7 GB; tiny at 32,768 tokens, 3.8 GB against 0.9 GB.
import { totalmem } from "node:os";
import { UsageError } from "@moe8/fp8-core";
import { loadNative } from "@moe8/kernels";
import { countParams, type ModelConfig } from "@moe8/model";

export interface MemoryNeed {
  /** Weights (and, training, gradients and optimiser moments). */
  state: number;
  activations: number;
  total: number;
  training: boolean;
}

const GiB = 2 ** 30;
const gib = (bytes: number) =>
  bytes < GiB
    ? `${Math.ceil(bytes / 2 ** 20)} MiB`
    : `${(bytes / GiB).toFixed(bytes < 10 * GiB ? 1 : 0)} GiB`;

export function memoryNeed(
  m: ModelConfig,
  shape: { batch: number; seq: number },
  training: { moments: "bf16" | "f32" } | null,
): MemoryNeed {
  const params = countParams(m).total;
  const perParam = training ? 4 + 4 + 2 * (training.moments === "bf16" ? 2 : 4) : 4;
  const tokens = shape.batch * shape.seq;
  const logits = Math.min(tokens, 4096) * m.vocab_size * 4 * (training ? 2 : 1);
  // Per token and layer, what backward certainly keeps: the layer's f32 input, q, k and v in BF16,
  // and SwiGLU's g and u in BF16 for the dense MLP or the k routed and the shared experts.
  const attention =
    m.num_attention_heads * (2 * (m.qk_nope_head_dim + m.qk_rope_head_dim) + m.v_head_dim) * 2;
  const swiglu = (inter: number) => 2 * inter * 2;
  const dense = m.first_k_dense_replace;
  // Evaluation runs the same forward, which keeps the same tensors (measured: tiny's eval peaks
  // at 58 KB a token, its training step at 98 KB).
  // A multi-token prediction module is one more layer (a MoE one past first_k_dense_replace).
  const layers = m.num_hidden_layers + (m.num_nextn_predict_layers ?? 0);
  const denseLayers = Math.min(dense, layers);
  const perToken =
    layers * (m.hidden_size * 4 + attention) +
    denseLayers * swiglu(m.intermediate_size) +
    (layers - denseLayers) * swiglu((m.num_experts_per_tok + m.n_shared_experts) * m.moe_intermediate_size);
  const activations = 2 * tokens * perToken + logits;
  const state = params * perParam;
  return { state, activations, total: state + activations, training: training !== null };
}

/** The memory the backend allocates from: the GPU's for cuda, the machine's otherwise. */
function memoryOf(backend: string): { bytes: number; where: string } | null {
  if (backend !== "cuda") return { bytes: totalmem(), where: "this machine has" };
  const info = loadNative().addon?.cudaInfo?.();
  return info?.totalMemory ? { bytes: info.totalMemory, where: "the GPU has" } : null;
}

/** Refuses a model and step shape whose lower-bound estimate exceeds the backend's memory. */
export function checkMemory(need: MemoryNeed, backend: string, what: string): void {
  const limit = memoryOf(backend);
  if (!limit || need.total <= limit.bytes) return;
  throw new UsageError(
    `${what} needs at least ${gib(need.total)} (${gib(need.state)} of weights${need.training ? ", gradients and optimiser state" : ""}, ${gib(need.activations)} of activations), more than the ${gib(limit.bytes)} ${limit.where}; use a smaller model, --batch-size or --seq-len`,
  );
}
