// The DeepSeek-style MoE transformer (docs/model.md) with explicit forward and backward, written once
// against the Backend interface. Layer l < first_k_dense_replace has a dense SwiGLU FFN, the rest
// DeepSeekMoE. Every Linear follows the precision policy of the package it belongs to.
import { type AttentionPrecision, MLA } from "@moe8/attention";
import type { PrecisionPolicy } from "@moe8/fp8-core";
import { MoELayer, SwiGluMlp } from "@moe8/moe-layers";
import {
  type Backend,
  type Collectives,
  Linear,
  type NoiseOptions,
  Param,
  PrecisionTrace,
  QuantMemo,
  Rng,
  type Tensor,
} from "@moe8/tensor";
import { type ModelConfig, mtpLossWeight } from "./config.ts";

/**
 * Rows of logits computed at once by the loss: only one chunk's [rows, vocab] logits and their
 * gradient exist at a time (for small, 16,384 x 32,768 f32 would be 2 GiB each). A batch of at most
 * this many tokens (tiny's 2,048) is one chunk, the plain unchunked computation.
 */
export const LOSS_CHUNK_ROWS = 4096;

/** One checkpoint tensor: `shape`'s values from `offset` in a model tensor. */
export interface NamedTensor {
  name: string;
  tensor: Tensor;
  shape: number[];
  offset: number;
}

/** A forward's losses, one-element tensors: cross-entropy, total, and the MTP loss (null without MTP). */
export interface StepLosses {
  ce: Tensor;
  total: Tensor;
  mtp: Tensor | null;
}

export interface BatchShape {
  batch: number;
  seq: number;
}

interface Block {
  ln1: Param;
  attn: MLA;
  ln2: Param;
  mlp: SwiGluMlp | MoELayer;
}

interface Saved {
  hs: Tensor[];
  rstd1: Tensor[];
  rstd2: Tensor[];
  mids: Tensor[];
  hFinal: Tensor;
  rstdF: Tensor;
  ids: Tensor;
}

/**
 * DeepSeek-V3's multi-token prediction module of depth 1 (docs/model.md, "Multi-token prediction"):
 * position i's last hidden state and the embedding of token i + 1, each normalised, concatenated
 * and projected back to d (eh_proj), then one more transformer block and its own final norm ahead
 * of the shared output head, which predicts token i + 2.
 */
interface MtpModule {
  enorm: Param;
  hnorm: Param;
  ehProj: Linear;
  block: Block;
  norm: Param;
}

/** What the MTP module's backward needs from its forward. */
interface MtpSaved {
  /** Embeddings of tokens i + 1 (the targets) and the trunk's last hidden states (not owned). */
  e: Tensor;
  hLast: Tensor;
  rstdE: Tensor;
  rstdH: Tensor;
  /** The block's activations; hFinal/rstdF: the block's output and its final norm's rstd. */
  block: Saved;
}

function attentionPrecision(p: PrecisionPolicy): AttentionPrecision {
  return { linear: p.attention, core: p.attention.outputs === "f32" ? "f32" : "bf16" };
}

export class DeepSeekModel {
  readonly params: Param[] = [];
  readonly embed: Param;
  readonly blocks: Block[] = [];
  /**
   * The parameters in the order the backward pass finishes their gradients: the final norm and the
   * head, each block from the last to the first, the embedding (the buckets `lossAndGrad`'s
   * `onGrads` is called with).
   */
  readonly gradBuckets: Param[][] = [];
  readonly norm: Param;
  readonly head: Linear;
  readonly trace = new PrecisionTrace();
  /** The multi-token prediction module (num_nextn_predict_layers 1), else null. */
  readonly mtp: MtpModule | null = null;
  private saved: Saved | null = null;
  private mtpSaved: MtpSaved | null = null;

  /** The expert-parallel group of the MoE layers (null: each holds all its experts). */
  readonly expertGroup: Collectives | null;
  /**
   * The ranks holding the same experts as this one (one per expert-parallel group), when the
   * experts are split over part of the data-parallel ranks: trainStep sums the experts' gradients
   * over them. Null when the expert-parallel group is every rank, or there is none.
   */
  readonly expertReplicas: Collectives | null;

