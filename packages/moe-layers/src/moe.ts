// A DeepSeekMoE layer (docs/model.md): FP32 sigmoid router choosing top-k experts by score + correction
// bias, fine-grained routed SwiGLU experts run as grouped GEMMs over expert-sorted rows, shared
// experts on every token, auxiliary-loss-free balancing (the bias, updated after each step) and the
// complementary sequence-wise balance loss. No token is dropped. Routing never leaves the device.
import type { QuantizeOptions } from "@moe8/fp8-core";
import {
  type Backend,
  type BiasRule,
  type Collectives,
  intoBf16,
  type LinearPrecision,
  type NoiseOptions,
  Param,
  type PermuteResult,
  type PrecisionTrace,
  QuantMemo,
  type Tensor,
} from "@moe8/tensor";
import { combine, dispatch, type ExpertExchange } from "./expert-parallel.ts";
import { type InitFn, SwiGluMlp } from "./mlp.ts";

export interface MoeConfig {
  hidden_size: number;
  moe_intermediate_size: number;
  n_routed_experts: number;
  num_experts_per_tok: number;
  n_shared_experts: number;
  routed_scaling_factor: number;
  /** Bias update speed gamma of the auxiliary-loss-free balancing (0 disables). */
  bias_update_speed: number;
  /**
   * How the bias follows the loads: DeepSeek-V3's `sign` (every bias moves by gamma), or `error`
   * (each moves by gamma times the gap between the expert's share of the step's tokens and k/E).
   */
  bias_update_rule: BiasRule;
  /** Weight of the sequence-wise balance loss (0 disables). */
  seq_aux_alpha: number;
}

export interface LoadStats {
  counts: number[];
  /** Coefficient of variation of the per-expert loads. */
  cv: number;
  /** Largest load over the mean load (1 is perfect balance, E/k: every token to the same k experts). */
  maxOverMean: number;
  /** Experts that received no token. */
  idle: number;
}

export function loadStats(counts: ArrayLike<number>): LoadStats {
  const c = Array.from(counts);
  const mean = c.reduce((a, x) => a + x, 0) / c.length;
  const sd = Math.sqrt(c.reduce((a, x) => a + (x - mean) ** 2, 0) / c.length);
  return {
    counts: c,
    cv: mean > 0 ? sd / mean : 0,
    maxOverMean: mean > 0 ? Math.max(...c) / mean : 0,
    idle: c.filter((x) => x === 0).length,
  };
}

export interface MoELayerOptions {
  cfg: MoeConfig;
  /** Checkpoint name prefix, e.g. `model.layers.1.mlp`. */
  prefix: string;
  /** The `moe-layers` policy: the routed and shared experts' Linears (the router stays f32). */
  precision: LinearPrecision;
  init: InitFn;
  /** The router's initial weights (`init` when absent): the model's router_init_std. */
  routerInit?: InitFn;
  trace?: PrecisionTrace;
  /**
   * Expert parallelism: the group the routed experts are split over. Rank q holds experts
   * [q E/R, (q+1) E/R) (drawn from `init` as the whole layer draws them, so a group holds the one
   * process's weights), and forwardExpertParallel / backwardExpertParallel send each token to its
   * experts' ranks and back (expert-parallel.ts). The router, its bias and the shared experts stay
   * whole on every rank.
   */
  expertGroup?: Collectives;
}

/** What an expert-parallel forward's backward needs of its exchange. */
interface ExpertParallelSaved {
  /** This rank's expert offsets on the host ([E + 1], what dispatch split the rows by). */
  offsets: Int32Array;
}

interface Saved {
  x: Tensor;
  scores: Tensor;
  topIdx: Tensor;
  weights: Tensor;
  slot: Tensor;
  offsets: Tensor;
  ys: Tensor;
  dscores: Tensor | null;
  ep?: ExpertParallelSaved;
}

export class MoELayer {
  readonly params: Param[] = [];
  readonly gate: Param;
  /** e_score_correction_bias: state, not a parameter (no gradient, no weight decay). */
  readonly bias: Tensor;
  readonly experts: SwiGluMlp;
  readonly shared: SwiGluMlp | null;
  private saved: Saved[] = [];
  /** Expert offsets of the last forward (for the bias update and load statistics). */
  lastOffsets: Tensor | null = null;
  /** The balance loss of the last forward ([1], in the step's arena), or null when disabled. */
  lastBalanceLoss: Tensor | null = null;

