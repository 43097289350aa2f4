// One optimizer step: forward + backward in a per-step arena, global-norm clipping, AdamW, then the
// auxiliary-loss-free bias update. The host reads two numbers per step (loss and grad norm), after
// all work is enqueued (docs/runtime.md rule 1); a non-finite loss or norm skips the update.
//
// Gradient accumulation (`accum` K > 1): the batch is cut into K micro-batches of batch/K sequences,
// each forward + backward in its own arena (only one micro-batch's activations exist at a time), with
// every gradient scaled by 1/K so that they sum to the whole batch's mean-loss gradient. The step is
// the whole batch's: its loss is the mean of the micro-batches' means (all of one size), and the
// bias update and the load statistics use the expert loads summed over the micro-batches.
//
// Data parallel (`collectives` of size N > 1): each rank passes its slice of the step's batch (the
// same number of sequences on every rank); gradients and losses are scaled by 1/N and summed over
// the ranks, the expert offsets summed, so every rank clips, updates and balances with the whole
// step's numbers and the replicas stay identical (the same bits on every rank). With a sharded
// optimiser (ZeRO-1) each gradient is summed on its owner rank only (a reduce, not an all-reduce),
// the global norm is assembled from the ranks' norms of what they own, and each rank updates the
// parameters it owns and broadcasts them.
//
// Expert parallelism (the model's expertGroup): each MoE layer's experts split over P ranks, which
// exchange their tokens; P is the whole group, or part of it (expert groups of P consecutive ranks,
// each rank's experts replicated in every group: their gradients are summed over those replicas).
import { type LoadStats, loadStats } from "@moe8/moe-layers";
import type { AdamW } from "@moe8/optimizer";
import { type Collectives, type Param, SINGLE_PROCESS, type Tensor } from "@moe8/tensor";
import type { BatchShape, DeepSeekModel } from "./model.ts";

export interface StepResult {
  /** Mean token cross-entropy. */
  loss: number;
  /** Cross-entropy plus the balance losses (and mtp_loss_weight times the MTP loss). */
  totalLoss: number;
  /** The MTP module's mean cross-entropy (token i + 2), with multi-token prediction only. */
  mtpLoss?: number;
  gradNorm: number;
  /** The update was skipped because the loss or the gradient norm was not finite. */
  skipped: boolean;
  /** Per MoE layer: expert loads of this step. */
  load: LoadStats[];
  /** FP8 range events of the step's activations and gradients, when asked for. */
  fp8?: { overflow: number; underflow: number };
  /**
   * Expert parallelism, when asked for (timeExchanges): this rank's wall time in the token
   * exchanges of every MoE layer, forward and backward, each between two device synchronisations.
   */
  expertExchangeMs?: number;
}

export interface StepOptions {
  /** Read the FP8 range counts of this step (one extra pass per quantisation). */
  fp8Stats?: boolean;
  /** Under expert parallelism, time the token exchanges (two device synchronisations each). */
  timeExchanges?: boolean;
  /** Micro-batches per step (gradient accumulation); `shape.batch` must be a multiple of it. */
  accum?: number;
  /** The data-parallel group (default: this process alone); `ids` is then this rank's slice. */
  collectives?: Collectives;
  /**
   * Router noise of this step (routerNoiseAt, routerNoiseSeed): each token's noise is drawn by its
   * index in the whole step's batch, so micro-batches and ranks see the noise one pass would.
   */
  routerNoise?: { scale: number; seed: number };
}

/**
 * `ids` and `targets` hold the whole step's batch (`shape`), whatever `accum` is; under data
 * parallelism, this rank's part of it.
 */