  /**
   * `expertGroup`: the routed experts of every MoE layer split over this group (MoELayer's
   * `expertGroup`); the model then trains through `lossAndGradExpertParallel`. `expertReplicas`:
   * with `expertGroup` part of the data-parallel ranks, the ranks of the other expert groups that
   * hold this rank's experts (see the field).
   */
  constructor(
    readonly b: Backend,
    readonly cfg: ModelConfig,
    public policy: PrecisionPolicy,
    seed: number,
    opts: { expertGroup?: Collectives; expertReplicas?: Collectives } = {},
  ) {
    this.expertGroup = opts.expertGroup && opts.expertGroup.size > 1 ? opts.expertGroup : null;
    this.expertReplicas =
      this.expertGroup && opts.expertReplicas && opts.expertReplicas.size > 1 ? opts.expertReplicas : null;
    const expertGroup = this.expertGroup ?? undefined;
    const rng = new Rng(seed);
    const std = cfg.initializer_range;
    const init = (n: number) => rng.normals(n, std);
    const d = cfg.hidden_size;
    const ones = (n: number) => new Float32Array(n).fill(1);
    // Weights are drawn from rng in this order (embedding, then layer by layer, then the head): the
    // same seed gives the same weights.
    this.embed = Param.create(b, {
      name: "model.embed_tokens.weight",
      init: rng.normals(cfg.vocab_size * d, cfg.embedding_init_std),
      shape: [cfg.vocab_size, d],
      decay: true,
    });
    this.params.push(this.embed);
    const norm = (name: string) => Param.create(b, { name, init: ones(d), shape: [d], decay: false });
    for (let l = 0; l < cfg.num_hidden_layers; l++) {
      const blk = this.buildBlock(cfg, policy, l, init, rng, norm, expertGroup);
      this.blocks.push(blk);
      this.params.push(...blockParams(blk));
    }
    this.norm = norm("model.norm.weight");
    const headW = Param.create(b, {
      name: "lm_head.weight",
      init: init(cfg.vocab_size * d),
      shape: [cfg.vocab_size, d],
      decay: true,
    });
    // Logits in BF16 storage when the policy rounds outputs to BF16 (the cross-entropy reads them).
    this.head = new Linear(headW, {
      precision: policy.model,
      pkg: "model",
      layer: "lm_head",
      trace: this.trace,
      storeBf16: true,
    });
    this.params.push(this.norm, headW);
    if ((cfg.num_nextn_predict_layers ?? 0) > 0) {
      // Drawn after the head: a config with MTP has the same weights as one without, plus its own.
      const mtp = this.buildMtp(cfg, policy, init, rng, norm, expertGroup);
      this.mtp = mtp;
      this.params.push(mtp.enorm, mtp.hnorm, mtp.ehProj.weight, ...blockParams(mtp.block), mtp.norm);
    }
    const g = this.expertGroup;
    this.expertSplit = g
      ? { rank: g.rank, size: g.size, params: new Set(this.moeLayers.flatMap((m) => m.experts.params)) }
      : null;
    // The MTP module's backward runs before the trunk's: its gradients are final right after the
    // head's and the final norm's.
    const m = this.mtp;
    this.gradBuckets.push(
      [this.norm, headW],
      ...(m ? [[m.norm, ...blockParams(m.block), m.ehProj.weight, m.enorm, m.hnorm]] : []),
      ...this.blocks.map(blockParams).reverse(),
      [this.embed],
    );
  }

  /** Transformer block l: attention, and a dense MLP before first_k_dense_replace, MoE after. */
  private buildBlock(
    cfg: ModelConfig,
    policy: PrecisionPolicy,
    l: number,
    init: (n: number) => Float32Array,
    rng: Rng,
    norm: (name: string) => Param,
    expertGroup: Collectives | undefined,
  ): Block {
    const b = this.b;
    const trace = this.trace;
    const p = `model.layers.${l}`;
    const ln1 = norm(`${p}.input_layernorm.weight`);
    const attn = new MLA(b, {
      cfg,
      prefix: `${p}.self_attn`,
      precision: attentionPrecision(policy),
      init,
      trace,
    });
    const ln2 = norm(`${p}.post_attention_layernorm.weight`);
    const moe = { prefix: `${p}.mlp`, precision: policy["moe-layers"], init, trace };
    const mlp =
      l < cfg.first_k_dense_replace
        ? new SwiGluMlp(b, {
            ...moe,
            hidden: cfg.hidden_size,
            intermediate: cfg.intermediate_size,
            pkg: "moe-layers",
          })
        : new MoELayer(b, {
            ...moe,
            cfg,
            routerInit: (n) => rng.normals(n, cfg.router_init_std ?? cfg.initializer_range),
            expertGroup,
          });
    return { ln1, attn, ln2, mlp };
  }

  /** The MTP module, named as DeepSeek-V3's checkpoints name it: layer num_hidden_layers. */
  private buildMtp(
    cfg: ModelConfig,
    policy: PrecisionPolicy,
    init: (n: number) => Float32Array,
    rng: Rng,
    norm: (name: string) => Param,
    expertGroup: Collectives | undefined,
  ): MtpModule {
    const b = this.b;
    const d = cfg.hidden_size;
    const l = cfg.num_hidden_layers;
    const p = `model.layers.${l}`;
    const enorm = norm(`${p}.enorm.weight`);
    const hnorm = norm(`${p}.hnorm.weight`);
    // eh_proj follows the model package's policy, as the output head does (docs/model.md).
    const ehW = Param.create(b, {
      name: `${p}.eh_proj.weight`,
      init: init(d * 2 * d),
      shape: [d, 2 * d],
      decay: true,
    });
    const ehProj = new Linear(ehW, {
      precision: policy.model,
      pkg: "model",
      layer: "eh_proj",
      trace: this.trace,
    });
    const block = this.buildBlock(cfg, policy, l, init, rng, norm, expertGroup);
    return { enorm, hnorm, ehProj, block, norm: norm(`${p}.shared_head.norm.weight`) };
  }

  /** Switches precision policy (all packages) without touching the weights. */
  setPolicy(policy: PrecisionPolicy): void {
    this.policy = policy;
    for (const blk of this.allBlocks) {
      blk.attn.setPrecision(attentionPrecision(policy));
      blk.mlp.setPrecision(policy["moe-layers"]);
    }
    this.head.precision = policy.model;
    if (this.mtp) this.mtp.ehProj.precision = policy.model;
    this.trace.clear();
  }