  readonly cfg: MoeConfig;
  /** Checkpoint name prefix, e.g. `model.layers.1.mlp`. */
  readonly prefix: string;
  readonly trace: PrecisionTrace | undefined;
  /** The expert-parallel group (null: this layer holds every expert). */
  readonly expertGroup: Collectives | null;

  constructor(
    readonly b: Backend,
    opts: MoELayerOptions,
  ) {
    const { cfg, prefix, precision, init, trace, routerInit = init, expertGroup } = opts;
    this.cfg = cfg;
    this.prefix = prefix;
    this.trace = trace;
    const d = cfg.hidden_size;
    const E = cfg.n_routed_experts;
    const R = expertGroup?.size ?? 1;
    if (E % R !== 0) throw new Error(`${prefix}: ${E} experts do not split over ${R} ranks`);
    this.expertGroup = expertGroup && R > 1 ? expertGroup : null;
    // An expert-parallel rank draws every expert's weights, in the order one process does, and
    // keeps its own [rank E/R, (rank+1) E/R) (the stacked weights are expert-major).
    const rank = expertGroup?.rank ?? 0;
    const expertInit: InitFn = R > 1 ? (n) => init(n * R).slice(rank * n, (rank + 1) * n) : init;
    this.gate = Param.create(b, {
      name: `${prefix}.gate.weight`,
      init: routerInit(E * d),
      shape: [E, d],
      decay: true,
      group: "router",
    });
    this.bias = b.keep(b.zeros([E]));
    const mlp = { hidden: d, precision, init, pkg: "moe-layers" as const, trace };
    this.experts = new SwiGluMlp(b, {
      ...mlp,
      init: expertInit,
      prefix: `${prefix}.experts`,
      intermediate: cfg.moe_intermediate_size,
      experts: E / R,
    });
    this.shared =
      cfg.n_shared_experts > 0
        ? new SwiGluMlp(b, {
            ...mlp,
            prefix: `${prefix}.shared_experts`,
            intermediate: cfg.n_shared_experts * cfg.moe_intermediate_size,
          })
        : null;
    this.params.push(this.gate, ...this.experts.params, ...(this.shared?.params ?? []));
  }

  clearSaved(): void {
    this.saved.length = 0;
    this.experts.clearSaved();
    this.shared?.clearSaved();
  }

  setPrecision(p: LinearPrecision): void {
    this.experts.setPrecision(p);
    this.shared?.setPrecision(p);
  }

  /**
   * x: normalised hidden states [B*T, d]; batch/seq are needed by the sequence-wise loss, whose
   * gradient is multiplied by `gradScale` (1/K for one of a step's K micro-batches; the loss itself
   * is not scaled). `residual` (f32 [B*T, d]): returned plus the layer's output, summed by the
   * combine (the block's residual connection without a pass of its own); its gradient is the
   * output's, which the caller already holds.
   */
  /**
   * Expert parallelism: while set, each token exchange (dispatch and combine, forward and backward)
   * is timed with the device synchronised before and after it, the wall time added to what
   * takeExchangeMs returns (the trainer sets it on logged steps only: the synchronisations cost).
   */
  timeExchanges = false;
  private exchangeMs = 0;

  /** The exchanges' milliseconds timed since the last call (see timeExchanges). */
  takeExchangeMs(): number {
    const ms = this.exchangeMs;
    this.exchangeMs = 0;
    return ms;
  }

  /** Runs one token exchange, timed while timeExchanges is set. */
  private async exchange<T>(run: () => Promise<T>): Promise<T> {
    if (!this.timeExchanges) return run();
    const idle = async () => {
      const t = this.b.zeros([1]);
      await t.read(); // (a read waits for everything enqueued before it)
      t.dispose();
    };
    await idle();
    const t0 = performance.now();
    const out = await run();
    await idle();
    this.exchangeMs += performance.now() - t0;
    return out;
  }

  /**
   * The router noise of the next training forwards (set by the model for each step and micro-batch;
   * null: none, as for evaluation and generation).
   */
  noise: NoiseOptions | null = null;

