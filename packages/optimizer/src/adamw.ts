// AdamW over f32 master weights (docs/numerics.md: f32 master weights and f32 gradients, AdamW
// moments in BF16). Decoupled weight decay only for parameters marked `decay` (not norms; the MoE
// correction bias is not a parameter at all). Global-norm clipping happens on the device: the clip
// factor is a tensor the update reads, so the host never waits inside a step.
//
// The tensor lists are fixed at construction and handed to the backend once (prepareClipScale over
// every gradient, prepareAdamW over this rank's parameters and moments): on cuda a step's gradient
// norm is then two launches and its update one, whatever the number of parameters.
//
// Sharded (ZeRO-1, `shard` = this rank of a data-parallel group): each parameter has one owner rank
// (`owners`, whole parameters balanced by size), and a rank keeps moments for, and updates, only the
// parameters it owns; the step then gives every rank the owners' new values (trainStep's
// broadcast). The optimiser state of a rank is about 1/N of the whole.
import { encodeBf16, type MomentPrecision } from "@moe8/fp8-core";
import type { Backend, Collectives, Param, PreparedAdamW, PreparedClipScale, Tensor } from "@moe8/tensor";

export interface AdamWConfig {
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** Global-norm clipping threshold (0 disables). */
  clip: number;
  moments: MomentPrecision;
  /**
   * Learning-rate multipliers by parameter group (Param.group), 1 for a group not named: e.g.
   * `{ router: 0.1 }` trains the MoE routers at a tenth of the rate (docs/model.md, "Balancing").
   */
  lrScale?: Partial<Record<NonNullable<Param["group"]>, number>>;
}

export const ADAMW_DEFAULTS: AdamWConfig = {
  beta1: 0.9,
  beta2: 0.95,
  eps: 1e-8,
  weightDecay: 0.1,
  clip: 1.0,
  moments: "bf16",
};

interface Slot {
  param: Param;
  m: Tensor;
  v: Tensor;
}

/** This rank of a data-parallel group over which the optimiser state is sharded. */
export interface OptimizerShard {
  rank: number;
  size: number;
}

/**
 * Parameters split over a group along their first axis (expert parallelism: each rank holds
 * experts [rank E/size, (rank+1) E/size) of a stacked expert weight): this rank's moments are of its
 * slice; a checkpoint holds the whole (gatherState concatenates the ranks' slices, loadState takes
 * this rank's).
 */
export interface SplitParams {
  rank: number;
  size: number;
  params: Set<Param>;
}

/**
 * The owner rank of each parameter: largest first, each to the rank owning the fewest elements so
 * far (the lowest rank on ties), so that the shards' sizes differ by at most one parameter.
 */
export function shardOwners(sizes: number[], ranks: number): number[] {
  const load = new Array<number>(ranks).fill(0);
  const owners = new Array<number>(sizes.length).fill(0);
  const order = sizes.map((_, i) => i).sort((a, b) => sizes[b] - sizes[a] || a - b);
  for (const i of order) {
    const r = load.indexOf(Math.min(...load));
    owners[i] = r;
    load[r] += sizes[i];
  }
  return owners;
}

/**
 * A fused weight's moment from a checkpoint written before the fusion, which kept one moment per
 * part (`...gate_proj.weight.exp_avg` and `...up_proj.weight.exp_avg` for `...gate_up_proj.weight`):
 * the parts' rows interleaved back per matrix (per expert for stacked weights). Undefined when a
 * part is missing too.
 */
function joinedParts(
  param: Param,
  suffix: string,
  get: (name: string) => Float32Array | undefined,
): Float32Array | undefined {
  const m = /^(.*)\.\w+\.weight$/.exec(param.name);
  if (!param.parts || !m) return undefined;
  const pieces = param.parts.map((part) => get(`${m[1]}.${part}.weight.${suffix}`));
  if (pieces.some((p) => !p || p.length * param.parts!.length !== param.value.size)) return undefined;
  const matrices = param.value.shape.length === 3 ? param.value.shape[0] : 1;
  const n = param.value.size / matrices / pieces.length;
  const out = new Float32Array(param.value.size);
  for (let e = 0; e < matrices; e++)
    pieces.forEach((p, j) => {
      out.set(p!.subarray(e * n, (e + 1) * n), (e * pieces.length + j) * n);
    });
  return out;
}

export class AdamW {
  step = 0;
  private slots: Slot[];
  /** Each parameter's owner rank (all 0 without a shard; a split parameter's: this rank). */
  readonly owners: number[];
  private readonly clip: PreparedClipScale;
  /** One prepared update per learning-rate scale (one launch each on cuda; one group by default). */
  private readonly groups: { scale: number; adamw: PreparedAdamW }[];