  /** The trunk's blocks, then the MTP module's (layer num_hidden_layers) when there is one. */
  private get allBlocks(): Block[] {
    return this.mtp ? [...this.blocks, this.mtp.block] : this.blocks;
  }

  /** Every MoE layer: the trunk's, then the MTP module's (routed, balanced and counted like them). */
  get moeLayers(): MoELayer[] {
    return this.allBlocks.map((b) => b.mlp).filter((m): m is MoELayer => m instanceof MoELayer);
  }

  /**
   * Under expert parallelism, the parameters split over the group (each MoE layer's stacked expert
   * weights, expert-major), as the optimiser takes them (AdamW's `split`); null otherwise.
   */
  readonly expertSplit: { rank: number; size: number; params: Set<Param> } | null;

  /** The layer number of each of `moeLayers` (the dense layers come first; the MTP module's is num_hidden_layers). */
  get moeLayerNumbers(): number[] {
    return this.allBlocks.flatMap((b, l) => (b.mlp instanceof MoELayer ? [l] : []));
  }

  /** Logits [B*T, V] (f32) for token ids [B*T] (i32). Activations for backward are saved. */
  forward(ids: Tensor, shape: BatchShape): Tensor {
    return this.logits(this.trunk(ids, shape));
  }

  /** head(y) as an f32 tensor (the head stores BF16 logits when its policy rounds to BF16). */
  logits(y: Tensor): Tensor {
    const l = this.head.forward(y);
    if (l.dtype === "f32") return l;
    const f = this.b.cast(l, "f32");
    this.b.release(l);
    return f;
  }

  /**
   * Router noise for the next training forwards (null: none): `o.seed` is the step's, mixed here with
   * each MoE layer's index; `o.rowOffset` the first token's index in the step's whole batch.
   */
  setRouterNoise(o: NoiseOptions | null, table: Tensor | null = null): void {
    this.moeLayers.forEach((m, i) => {
      m.noise =
        o && o.scale > 0
          ? { ...o, seed: layerNoiseSeed(o.seed, i), ...(table ? { params: { table, row: i } } : {}) }
          : null;
    });
  }

  /**
   * The router noise of `o` as a table, a row per MoE layer (its seed, the scale's f32 bits): what
   * `setRouterNoise(o, table)` has the layers read on the device, so that a recorded step draws each
   * step's noise (StepRunner rewrites the table before each replay).
   */
  routerNoiseTable(o: { seed: number; scale: number }): Int32Array {
    const bits = new Int32Array(new Float32Array([o.scale]).buffer)[0];
    return Int32Array.from(this.moeLayers.flatMap((_, i) => [layerNoiseSeed(o.seed, i), bits]));
  }

  /** The final normalised hidden states [B*T, d] (the head's input); saves what backward needs. */
  private trunk(ids: Tensor, shape: BatchShape, gradScale = 1): Tensor {
    const s = this.trunkStart(ids);
    let h = s.hFinal;
    for (const blk of this.blocks) {
      const r = this.blockForward(blk, h, s, shape);
      h = "h" in r ? r.h : this.moeDone(r, r.moe.forward(r.x, shape.batch, shape.seq, gradScale, r.mid));
    }
    return this.trunkEnd(h, s);
  }

  /** trunk with expert-parallel MoE layers (awaited: each exchanges its tokens with the group). */
  private async trunkExpertParallel(ids: Tensor, shape: BatchShape, gradScale = 1): Promise<Tensor> {
    const s = this.trunkStart(ids);
    let h = s.hFinal;
    for (const blk of this.blocks) {
      const r = this.blockForward(blk, h, s, shape);
      h =
        "h" in r
          ? r.h
          : this.moeDone(r, await r.moe.forwardExpertParallel(r.x, shape.batch, shape.seq, gradScale, r.mid));
    }
    return this.trunkEnd(h, s);
  }

  /** The embedding, and what the trunk saves (hFinal holds the embedding until trunkEnd). */
  private trunkStart(ids: Tensor): Saved {
    const h = this.b.embedding(this.embed.value, ids);
    return { hs: [], rstd1: [], rstd2: [], mids: [], hFinal: h, rstdF: h, ids };
  }

  private trunkEnd(h: Tensor, s: Saved): Tensor {
    const nf = this.b.rmsnorm(h, this.norm.value, this.cfg.rms_norm_eps);
    s.hFinal = h;
    s.rstdF = nf.rstd;
    this.saved = s;
    return nf.y;
  }

  /** After a MoE layer's forward: its input freed unless the layer keeps it; its output is h. */
  private moeDone(r: { moe: MoELayer; x: Tensor }, h: Tensor): Tensor {
    if (!r.moe.retains(r.x)) r.x.dispose();
    return h;
  }