  forward(x: Tensor, batch: number, seq: number, gradScale = 1, residual: Tensor | null = null): Tensor {
    const b = this.b;
    if (this.expertGroup)
      throw new Error(`${this.prefix}: an expert-parallel layer runs forwardExpertParallel`);
    const E = this.cfg.n_routed_experts;
    const { r, dscores } = this.route(x, batch, seq, gradScale);
    const xqOpt = this.quantiseOnce(x);
    const xMemo = new QuantMemo();
    let p: PermuteResult;
    let ys: Tensor;
    if (xqOpt) {
      p = b.moePermute(
        xMemo.fprop(xqOpt, () => b.quantize(x, xqOpt)),
        r.topIdx,
        E,
      );
      // p.xs is the experts' saved FP8 input from here on (their backward's Wgrad reads it).
      ys = this.experts.forward(p.xs, p.offsets, QuantMemo.holding(xqOpt, p.xs));
    } else {
      p = b.moePermute(x, r.topIdx, E);
      ys = this.experts.forward(p.xs, p.offsets);
      if (!this.experts.retains(p.xs)) p.xs.dispose(); // k copies of every token, in f32: freed early
    }
    // The layer's output (plus the residual when given): the combined routed experts, the shared
    // experts' output and the residual summed by the combine itself (no passes of add).
    const shared = this.shared ? this.shared.forward(x, null, xMemo) : null;
    const add = [shared, residual].filter((t): t is Tensor => t !== null);
    const y = b.moeCombine(ys, p.slot, r.weights, add);
    if (shared) b.release(shared);
    // Backward reads ys only for d(weights): when the experts round their outputs to BF16, BF16
    // storage keeps it exactly in half the bytes (k rows of d per token and layer).
    const ysSaved = this.experts.outputsBf16 && ys.dtype === "f32" ? intoBf16(b, ys) : ys;
    this.save(x, r, p, ysSaved, dscores);
    return y;
  }

  /**
   * How the tokens are quantised once for the routed experts, or null. Under FP8 with only the
   * quantised input kept for backward, the tokens are quantised once and their codes and scales
   * permuted (k copies of 1 byte per value instead of 4, and the quantiser reads N rows instead of
   * N k; expert parallelism sends these rows): the same bits as quantising the permuted rows, since
   * 1x128 tiles and row scales never mix rows. The shared expert reuses the same copy of x. FP8
   * range counting (logged steps) measures the permuted f32 rows, so one process keeps the other
   * order then; expert parallelism does not (every rank of the group must send the same kind of
   * rows, and a rank's logging is its own), and counts on the tokens instead (see
   * forwardExpertParallel).
   */
  private quantiseOnce(x: Tensor, expertParallel = false): QuantizeOptions | null {
    const q = this.experts.gateUp.fp8InputOnly();
    const once =
      q !== null &&
      (q.group === "tile" || q.group === "row") &&
      (expertParallel || !this.trace?.flow.enabled) &&
      x.cols % 4 === 0; // (cuda moves FP8 rows as 4-byte words)
    return once ? q : null;
  }

  /**
   * The router (FP32 whatever the policy says: docs/numerics.md, "What stays in higher precision")
   * with its noise while training, and the sequence-wise balance loss (lastBalanceLoss) with its
   * gradient on the scores.
   */
  private route(x: Tensor, batch: number, seq: number, gradScale: number) {
    const b = this.b;
    const { num_experts_per_tok: k, routed_scaling_factor: scaling } = this.cfg;
    const logits = b.matmul(x, this.gate.value, { transB: true, precision: "f32" });
    // Router noise while training (docs/model.md, "Balancing"): it moves the scores, so the choice
    // of experts and their weights, and the backward differentiates at the noisy logits.
    if (this.noise && this.noise.scale > 0) b.addUniformNoise(logits, this.noise);
    this.trace?.record({ pkg: "moe-layers", layer: `${this.prefix}.gate`, role: "fprop", precision: "f32" });
    const r = b.router(logits, this.bias, k, scaling);
    b.release(logits); // backward starts from the scores
    let dscores: Tensor | null = null;
    this.lastBalanceLoss = null;
    if (this.cfg.seq_aux_alpha > 0) {
      const bl = b.balanceLoss(r.scores, r.topIdx, { batch, seq, alpha: this.cfg.seq_aux_alpha });
      dscores = bl.dscores;
      if (gradScale !== 1) {
        dscores = b.scale(bl.dscores, gradScale);
        b.release(bl.dscores);
      }
      this.lastBalanceLoss = bl.loss;
    }
    return { r, dscores };
  }