  constructor(
    readonly b: Backend,
    readonly params: Param[],
    readonly cfg: AdamWConfig,
    readonly shard: OptimizerShard | null = null,
    readonly split: SplitParams | null = null,
  ) {
    // A split parameter's slice is this rank's own; the others are whole parameters balanced over
    // the shard's ranks (all rank 0's without a shard).
    const isSplit = (p: Param) => !!split?.params.has(p);
    const whole = params.filter((p) => !isSplit(p));
    const wholeOwners = shard
      ? shardOwners(
          whole.map((p) => p.value.size),
          shard.size,
        )
      : whole.map(() => 0);
    const rank = shard?.rank ?? 0;
    let k = 0;
    this.owners = params.map((p) => (isSplit(p) ? (split?.rank ?? rank) : wholeOwners[k++]));
    this.slots = params
      .filter((p, i) => isSplit(p) || this.owners[i] === rank)
      .map((param) => ({
        param,
        m: b.keep(b.zeros(param.value.shape, cfg.moments)),
        v: b.keep(b.zeros(param.value.shape, cfg.moments)),
      }));
    // Sharded, a rank's norm covers the gradients it owns (the only ones summed on it: trainStep
    // reduces each gradient to its owner); shardedGradNorm combines the ranks' norms.
    this.clip = b.prepareClipScale(this.slots.map((s) => s.param.grad));
    const scaleOf = (p: Param) => (p.group ? (cfg.lrScale?.[p.group] ?? 1) : 1);
    const scales = [...new Set(this.slots.map((s) => scaleOf(s.param)))];
    this.groups = scales.map((scale) => ({
      scale,
      adamw: b.prepareAdamW(
        this.slots
          .filter((s) => scaleOf(s.param) === scale)
          .map(({ param, m, v }) => ({ p: param.value, g: param.grad, m, v, decay: param.decay })),
      ),
    }));
  }

  /** Elements of optimiser state this rank holds (both moments). */
  get stateElements(): number {
    return this.slots.reduce((n, s) => n + s.m.size + s.v.size, 0);
  }

  private get maxNorm(): number {
    return this.cfg.clip > 0 ? this.cfg.clip : Number.POSITIVE_INFINITY;
  }

  /** The global gradient norm and the clip factor, as one-element device tensors (unsharded). */
  gradNorm(): { norm: Tensor; scale: Tensor } {
    if (this.shard && this.shard.size > 1)
      throw new Error("AdamW.gradNorm: the optimiser is sharded; use shardedGradNorm(group)");
    return this.clip.clipScale(this.maxNorm);
  }

  /**
   * gradNorm of a sharded optimiser, once each rank holds the summed gradients of the parameters it
   * owns: each rank's norm of those goes into its row of a [ranks, 1] vector, one all-reduce of that
   * vector (exact: every other row is 0) gives every rank all of them, and the norm of the vector is
   * the global norm (the sum of squares re-associated by shard), with the same bits on every rank.
   */
  async shardedGradNorm(group: Collectives): Promise<{ norm: Tensor; scale: Tensor }> {
    if (!this.shard || this.shard.size <= 1) return this.gradNorm();
    if (group.size !== this.shard.size || group.rank !== this.shard.rank)
      throw new Error(
        `AdamW.shardedGradNorm: rank ${group.rank} of ${group.size} for a shard ${this.shard.rank} of ${this.shard.size}`,
      );
    return this.combineNorms(
      group,
      this.slots.length > 0 ? this.clip.clipScale(Number.POSITIVE_INFINITY).norm : null,
    );
  }

  /**
   * The global gradient norm and clip factor when each rank of `group` passes the gradients it
   * alone holds (together every gradient once): shardedGradNorm's assembly for any such split
   * (expert parallelism's, trainStep).
   */
  async groupGradNorm(group: Collectives, grads: Tensor[]): Promise<{ norm: Tensor; scale: Tensor }> {
    return this.combineNorms(
      group,
      grads.length > 0 ? this.b.clipScale(grads, Number.POSITIVE_INFINITY).norm : null,
    );
  }

  /** This rank's norm (null: none) into its row of a [ranks, 1] vector, all-reduced, then clipped. */
  private async combineNorms(
    group: Collectives,
    own: Tensor | null,
  ): Promise<{ norm: Tensor; scale: Tensor }> {
    const b = this.b;
    const norms = b.zeros([group.size, 1]);
    if (own) b.setRows(norms, group.rank, b.reshape(own, [1, 1]));
    await group.allReduceSum([norms]);
    return b.clipScale([norms], this.maxNorm);
  }

  /** One update of every parameter (this rank's, when sharded) at learning rate `lr`, gradients multiplied by `gradScale`. */
  update(lr: number, gradScale: Tensor): void {
    this.step++;
    const c = this.cfg;
    for (const { scale, adamw } of this.groups)
      adamw.update({
        lr: lr * scale,
        beta1: c.beta1,
        beta2: c.beta2,
        eps: c.eps,
        weightDecay: c.weightDecay,
        step: this.step,
        gradScale,
      });
  }

  zeroGrad(): void {
    for (const p of this.params) p.zeroGrad();
  }

