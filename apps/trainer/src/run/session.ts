// Everything a run needs, built from its config: backend, precision policy, model and optimizer.
import { type PrecisionPolicy, parsePolicy } from "@moe8/fp8-core";
import { createBackend } from "@moe8/kernels";
import { DeepSeekModel, type ModelConfig, routerNoiseAt, routerNoiseSeed, StepRunner } from "@moe8/model";
import { ADAMW_DEFAULTS, AdamW, type OptimizerShard, type SplitParams } from "@moe8/optimizer";
import type { Backend, Collectives } from "@moe8/tensor";
import type { TrainConfig } from "./config.ts";
import { lrAt, type RunSchedule, runSchedule } from "./schedule.ts";

export interface Session {
  backend: Backend;
  policy: PrecisionPolicy;
  model: DeepSeekModel;
  opt: AdamW;
  /**
   * The training step at the config's batch shape: trainStep, or on cuda its forward and backward
   * replayed from a CUDA graph (step-runner.ts; MOE8_CUDA_GRAPH=0 turns that off).
   */
  runner: StepRunner;
  /**
   * Makes this session rank `rank` of `size` data-parallel ranks: the runner steps on 1/size of the
   * batch and the optimiser keeps (and updates) only the parameters this rank owns (ZeRO-1). Call it
   * before any state is loaded or any step runs.
   */
  becomeRank(rank: number, size: number): void;
  /**
   * Makes this session a rank of `group` with the routed experts split over expert groups of
   * `ranksPerGroup` consecutive ranks (expert parallelism, after becomeRank and the group's making;
   * every rank of `group` calls it): the model is rebuilt holding this rank's experts, with the
   * weights, balancing biases and moments it held (all of them, as one process holds them: those of
   * a new run, or of the checkpoint loaded); the optimiser keeps its shard of the other parameters.
   */
  becomeExpertParallel(group: Collectives, ranksPerGroup: number): Promise<void>;
  /**
   * A model holding every expert with the weights of `dict` (a stateDict), for what runs on one
   * rank alone under expert parallelism (the leader's evaluation); made once, reloaded each call.
   */
  wholeModel(dict: Map<string, { shape: number[]; data: Float32Array }>): DeepSeekModel;
  /** The learning-rate schedule; a resumed run whose length changed replaces it (schedule.ts). */
  schedule: RunSchedule;
  lrAt(step: number): number;
  /** The router noise of step `step` (1-based) for trainStep's `routerNoise` (none once it fell to 0). */
  routerNoiseAt(step: number): { scale: number; seed: number } | undefined;
  dispose(): void;
}

export function policyOf(cfg: Pick<TrainConfig, "precision" | "precisionOverrides">): PrecisionPolicy {
  return parsePolicy({
    preset: cfg.precision,
    overrides: Object.entries(cfg.precisionOverrides).map(([k, v]) => [`precision.${k}`, v]),
  });
}

export function buildSession(cfg: TrainConfig, modelCfg: ModelConfig, backend?: Backend): Session {
  const b = backend ?? createBackend(cfg.backend);
  const policy = policyOf(cfg);
  const model = new DeepSeekModel(b, modelCfg, policy, cfg.seed);
  const optimizer = (shard: OptimizerShard | null, split: SplitParams | null = null, on = model) =>
    new AdamW(
      b,
      on.params,
      {
        ...ADAMW_DEFAULTS,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        weightDecay: cfg.weightDecay,
        clip: cfg.clip,
        moments: policy.optimizer.moments,
        lrScale: { router: cfg.balance.routerLr ?? 1 },
      },
      shard,
      split,
    );
  const opt = optimizer(null);
  let whole: DeepSeekModel | null = null;
  return {
    backend: b,
    policy,
    model,
    opt,
    runner: new StepRunner(model, opt, { batch: cfg.batchSize, seq: cfg.seqLen }),
    schedule: runSchedule(cfg),
    lrAt(step) {
      return lrAt(this.schedule, step);
    },
    routerNoiseAt(step) {
      const scale = routerNoiseAt(modelCfg, step, this.schedule.total);
      return scale > 0 ? { scale, seed: routerNoiseSeed(cfg.seed, step) } : undefined;
    },
    becomeRank(rank, size) {
      this.runner.dispose();
      this.opt.dispose();
      this.opt = optimizer(size > 1 ? { rank, size } : null);
      this.runner = new StepRunner(model, this.opt, { batch: cfg.batchSize / size, seq: cfg.seqLen });
    },
    async becomeExpertParallel(group, P) {
      const [dict, state, step] = [
        await this.model.stateDict(),
        await this.opt.gatherState(group),
        this.opt.step,
      ];
      // Expert groups of P consecutive ranks; with P below the group, each rank's replicas (the
      // ranks holding its experts in the other groups) too (every rank makes both splits).
      const r = group.rank;
      const groups =
        P === group.size
          ? { expertGroup: group }
          : { expertGroup: await group.split(Math.floor(r / P)), expertReplicas: await group.split(r % P) };
      this.runner.dispose();
      this.opt.dispose();
      this.model.dispose();
      const m = new DeepSeekModel(b, modelCfg, policy, cfg.seed, groups);
      m.loadStateDict((n) => dict.get(n));
      this.model = m;
      this.opt = optimizer(this.opt.shard, m.expertSplit, m);
      this.opt.loadState(step, (n) => state.get(n));
      this.runner = new StepRunner(m, this.opt, { batch: cfg.batchSize / group.size, seq: cfg.seqLen });
    },
    wholeModel(dict) {
      whole ??= new DeepSeekModel(b, modelCfg, policy, cfg.seed);
      whole.loadStateDict((n) => dict.get(n));
      return whole;
    },
    dispose() {
      this.runner.dispose();
      this.opt.dispose();
      this.model.dispose();
      whole?.dispose();
    },
  };
}