export async function trainStep(
  model: DeepSeekModel,
  opt: AdamW,
  ids: Tensor,
  targets: Tensor,
  shape: BatchShape,
  lr: number,
  opts: StepOptions = {},
): Promise<StepResult> {
  const b = model.b;
  const flow = model.trace.flow;
  const accum = opts.accum ?? 1;
  const group = opts.collectives ?? SINGLE_PROCESS;
  if (!Number.isInteger(accum) || accum < 1 || shape.batch % accum !== 0)
    throw new Error(`trainStep: batch ${shape.batch} is not a multiple of accum ${accum}`);
  return b.scope(async () => {
    flow.enabled = !!opts.fp8Stats;
    opt.zeroGrad();
    const share = 1 / group.size;
    const noise = opts.routerNoise && opts.routerNoise.scale > 0 ? opts.routerNoise : null;
    // This rank's first token in the step's batch (the ranks hold equal consecutive slices).
    const first = group.rank * shape.batch * shape.seq;
    const setNoise = (row: number) => model.setRouterNoise(noise && { ...noise, rowOffset: first + row });
    const sharded = !!opt.shard && group.size > 1;
    // Expert parallelism (the model's experts split over this same group): the experts' gradients
    // are whole on their rank after the backward pass (every rank's tokens reached them), so only
    // the replicated parameters are summed over the group.
    const experts = expertParams(model, group);
    // Expert parallelism over part of the ranks: the experts' gradients hold their group's tokens
    // only; they are summed over the replicas of the same experts (every rank then has the whole
    // step's, and the replicas update them alike).
    const replicas = experts ? model.expertReplicas : null;
    const timeExchanges = !!experts && !!opts.timeExchanges;
    for (const m of model.moeLayers) m.timeExchanges = timeExchanges;
    // Gradient buckets: each block's gradients start their reduction (ZeRO-1: to their owners only,
    // the other ranks never read them again) as soon as the backward pass has finished them, on the
    // last micro-batch, and travel while it computes the blocks before (with NCCL).
    // Not under expert parallelism: its backward exchanges tokens through the same communicator
    // on the backend's stream, and two NCCL operations of one communicator running at once on two
    // streams can wait on each other across ranks; its replicated gradients are summed after it.
    const owner = new Map(opt.params.map((p, i) => [p, opt.owners[i]] as const));
    const onGrads =
      group.size > 1 && !experts
        ? (params: Param[]) => {
            const grads = params.map((p) => p.grad);
            if (sharded)
              group.startReduce(
                grads,
                params.map((p) => owner.get(p)!),
              );
            else group.startReduce(grads);
          }
        : undefined;
    let pass: Pass;
    try {
      pass =
        accum > 1
          ? await microBatches(model, ids, targets, shape, accum, share, setNoise, onGrads, !!experts)
          : await wholeBatch(model, ids, targets, shape, share, setNoise, onGrads, !!experts);
    } finally {
      model.setRouterNoise(null);
      for (const m of model.moeLayers) m.timeExchanges = false;
    }
    const expertExchangeMs = timeExchanges
      ? model.moeLayers.reduce((ms, m) => ms + m.takeExchangeMs(), 0)
      : undefined;
    if (group.size > 1) await group.settle();
    if (experts) {
      const whole = opt.params.map((p, i) => [p, opt.owners[i]] as const).filter(([p]) => !experts.has(p));
      if (sharded)
        await group.reduceSum(
          whole.map(([p]) => p.grad),
          whole.map(([, owner]) => owner),
        );
      else await group.allReduceSum(whole.map(([p]) => p.grad));
      if (replicas) await replicas.allReduceSum(opt.params.filter((p) => experts.has(p)).map((p) => p.grad));
    }
    const offsets = await pass.offsets();
    if (group.size > 1)
      await group.allReduceSum([pass.ce, pass.total, ...(pass.mtp ? [pass.mtp] : []), ...offsets]);
    // Split experts: each group's experts count once, on the first expert group's ranks (with the
    // experts split over every rank, all of them), and each replicated gradient once, on its owner
    // under ZeRO-1, else on rank 0 (the same on every rank). Sharded without replicas, each rank's
    // optimiser holds exactly the gradients it alone has: the shards' norm is the global one.
    const countedHere = (p: Param, i: number) =>
      experts!.has(p)
        ? (replicas?.rank ?? 0) === 0
        : sharded
          ? opt.owners[i] === group.rank
          : group.rank === 0;
    const { norm, scale } =
      experts && (replicas || !sharded)
        ? await opt.groupGradNorm(
            group,
            opt.params.filter(countedHere).map((p) => p.grad),
          )
        : sharded
          ? await opt.shardedGradNorm(group)
          : opt.gradNorm();
    const r = await finishStep(
      model,
      opt,
      lr,
      { ce: pass.ce, total: pass.total, mtp: pass.mtp, norm, scale, offsets },
      group,
    );
    // (Every rank counts the range events of its own quantisations: the step's are their sum.)
    if (flow.enabled && group.size > 1) await flow.sumOver(group, b);
    const fp8 = flow.enabled ? await flow.take() : undefined;
    flow.enabled = false;
    return { ...r, fp8, expertExchangeMs };
  });
}