  /** Moments by parameter name (`<name>.exp_avg`, `<name>.exp_avg_sq`) for checkpoints. */
  stateTensors(): Map<string, Tensor> {
    const out = new Map<string, Tensor>();
    for (const s of this.slots) {
      out.set(`${s.param.name}.exp_avg`, s.m);
      out.set(`${s.param.name}.exp_avg_sq`, s.v);
    }
    return out;
  }

  /**
   * The whole group's moments by parameter name, as `stateTensors` names them, on every rank (f32
   * host arrays; BF16 moments widen exactly): each owner broadcasts its parameters' moments, in one
   * collective. What a sharded run writes to its one checkpoint; `loadState` reads it back under any
   * number of ranks, each rank taking the parameters it owns. Without a shard: this rank's state.
   */
  async gatherState(group: Collectives): Promise<Map<string, Float32Array>> {
    const b = this.b;
    if (this.shard && group.size !== this.shard.size)
      throw new Error(
        `gatherState: a group of ${group.size} ranks for state sharded over ${this.shard.size}`,
      );
    // Parameters split over part of the group (expert groups of split.size consecutive ranks, each
    // replicated over the others): slice q comes from rank q, the first expert group's.
    const split = this.split;
    if (split && (group.size % split.size !== 0 || group.rank % split.size !== split.rank))
      throw new Error(
        `gatherState: rank ${group.rank} of ${group.size} for parameters split over ${split.size} (rank ${split.rank})`,
      );
    // Unsharded, this rank owns every parameter: nothing to exchange. A split parameter's moments
    // are every rank's slices, each broadcast by its rank, concatenated in rank order.
    const own = new Map(this.slots.map((s) => [s.param, s]));
    const tensors: Tensor[] = [];
    const roots: number[] = [];
    const temps: Tensor[] = [];
    /** Per parameter and moment: its tensors in tensors (one, or one per rank when split). */
    const at: number[][] = [];
    const f32 = (t: Tensor) => {
      const v = t.dtype === "f32" ? t : b.cast(t, "f32");
      if (v !== t) temps.push(v);
      return v;
    };
    this.params.forEach((p, i) => {
      const s = own.get(p);
      for (const t of s ? [s.m, s.v] : [null, null]) {
        if (split?.params.has(p)) {
          const idx: number[] = [];
          for (let q = 0; q < split.size; q++) {
            const v = q === split.rank ? b.copy(f32(t!)) : b.zeros(p.value.shape, "f32");
            temps.push(v);
            idx.push(tensors.length);
            tensors.push(v);
            roots.push(q);
          }
          at.push(idx);
          continue;
        }
        const v = t ? f32(t) : b.zeros(p.value.shape, "f32");
        if (!t) temps.push(v);
        at.push([tensors.length]);
        tensors.push(v);
        roots.push(this.owners[i]);
      }
    });
    if (this.shard || split) await group.broadcast(tensors, roots);
    const read = async (idx: number[]) => {
      const parts = await Promise.all(idx.map(async (j) => (await tensors[j].read()) as Float32Array));
      const out = new Float32Array(parts.reduce((n, x) => n + x.length, 0));
      let o = 0;
      for (const x of parts) {
        out.set(x, o);
        o += x.length;
      }
      return out;
    };
    const out = new Map<string, Float32Array>();
    for (let i = 0; i < this.params.length; i++) {
      const name = this.params[i].name;
      out.set(`${name}.exp_avg`, await read(at[2 * i]));
      out.set(`${name}.exp_avg_sq`, await read(at[2 * i + 1]));
    }
    for (const t of temps) b.release(t);
    return out;
  }

  /** Restores moments saved by `stateTensors` (values as f32 host arrays) and the step count. */
  loadState(step: number, get: (name: string) => Float32Array | undefined): void {
    for (const s of this.slots)
      for (const [t, suffix] of [
        [s.m, "exp_avg"],
        [s.v, "exp_avg_sq"],
      ] as const) {
        let data = get(`${s.param.name}.${suffix}`) ?? joinedParts(s.param, suffix, get);
        if (!data) throw new Error(`optimizer state: missing ${s.param.name}.${suffix}`);
        // A split parameter's moments are saved whole: this rank's slice of them.
        const split = this.split;
        if (split?.params.has(s.param) && data.length === t.size * split.size)
          data = data.subarray(split.rank * t.size, (split.rank + 1) * t.size);
        if (data.length !== t.size)
          throw new Error(
            `optimizer state: ${s.param.name}.${suffix} has ${data.length} values, want ${t.size}`,
          );
        this.b.write(t, t.dtype === "bf16" ? encodeBf16(data) : data);
      }
    this.step = step;
  }

  dispose(): void {
    this.clip.dispose();
    for (const g of this.groups) g.adamw.dispose();
    for (const s of this.slots) {
      s.m.dispose();
      s.v.dispose();
    }
  }
}