  /**
   * One block's forward up to its MLP: the block's output h for a dense MLP, or for a MoE layer its
   * input x and the residual `mid` its combine adds (the caller runs the layer, sync or awaited).
   */
  private blockForward(
    blk: Block,
    h: Tensor,
    s: Saved,
    shape: BatchShape,
  ): { h: Tensor } | { moe: MoELayer; x: Tensor; mid: Tensor } {
    const b = this.b;
    const eps = this.cfg.rms_norm_eps;
    s.hs.push(h);
    // Under FP8 the norm hands the attention's projections their input quantised (no f32 copy
    // made only to be quantised); they keep that copy for backward.
    const aq = blk.attn.producerQuant();
    let ao: Tensor;
    if (aq) {
      const n1 = b.rmsnormQuantized(h, blk.ln1.value, eps, aq);
      s.rstd1.push(n1.rstd);
      ao = blk.attn.forward(n1.y, shape, QuantMemo.holding(aq, n1.y));
    } else {
      const n1 = b.rmsnorm(h, blk.ln1.value, eps);
      s.rstd1.push(n1.rstd);
      // Branch outputs and inputs nothing saves are released as soon as they are consumed, not at
      // the end of the step (with FP8 activation caching, layers keep only the FP8 copies).
      ao = blk.attn.forward(n1.y, shape);
      if (!blk.attn.retains(n1.y)) n1.y.dispose(); // the projections keep FP8 copies only
    }
    const mid = b.add(h, ao);
    ao.dispose();
    s.mids.push(mid);
    // A dense MLP takes its input quantised from the norm as the attention does; the MoE router
    // reads the f32 output.
    const dense = blk.mlp instanceof MoELayer ? null : blk.mlp;
    const mq = dense?.producerQuant();
    if (dense && mq) {
      const n2 = b.rmsnormQuantized(mid, blk.ln2.value, eps, mq);
      s.rstd2.push(n2.rstd);
      const y = dense.forward(n2.y, null, QuantMemo.holding(mq, n2.y));
      const out = b.add(mid, y);
      y.dispose();
      return { h: out };
    }
    const n2 = b.rmsnorm(mid, blk.ln2.value, eps);
    s.rstd2.push(n2.rstd);
    // The MoE combine adds the residual as it writes the block's output.
    if (blk.mlp instanceof MoELayer) return { moe: blk.mlp, x: n2.y, mid };
    const y = blk.mlp.forward(n2.y);
    if (!blk.mlp.retains(n2.y)) n2.y.dispose();
    const out = b.add(mid, y);
    y.dispose();
    return { h: out };
  }

  /** Backpropagates d(logits) (and releases it), accumulating every parameter's gradient. */
  backward(dlogits: Tensor): void {
    const dn = this.head.backward(dlogits);
    dlogits.dispose();
    this.backwardTrunk(dn);
  }

  /**
   * Mean cross-entropy of head(y) against targets, `LOSS_CHUNK_ROWS` rows of logits at a time, and
   * (withGrad) d(loss)/dy with the head's weight gradient accumulated. Only one chunk's logits and
   * their gradient exist at once: for small (16,384 x 32,768 f32) the whole would be 2 GiB each.
   */
  private headLoss(
    y: Tensor,
    targets: Tensor,
    withGrad: boolean,
    gradScale = 1,
  ): { loss: Tensor; dy: Tensor | null } {
    const b = this.b;
    const N = y.rows;
    // The head's weight cast to BF16 once for every chunk's Fprop and Dgrad (under a BF16 head).
    return this.head.withWeightCopy(() => {
      // One chunk: its mean cross-entropy, and (withGrad) d(mean over all N rows)/d(rows) of y.
      if (N <= LOSS_CHUNK_ROWS) {
        const r = this.headChunk(y, targets, gradScale, withGrad);
        return { loss: r.loss, dy: r.dyc };
      }
      const dy = withGrad ? b.zeros(y.shape) : null;
      const chunks: [number, number][] = [];
      for (let r0 = 0; r0 < N; r0 += LOSS_CHUNK_ROWS) chunks.push([r0, Math.min(LOSS_CHUNK_ROWS, N - r0)]);
      const loss = this.sumChunks(N, chunks, (r0, n) => {
        const r = this.headChunk(b.rows(y, r0, n), b.rows(targets, r0, n), (n / N) * gradScale, withGrad);
        if (r.dyc) b.setRows(dy!, r0, r.dyc);
        return r.loss;
      });
      return { loss, dy };
    });
  }

  /**
   * One chunk of rows through the head: its mean cross-entropy against tc, and (withGrad) d(logits)
   * times `gradScale` taken back through the head (its weight gradient accumulated).
   */
  private headChunk(
    yc: Tensor,
    tc: Tensor,
    gradScale: number,
    withGrad: boolean,
  ): { loss: Tensor; dyc: Tensor | null } {
    const logits = this.head.forward(yc);
    if (!withGrad) this.head.clearSaved();
    // dlogits in BF16 when the head's backward reads it so anyway (BF16 Dgrad and Wgrad).
    const ce = this.b.crossEntropy(logits, tc, gradScale, withGrad && this.head.readsGradInBf16());
    logits.dispose();
    const dyc = withGrad ? this.head.backward(ce.dlogits) : null;
    ce.dlogits.dispose();
    return { loss: ce.loss, dyc };
  }