/** What forward, backward and the gradient norm leave for the rest of a step. */
export interface StepTail {
  ce: Tensor;
  total: Tensor;
  /** The MTP loss (null without multi-token prediction). */
  mtp: Tensor | null;
  norm: Tensor;
  /** The clip factor AdamW multiplies the gradients by. */
  scale: Tensor;
  /** Each MoE layer's expert offsets (the step's loads). */
  offsets: Tensor[];
}

/**
 * A step after its gradient norm (trainStep's, and a replayed graph's in StepRunner): the host
 * reads the losses and the norm; when both are finite it enqueues AdamW at `lr` (with ZeRO-1 every
 * rank then takes the owners' values) and the bias updates; then it reads the loads. `enqueued`
 * gets the host's milliseconds from the update's start to the last bias update's.
 */
export async function finishStep(
  model: DeepSeekModel,
  opt: AdamW,
  lr: number,
  t: StepTail,
  group: Collectives = SINGLE_PROCESS,
  enqueued?: (ms: number) => void,
): Promise<Omit<StepResult, "fp8">> {
  const [loss, totalLoss, gradNorm] = [await t.ce.item(), await t.total.item(), await t.norm.item()];
  const mtpLoss = t.mtp ? await t.mtp.item() : undefined;
  const skipped = !Number.isFinite(totalLoss) || !Number.isFinite(gradNorm);
  const t0 = performance.now();
  if (!skipped) {
    opt.update(lr, t.scale);
    // ZeRO-1: each parameter was updated by its owner only; every rank takes the owner's values
    // (but a split parameter's: each rank's slice is its own).
    if (opt.shard && group.size > 1) {
      const whole = opt.params
        .map((p, i) => [p, opt.owners[i]] as const)
        .filter(([p]) => !opt.split?.params.has(p));
      await group.broadcast(
        whole.map(([p]) => p.value),
        whole.map(([, owner]) => owner),
      );
    }
    model.moeLayers.forEach((m, i) => {
      m.updateBias(t.offsets[i]);
    });
  }
  enqueued?.(performance.now() - t0);
  const load = await Promise.all(
    t.offsets.map(async (o) => loadStats(counts((await o.read()) as Int32Array))),
  );
  return { loss, totalLoss, ...(mtpLoss === undefined ? {} : { mtpLoss }), gradNorm, skipped, load };
}

/** The forward + backward of a step: its losses ([1] tensors) and each MoE layer's expert offsets. */
interface Pass {
  ce: Tensor;
  total: Tensor;
  mtp: Tensor | null;
  offsets(): Promise<Tensor[]>;
}

/**
 * share: this rank's part of the step (1 / ranks), applied to the gradients and the losses;
 * setNoise(row): the router noise for a pass whose first token is `row` of this rank's batch.
 */
async function wholeBatch(
  model: DeepSeekModel,
  ids: Tensor,
  targets: Tensor,
  shape: BatchShape,
  share: number,
  setNoise: (row: number) => void,
  onGrads?: (params: Param[]) => void,
  expertParallel = false,
): Promise<Pass> {
  const b = model.b;
  setNoise(0);
  const r = expertParallel
    ? await model.lossAndGradExpertParallel(ids, targets, shape, share, onGrads)
    : model.lossAndGrad(ids, targets, shape, share, onGrads);
  const scaled = (t: Tensor) => (share === 1 ? t : b.scale(t, share));
  const offsets = model.moeLayers.map((m) => m.lastOffsets!);
  return {
    ce: scaled(r.ce),
    total: scaled(r.total),
    mtp: r.mtp && scaled(r.mtp),
    offsets: async () => offsets,
  };
}