  /**
   * forward with the routed experts split over `expertGroup`: this rank's tokens are routed and
   * sorted by expert as in forward, each expert's rows go to the rank holding it (dispatch: with
   * the per-expert counts exchanged first, so the host reads this rank's offsets once), that rank
   * runs its experts on the rows from every rank (one grouped GEMM each), and the outputs come back
   * (combine) to be weighted and summed as in forward. Every rank of the group calls it for the
   * same layer in the same order. Under FP8 the rows travel as the FP8 1x128 tiles (and scales)
   * that forward would hand the experts, otherwise as the f32 layer input; BF16 outputs come back
   * as BF16: the numbers are forward's, bit for bit.
   */
  async forwardExpertParallel(
    x: Tensor,
    batch: number,
    seq: number,
    gradScale = 1,
    residual: Tensor | null = null,
  ): Promise<Tensor> {
    const b = this.b;
    const group = this.expertGroup;
    if (!group) throw new Error(`${this.prefix}: forwardExpertParallel without an expert group`);
    const E = this.cfg.n_routed_experts;
    const { r, dscores } = this.route(x, batch, seq, gradScale);
    const xqOpt = this.quantiseOnce(x, true);
    const xMemo = new QuantMemo();
    const xq = xqOpt ? xMemo.fprop(xqOpt, () => b.quantize(x, xqOpt)) : null;
    // FP8 range counting: each token's tiles k times, as one process counts its k permuted copies
    // (the experts' Fprop, given FP8 rows, has no f32 rows to count).
    if (xq && this.trace?.flow.enabled)
      for (let i = 0; i < this.cfg.num_experts_per_tok; i++) this.trace.flow.add(b, x, xq);
    const p = b.moePermute(xq ?? x, r.topIdx, E);
    const offsets = (await p.offsets.read()) as Int32Array;
    const sent = await this.exchange(() => dispatch(b, group, p.xs, offsets));
    p.xs.dispose(); // dispatch sent copies of its rows
    const localOffsets = b.upload(sent.offsets, [sent.offsets.length], "i32");
    // sent.xs (FP8: the experts' saved input from here on, as p.xs is in forward).
    const ysLocal = xqOpt
      ? this.experts.forward(sent.xs, localOffsets, QuantMemo.holding(xqOpt, sent.xs))
      : this.experts.forward(sent.xs, localOffsets);
    if (!xqOpt && !this.experts.retains(sent.xs)) sent.xs.dispose();
    const back = await this.exchange(() => combine(b, group, ysLocal, sent.exchange));
    ysLocal.dispose();
    // Backward reads ys only for d(weights): BF16 storage when the experts round to BF16, as in forward.
    const ys = this.experts.outputsBf16 && back.dtype === "f32" ? intoBf16(b, back) : back;
    const shared = this.shared ? this.shared.forward(x, null, xMemo) : null;
    const add = [shared, residual].filter((t): t is Tensor => t !== null);
    const y = b.moeCombine(ys, p.slot, r.weights, add);
    if (shared) b.release(shared);
    this.save(x, r, p, ys, dscores, { offsets });
    return y;
  }

  /** What a forward leaves for its backward (and its loads for the bias update). */
  private save(
    x: Tensor,
    r: { scores: Tensor; topIdx: Tensor; weights: Tensor },
    p: PermuteResult,
    ys: Tensor,
    dscores: Tensor | null,
    ep?: ExpertParallelSaved,
  ): void {
    this.lastOffsets = p.offsets;
    const { scores, topIdx, weights } = r;
    this.saved.push({ x, scores, topIdx, weights, slot: p.slot, offsets: p.offsets, ys, dscores, ep });
  }

  /** backward of forwardExpertParallel: the output gradients of each expert's rows go to its rank and the input gradients come back. */
  async backwardExpertParallel(dy: Tensor): Promise<Tensor> {
    const b = this.b;
    const group = this.expertGroup;
    const s = this.saved.pop();
    if (!s) throw new Error(`${this.prefix}: backward without forward`);
    if (!group || !s.ep) throw new Error(`${this.prefix}: backwardExpertParallel after another forward`);
    const r = b.moeCombineBackward(dy, s.ys, s.slot, s.weights);
    // The gradients of this rank's expert-sorted rows take the rows' own way: the same exchange
    // (as f32, what the collectives move; BF16 values travel unchanged).
    const f32 = (t: Tensor) => (t.dtype === "f32" ? t : b.cast(t, "f32"));
    const dys = f32(r.dys);
    const sent: { xs: Tensor; exchange: ExpertExchange } = await this.exchange(() =>
      dispatch(b, group, dys, s.ep!.offsets),
    );
    const dxsLocal = f32(this.experts.backward(sent.xs));
    const dxs = await this.exchange(() => combine(b, group, dxsLocal, sent.exchange));
    return this.routerBackward(s, dy, r.dweights, dxs);
  }