  /**
   * The mean over N rows of the losses `run` returns for each chunk [row, n] (each a mean over its
   * n rows), every chunk in its own arena: its temporaries (logits, their gradient, the head's
   * copies) go with it, its share of the loss, the chunk's mean times n / N, leaves it.
   */
  private sumChunks(N: number, chunks: [number, number][], run: (row: number, n: number) => Tensor): Tensor {
    const b = this.b;
    let loss: Tensor | null = null;
    for (const [row, n] of chunks) {
      const kept = b.scope(() => b.keep(b.scale(run(row, n), n / N)));
      const share = b.copy(kept); // in the caller's arena, like every other result
      b.release(kept);
      loss = loss ? b.add(loss, share) : share;
    }
    return loss!;
  }

  /**
   * The MTP loss: mean cross-entropy of head(y) at every position but each sequence's last against
   * the token two ahead (targets one row on), weighted by mtp_loss_weight in the gradient (not in
   * the returned mean); d(loss)/dy with the head's weight gradient accumulated. Row chunks of at most
   * `LOSS_CHUNK_ROWS`, none crossing a sequence's end; the rows without a target get no gradient.
   */
  private mtpHeadLoss(
    y: Tensor,
    targets: Tensor,
    shape: BatchShape,
    withGrad: boolean,
    gradScale: number,
  ): { loss: Tensor; dy: Tensor | null } {
    const b = this.b;
    const T = shape.seq;
    if (T < 2) throw new Error("model: multi-token prediction needs sequences of at least 2 tokens");
    const N = shape.batch * (T - 1);
    const w = mtpLossWeight(this.cfg);
    const dy = withGrad ? b.zeros(y.shape) : null;
    const chunks: [number, number][] = [];
    for (let s = 0; s < shape.batch; s++)
      for (let r0 = 0; r0 < T - 1; r0 += LOSS_CHUNK_ROWS)
        chunks.push([s * T + r0, Math.min(LOSS_CHUNK_ROWS, T - 1 - r0)]);
    const loss = this.head.withWeightCopy(() =>
      this.sumChunks(N, chunks, (row, n) => {
        const r = this.headChunk(
          b.rows(y, row, n),
          b.rows(targets, row + 1, n),
          (n / N) * gradScale * w,
          withGrad,
        );
        if (r.dyc) b.setRows(dy!, row, r.dyc);
        return r.loss;
      }),
    );
    return { loss, dy };
  }

  /**
   * The MTP module's forward up to its block's MLP (the caller runs a MoE layer, sync or awaited):
   * [enorm(embed(t_{i+1})) | hnorm(h_i)] through eh_proj, h_i the trunk's last hidden states
   * (before its final norm), as DeepSeek-V3's inference code concatenates them.
   */
  private mtpStart(
    targets: Tensor,
    shape: BatchShape,
  ): { h: Tensor } | { moe: MoELayer; x: Tensor; mid: Tensor } {
    const b = this.b;
    const m = this.mtp!;
    const eps = this.cfg.rms_norm_eps;
    const s = this.saved;
    if (!s) throw new Error("model: the MTP module's forward without the trunk's");
    const e = b.embedding(this.embed.value, targets);
    const en = b.rmsnorm(e, m.enorm.value, eps);
    const hn = b.rmsnorm(s.hFinal, m.hnorm.value, eps);
    const c = b.headConcat(en.y, hn.y, 1, 1);
    en.y.dispose();
    hn.y.dispose();
    const x = m.ehProj.forward(c);
    if (!m.ehProj.retains(c)) c.dispose();
    const block: Saved = { hs: [], rstd1: [], rstd2: [], mids: [], hFinal: x, rstdF: x, ids: targets };
    this.mtpSaved = { e, hLast: s.hFinal, rstdE: en.rstd, rstdH: hn.rstd, block };
    return this.blockForward(m.block, x, block, shape);
  }

  /** After the MTP block (its output h): its own final norm (shared_head.norm), the head's input. */
  private mtpEnd(h: Tensor): Tensor {
    const ms = this.mtpSaved!;
    const nf = this.b.rmsnorm(h, this.mtp!.norm.value, this.cfg.rms_norm_eps);
    ms.block.hFinal = h;
    ms.block.rstdF = nf.rstd;
    return nf.y;
  }

  /** The MTP module's backward from d(its head input) (released) up to its block's MLP: d(block output). */
  private mtpBackwardStart(dy: Tensor): Tensor {
    const ms = this.mtpSaved!;
    const m = this.mtp!;
    const fin = this.b.rmsnormBackward(dy, ms.block.hFinal, m.norm.value, ms.block.rstdF, {
      dw: m.norm.grad,
    });
    dy.dispose();
    return fin.dx;
  }

  /**
   * The rest of the MTP module's backward (dMlp: d(the block's MLP input)): the block's norms and
   * attention, eh_proj, the two norms; the embedding's gradient accumulated, d(h_i) added into dh.
   */
  private mtpBackwardEnd(dBlock: Tensor, dMlp: Tensor, dh: Tensor): void {
    const b = this.b;
    const ms = this.mtpSaved!;
    const m = this.mtp!;
    this.mtpSaved = null;
    this.blockBackwardRest(m.block, ms.block, 0, dBlock, dMlp);
    const dc = m.ehProj.backward(dBlock);
    const d = this.cfg.hidden_size;
    const half = (start: number) => b.headSlice(dc, { heads: 1, width: 2 * d, start, len: d });
    const [den, dhn] = [half(0), half(d)];
    dc.dispose();
    const de = b.rmsnormBackward(den, ms.e, m.enorm.value, ms.rstdE, { dw: m.enorm.grad }).dx;
    b.embeddingBackward(this.embed.grad, de, ms.block.ids);
    b.rmsnormBackward(dhn, ms.hLast, m.hnorm.value, ms.rstdH, { dx: dh, dw: m.hnorm.grad });
  }