async function microBatches(
  model: DeepSeekModel,
  ids: Tensor,
  targets: Tensor,
  shape: BatchShape,
  accum: number,
  share: number,
  setNoise: (row: number) => void,
  onGrads?: (params: Param[]) => void,
  expertParallel = false,
): Promise<Pass> {
  const b = model.b;
  const micro = { batch: shape.batch / accum, seq: shape.seq };
  const rows = micro.batch * micro.seq;
  let ce: Tensor | null = null;
  let total: Tensor | null = null;
  let mtp: Tensor | null = null;
  const perLayer: Tensor[][] = model.moeLayers.map(() => []);
  for (let k = 0; k < accum; k++) {
    // The micro-batch's activations go with its arena; its losses (scaled by 1/K) and expert
    // offsets leave it.
    const kept = await b.scope(async () => {
      setNoise(k * rows);
      const args = [
        b.rows(ids, k * rows, rows),
        b.rows(targets, k * rows, rows),
        micro,
        share / accum,
        k === accum - 1 ? onGrads : undefined,
      ] as const;
      const r = expertParallel ? await model.lossAndGradExpertParallel(...args) : model.lossAndGrad(...args);
      return {
        ce: b.keep(b.scale(r.ce, share / accum)),
        total: b.keep(b.scale(r.total, share / accum)),
        mtp: r.mtp && b.keep(b.scale(r.mtp, share / accum)),
        offsets: model.moeLayers.map((m) => b.keep(m.lastOffsets!)),
      };
    });
    const [c, t] = [b.copy(kept.ce), b.copy(kept.total)]; // in the step's arena
    b.release(kept.ce);
    b.release(kept.total);
    ce = ce ? b.add(ce, c) : c;
    total = total ? b.add(total, t) : t;
    if (kept.mtp) {
      const m = b.copy(kept.mtp);
      b.release(kept.mtp);
      mtp = mtp ? b.add(mtp, m) : m;
    }
    kept.offsets.forEach((o, i) => {
      perLayer[i].push(o);
    });
  }
  return {
    ce: ce!,
    total: total!,
    mtp,
    // The step's offsets are the sums of the micro-batches'. There is no integer add on the device,
    // so they are summed on the host from the reads the load statistics make anyway (E+1 integers
    // per layer and micro-batch, once per step) and uploaded for the bias update: the one place
    // routing data visits the host inside a step (docs/runtime.md rules 1 and 2), only with K > 1.
    async offsets() {
      const out: Tensor[] = [];
      for (const list of perLayer) {
        const sum = new Int32Array(list[0].size);
        for (const o of list) {
          const v = (await o.read()) as Int32Array;
          for (let e = 0; e < sum.length; e++) sum[e] += v[e];
          b.release(o);
        }
        out.push(b.upload(sum, [sum.length], "i32"));
      }
      return out;
    },
  };
}

/**
 * The experts' parameters of a model whose experts are split over `group` or part of it (null when
 * they are not), after checking the layout: P ranks per expert group, the groups consecutive blocks
 * of the data-parallel ranks (rank r is rank r % P of expert group r / P), each rank's replicas the
 * ranks r % P + P k (it their rank r / P).
 */
function expertParams(model: DeepSeekModel, group: Collectives): Set<Param> | null {
  const ep = model.expertGroup;
  if (!ep) return null;
  const reps = model.expertReplicas;
  const copies = reps?.size ?? 1;
  if (
    ep.size * copies !== group.size ||
    ep.rank !== group.rank % ep.size ||
    (reps && reps.rank !== Math.floor(group.rank / ep.size))
  )
    throw new Error(
      `trainStep: the experts are split over ${ep.size} ranks (rank ${ep.rank}) in ${copies} copies, the batch over ${group.size} (rank ${group.rank}): expert groups are consecutive blocks of the data-parallel ranks, each replicated over the others`,
    );
  return model.expertSplit!.params;
}

/** Per-expert token counts from expert offsets. */
function counts(offsets: Int32Array): number[] {
  const c: number[] = [];
  for (let e = 0; e + 1 < offsets.length; e++) c.push(offsets[e + 1] - offsets[e]);
  return c;
}