  /** Whether a saved forward holds `t` itself (the router's Wgrad needs the layer input). */
  retains(t: Tensor): boolean {
    return this.saved.some((s) => s.x === t);
  }

  backward(dy: Tensor): Tensor {
    const b = this.b;
    const s = this.saved.pop();
    if (!s) throw new Error(`${this.prefix}: backward without forward`);
    if (s.ep) throw new Error(`${this.prefix}: an expert-parallel forward needs backwardExpertParallel`);
    // Under FP8 the experts' output gradient reaches their down projection quantised by the
    // combine's backward itself (its f32 copy, k rows of d per token, is never made).
    const gq = this.experts.gradQuant();
    let dweights: Tensor;
    let dxs: Tensor;
    if (gq) {
      const r = b.moeCombineBackwardQuantized(dy, s.ys, s.slot, s.weights, gq);
      dweights = r.dweights;
      dxs = this.experts.backward({ dgrad: r.dgrad, wgrad: r.wgrad });
      r.dgrad.dispose();
      r.wgrad.dispose();
    } else {
      const r = b.moeCombineBackward(dy, s.ys, s.slot, s.weights);
      dweights = r.dweights;
      dxs = this.experts.backward(r.dys);
    }
    return this.routerBackward(s, dy, dweights, dxs);
  }

  /**
   * The rest of a backward once the routed experts' input gradients (dxs, expert-sorted) are back:
   * the permute's backward, the router's (with the balance loss's gradient), the shared experts'.
   */
  private routerBackward(s: Saved, dy: Tensor, dweights: Tensor, dxs: Tensor): Tensor {
    const b = this.b;
    const dx = b.moePermuteBackward(dxs, s.slot, s.x.rows);
    const dlogits = b.routerBackward(
      dweights,
      s.scores,
      s.topIdx,
      this.cfg.routed_scaling_factor,
      s.dscores ?? undefined,
    );
    b.matmul(dlogits, s.x, { transA: true, precision: "f32", accumulate: this.gate.grad });
    b.matmul(dlogits, this.gate.value, { precision: "f32", accumulate: dx });
    this.trace?.record({ pkg: "moe-layers", layer: `${this.prefix}.gate`, role: "dgrad", precision: "f32" });
    this.trace?.record({ pkg: "moe-layers", layer: `${this.prefix}.gate`, role: "wgrad", precision: "f32" });
    if (this.shared) this.shared.backward(dy, dx);
    return dx;
  }

  /**
   * After the optimizer step, from this step's loads (n_i of the N tokens routed to expert i):
   * `sign`: bias_i += gamma * sign(mean - n_i); `error`: bias_i += gamma * (k/E - n_i/N), which is
   * the op's relative error (mean - n_i) / mean times gamma * k/E. In these units one gamma suits
   * 8 experts top-2 and 64 top-6 alike: the relative error of an overloaded expert reaches E/k - 1,
   * and the loads respond to the bias more steeply the smaller k/E is (docs/model.md, "Balancing").
   * `clipped`: error's step with (mean - n_i) / mean clipped to [-1, 1], at most gamma * k/E either way.
   * `offsets`: the step's expert offsets, the last forward's unless a step of several micro-batches
   * passes their sum.
   */
  updateBias(offsets: Tensor | null = this.lastOffsets): void {
    const { bias_update_speed: gamma, bias_update_rule: rule } = this.cfg;
    const { num_experts_per_tok: k, n_routed_experts: E } = this.cfg;
    if (!offsets || gamma <= 0) return;
    const step = rule === "sign" ? gamma : (gamma * k) / E;
    this.b.biasUpdate(this.bias, offsets, { gamma: step, rule });
  }

  /** Per-expert token counts of the last forward (reads from the device: logging only). */
  async loadStats(): Promise<LoadStats> {
    if (!this.lastOffsets) throw new Error(`${this.prefix}: no forward yet`);
    const off = (await this.lastOffsets.read()) as Int32Array;
    const counts = [];
    for (let e = 0; e + 1 < off.length; e++) counts.push(off[e + 1] - off[e]);
    return loadStats(counts);
  }
}