  /**
   * Backpropagates d(final normalised hidden states) (and releases it) through the MTP module's
   * backward (when given) and the blocks; calls `onGrads` with each of `gradBuckets` once its
   * gradients are final (the head's were made before).
   */
  private backwardTrunk(dn: Tensor, onGrads?: (params: Param[]) => void, mtpDy?: Tensor): void {
    const b = this.b;
    const { s, dh } = this.backwardStart(dn, onGrads);
    if (mtpDy) {
      b.scope(() => {
        const dBlock = this.mtpBackwardStart(mtpDy);
        this.mtpBackwardEnd(dBlock, this.mtp!.block.mlp.backward(dBlock), dh);
      });
      onGrads?.(this.gradBuckets[1]);
    }
    // Each block's backward runs in its own arena: its temporaries (activation gradients, FP8
    // copies) are freed before the next block's, instead of all living to the end of the step.
    // Only dh and the parameter gradients (both accumulated in place) outlive it.
    const first = this.mtp ? 2 : 1;
    for (let l = this.blocks.length - 1; l >= 0; l--) {
      b.scope(() => {
        this.blockBackwardRest(this.blocks[l], s, l, dh, this.blocks[l].mlp.backward(dh));
      });
      onGrads?.(this.gradBuckets[first + this.blocks.length - 1 - l]);
    }
    this.backwardEnd(s, dh, onGrads);
  }

  /** backwardTrunk with expert-parallel MoE layers (awaited: each exchanges gradients with the group). */
  private async backwardTrunkExpertParallel(
    dn: Tensor,
    onGrads?: (params: Param[]) => void,
    mtpDy?: Tensor,
  ): Promise<void> {
    const b = this.b;
    const { s, dh } = this.backwardStart(dn, onGrads);
    const mlpBackward = async (mlp: SwiGluMlp | MoELayer, dy: Tensor) =>
      mlp instanceof MoELayer ? await mlp.backwardExpertParallel(dy) : mlp.backward(dy);
    if (mtpDy) {
      await b.scope(async () => {
        const dBlock = this.mtpBackwardStart(mtpDy);
        this.mtpBackwardEnd(dBlock, await mlpBackward(this.mtp!.block.mlp, dBlock), dh);
      });
      onGrads?.(this.gradBuckets[1]);
    }
    const first = this.mtp ? 2 : 1;
    for (let l = this.blocks.length - 1; l >= 0; l--) {
      const blk = this.blocks[l];
      await b.scope(async () => {
        this.blockBackwardRest(blk, s, l, dh, await mlpBackward(blk.mlp, dh));
      });
      onGrads?.(this.gradBuckets[first + this.blocks.length - 1 - l]);
    }
    this.backwardEnd(s, dh, onGrads);
  }

  /** The final norm's backward: the saved forward and d(h), which every block updates in place. */
  private backwardStart(dn: Tensor, onGrads?: (params: Param[]) => void): { s: Saved; dh: Tensor } {
    const s = this.saved;
    if (!s) throw new Error("model: backward without forward");
    this.saved = null;
    // Norm weight gradients and the residual's gradient are accumulated by the norms' backward.
    const fin = this.b.rmsnormBackward(dn, s.hFinal, this.norm.value, s.rstdF, { dw: this.norm.grad });
    dn.dispose();
    onGrads?.(this.gradBuckets[0]);
    return { s, dh: fin.dx }; // dh in the caller's arena (the step's)
  }

  /** Block blk's backward after its MLP's (dy: d(MLP input)), its activations entry i of s: the norms' and the attention's. */
  private blockBackwardRest(blk: Block, s: Saved, i: number, dh: Tensor, dy: Tensor): void {
    const b = this.b;
    // dh becomes d(mid): the residual plus the FFN branch.
    b.rmsnormBackward(dy, s.mids[i], blk.ln2.value, s.rstd2[i], { dx: dh, dw: blk.ln2.grad });
    const da = blk.attn.backward(dh);
    b.rmsnormBackward(da, s.hs[i], blk.ln1.value, s.rstd1[i], { dx: dh, dw: blk.ln1.grad });
  }

  private backwardEnd(s: Saved, dh: Tensor, onGrads?: (params: Param[]) => void): void {
    this.b.embeddingBackward(this.embed.grad, dh, s.ids);
    onGrads?.(this.gradBuckets[this.gradBuckets.length - 1]);
  }

  /**
   * Forward + backward of the mean token cross-entropy (plus the MoE balance losses and, with an
   * MTP module, mtp_loss_weight times its loss), accumulating gradients. Returns the cross-entropy,
   * the total loss and the MTP loss (null without MTP) as one-element tensors (not read).
   * `gradScale` multiplies the gradients (not the returned losses): 1/K for one of K equal
   * micro-batches of a step, so that their gradients sum to the whole batch's mean. `onGrads` is
   * called with each of `gradBuckets` as soon as the backward pass has finished its gradients (a
   * data-parallel step starts their reduction there, while the rest of the backward pass runs).
   */
  lossAndGrad(
    ids: Tensor,
    targets: Tensor,
    shape: BatchShape,
    gradScale = 1,
    onGrads?: (params: Param[]) => void,
  ): StepLosses {
    const main = this.mainLoss(this.trunk(ids, shape, gradScale), targets, gradScale);
    let mtp: { loss: Tensor; dy: Tensor | null } | null = null;
    if (this.mtp) {
      const r = this.mtpStart(targets, shape);
      const h =
        "h" in r ? r.h : this.moeDone(r, r.moe.forward(r.x, shape.batch, shape.seq, gradScale, r.mid));
      mtp = this.mtpLoss(this.mtpEnd(h), targets, shape, true, gradScale);
    }
    this.backwardTrunk(main.dy, onGrads, mtp?.dy ?? undefined);
    return this.losses(main.loss, mtp?.loss ?? null, this.moeLayers);
  }

  /** The head's loss and d(y) of the trunk's output y (released). */
  private mainLoss(y: Tensor, targets: Tensor, gradScale: number): { loss: Tensor; dy: Tensor } {
    const { loss, dy } = this.headLoss(y, targets, true, gradScale);
    y.dispose();
    return { loss, dy: dy! };
  }

  /** mtpHeadLoss of the MTP module's head input y (released). */
  private mtpLoss(
    y: Tensor,
    targets: Tensor,
    shape: BatchShape,
    withGrad: boolean,
    gradScale: number,
  ): { loss: Tensor; dy: Tensor | null } {
    const r = this.mtpHeadLoss(y, targets, shape, withGrad, gradScale);
    y.dispose();
    return r;
  }

  /** The step's losses: the total adds the MTP loss (weighted) and `moe`'s balance losses to ce. */
  private losses(ce: Tensor, mtp: Tensor | null, moe: MoELayer[]): StepLosses {
    let total = mtp ? this.b.add(ce, this.b.scale(mtp, mtpLossWeight(this.cfg))) : ce;
    for (const m of moe) if (m.lastBalanceLoss) total = this.b.add(total, m.lastBalanceLoss);
    return { ce, total, mtp };
  }

  /** lossAndGrad with the MoE layers' experts split over `expertGroup` (every rank calls it). */
  async lossAndGradExpertParallel(
    ids: Tensor,
    targets: Tensor,
    shape: BatchShape,
    gradScale = 1,
    onGrads?: (params: Param[]) => void,
  ): Promise<StepLosses> {
    if (!this.expertGroup) throw new Error("model: lossAndGradExpertParallel without an expert group");
    const main = this.mainLoss(await this.trunkExpertParallel(ids, shape, gradScale), targets, gradScale);
    let mtp: { loss: Tensor; dy: Tensor | null } | null = null;
    if (this.mtp) {
      const r = this.mtpStart(targets, shape);
      const h =
        "h" in r
          ? r.h
          : this.moeDone(r, await r.moe.forwardExpertParallel(r.x, shape.batch, shape.seq, gradScale, r.mid));
      mtp = this.mtpLoss(this.mtpEnd(h), targets, shape, true, gradScale);
    }
    await this.backwardTrunkExpertParallel(main.dy, onGrads, mtp?.dy ?? undefined);
    return this.losses(main.loss, mtp?.loss ?? null, this.moeLayers);
  }

  /**
   * Mean cross-entropy (and with the balance losses and the weighted MTP loss, the total; the MTP
   * loss apart) without keeping anything for backward.
   */
  evalLoss(ids: Tensor, targets: Tensor, shape: BatchShape): StepLosses {
    const y = this.trunk(ids, shape);
    let mtp: Tensor | null = null;
    if (this.mtp) {
      const r = this.mtpStart(targets, shape);
      const h = "h" in r ? r.h : this.moeDone(r, r.moe.forward(r.x, shape.batch, shape.seq, 1, r.mid));
      mtp = this.mtpLoss(this.mtpEnd(h), targets, shape, false, 1).loss;
    }
    this.clearSaved();
    const ce = this.headLoss(y, targets, false).loss;
    return this.losses(ce, mtp, this.moeLayers);
  }

  clearSaved(): void {
    this.saved = null;
    this.mtpSaved = null;
    this.head.clearSaved();
    this.mtp?.ehProj.clearSaved();
    for (const blk of this.allBlocks) {
      blk.attn.clearSaved();
      blk.mlp.clearSaved();
    }
  }

  zeroGrad(): void {
    for (const p of this.params) p.zeroGrad();
  }

  /**
   * Every tensor by its checkpoint name (docs/model.md) with its checkpoint shape: each is a
   * contiguous range of one model tensor, from `offset`. Stacked expert weights [E, out, in] are
   * listed per expert as `...experts.{e}.{proj}.weight`; a fused weight (Param.parts, e.g.
   * `gate_up_proj`) as its parts, each a block of every matrix's rows; the correction biases are
   * included.
   */
  namedTensors(): NamedTensor[] {
    return this.namedTensorsOf(
      this.params.map((p) => ({ param: p, tensor: p.value, rank: this.expertGroup?.rank ?? 0 })),
    );
  }

  /**
   * namedTensors over given tensors of the parameters (`tensor`: the parameter's value or a copy of
   * the same shape, `rank`: the expert-parallel rank whose experts a stacked expert tensor holds,
   * which names them by their index in the whole layer).
   */
  private namedTensorsOf(list: { param: Param; tensor: Tensor; rank: number }[]): NamedTensor[] {
    const out: NamedTensor[] = [];
    for (const { param: p, tensor, rank } of list) {
      const m = /^(.*)\.(\w+)\.weight$/.exec(p.name);
      const stacked = m !== null && p.value.shape.length === 3 && m[1].endsWith(".experts");
      if (!m || (!stacked && !p.parts)) {
        out.push({ name: p.name, tensor, shape: [...p.value.shape], offset: 0 });
        continue;
      }
      const parts = p.parts ?? [m[2]];
      const [rows, cols] = p.value.shape.slice(-2);
      const partRows = rows / parts.length;
      const e0 = stacked ? rank * p.value.shape[0] : 0; // the first expert's index in the layer
      for (let e = 0; e < (stacked ? p.value.shape[0] : 1); e++)
        parts.forEach((part, j) => {
          out.push({
            name: stacked ? `${m[1]}.${e0 + e}.${part}.weight` : `${m[1]}.${part}.weight`,
            tensor,
            shape: [partRows, cols],
            offset: (e * rows + j * partRows) * cols,
          });
        });
    }
    for (const m of this.moeLayers)
      out.push({
        name: `${m.prefix}.gate.e_score_correction_bias`,
        tensor: m.bias,
        shape: [...m.bias.shape],
        offset: 0,
      });
    return out.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  /**
   * Host copies of every checkpoint tensor (ranges cut from the stacked and fused weights). With
   * the experts split over `expertGroup`, every rank of the group must call it: each rank's experts
   * are broadcast to all, so that every rank returns the whole model, as one process names it.
   */
  async stateDict(): Promise<Map<string, { shape: number[]; data: Float32Array }>> {
    // (In an arena of its own: the gathered experts' device copies go with it.)
    return this.b.scope(async () => {
      const out = new Map<string, { shape: number[]; data: Float32Array }>();
      const cache = new Map<Tensor, Float32Array>();
      for (const { name, tensor, shape, offset } of await this.wholeNamedTensors()) {
        let all = cache.get(tensor);
        if (!all) {
          all = (await tensor.read()) as Float32Array;
          cache.set(tensor, all);
        }
        const n = shape.reduce((x, y) => x * y, 1);
        out.set(name, { shape, data: n === all.length ? all : all.slice(offset, offset + n) });
      }
      return out;
    });
  }

  /** namedTensors of the whole model: under expert parallelism every rank's experts gathered. */
  private async wholeNamedTensors(): Promise<NamedTensor[]> {
    const g = this.expertGroup;
    const experts = this.expertSplit?.params;
    if (!g || !experts) return this.namedTensors();
    const list: { param: Param; tensor: Tensor; rank: number }[] = [];
    const roots: number[] = [];
    for (const p of this.params) {
      if (!experts.has(p)) {
        list.push({ param: p, tensor: p.value, rank: g.rank });
        continue;
      }
      for (let q = 0; q < g.size; q++) {
        list.push({
          param: p,
          tensor: q === g.rank ? this.b.copy(p.value) : this.b.zeros(p.value.shape),
          rank: q,
        });
        roots.push(q);
      }
    }
    const gathered = list.filter((x) => experts.has(x.param));
    await g.broadcast(
      gathered.map((x) => x.tensor),
      roots,
    );
    return this.namedTensorsOf(list);
  }

  /**
   * Loads weights by checkpoint name; a missing or misshapen tensor is an error naming it. Under
   * expert parallelism each rank loads its own experts (by their index in the whole layer).
   */
  loadStateDict(get: (name: string) => { shape: number[]; data: Float32Array } | undefined): void {
    const joined = new Map<Tensor, Float32Array>();
    for (const { name, tensor, shape, offset } of this.namedTensors()) {
      const t = get(name);
      if (!t) throw new Error(`checkpoint: tensor ${name} is missing`);
      if (t.shape.join(",") !== shape.join(","))
        throw new Error(`checkpoint: tensor ${name} has shape [${t.shape}], the model wants [${shape}]`);
      let buf = joined.get(tensor);
      if (!buf) {
        buf = new Float32Array(tensor.size);
        joined.set(tensor, buf);
      }
      buf.set(t.data, offset);
    }
    for (const [tensor, buf] of joined) this.b.write(tensor, buf);
  }

  dispose(): void {
    this.trace.flow.dispose();
    for (const p of this.params) p.dispose();
    for (const m of this.moeLayers) m.bias.dispose();
  }
}

/** A block's parameters in the model's order. */
function blockParams(k: Block): Param[] {
  return [k.ln1, ...k.attn.params, k.ln2, ...k.mlp.params];
}

/** Layer i's noise seed from the step's (each MoE layer draws its own noise). */
function layerNoiseSeed(seed: number, layer: number): number {
  return (Math.imul(seed ^ 0x5bd1e995, 31) + layer * 0x27d4eb2f) | 0;
}
