// The training loop's step: trainStep, or on a backend that can record device work (cuda) its
// forward, backward and gradient norm replayed from a CUDA graph (issue 18: ~850 launches a small
// step become one, and the host's ~30 ms of issuing them a fraction of a millisecond).
//
// What the graph holds is what does not change between steps: it reads the batch from two input
// tensors the runner owns (each step's ids and targets are copied into them first), zeroes the
// gradients, runs lossAndGrad and the clip factor, and leaves the losses, the norm, the clip factor
// and each MoE layer's expert offsets in its output tensors. What does change runs after a replay
// as in trainStep, with the same ops: the host reads the losses and the norm, decides whether the
// update is skipped, and enqueues AdamW at this step's learning rate and the bias updates. So a
// replayed step computes the bits trainStep computes (same kernels, same arguments, same order).
//
// Router noise changes its seed and width every step: a graph recorded with noise has the routers
// read both from a table (DeepSeekModel.routerNoiseTable) that the runner rewrites before each
// replay; when the noise ends (or starts) the runner records again, once.
//
// Steps trainStep must run itself: the first (it compiles and loads every kernel, which a recording
// cannot do), steps with FP8 range counts (extra kernels), with micro-batches or with several ranks.
// They borrow the graph's free memory and give it back by the end of the step, so the recording
// stays valid. MOE8_CUDA_GRAPH=0 turns the graph off.
import type { AdamW } from "@moe8/optimizer";
import {
  type CapturedGraph,
  type HostArray,
  type ReplayedKernelTimes,
  SINGLE_PROCESS,
  type Tensor,
} from "@moe8/tensor";
import type { BatchShape, DeepSeekModel } from "./model.ts";
import { finishStep, type StepOptions, type StepResult, type StepTail, trainStep } from "./train-step.ts";

export interface StepRunnerOptions {
  /** Replay from a CUDA graph where the backend can (default: unless MOE8_CUDA_GRAPH=0). */
  graph?: boolean;
}

/** The batch of one step: host arrays, or device tensors of `shape.batch * shape.seq` ids. */
export type StepBatch = { ids: HostArray | Tensor; targets: HostArray | Tensor };

export class StepRunner {
  /** The recorded step; its result is what it leaves on the device (read after each replay). */
  private graph: CapturedGraph<StepTail> | null = null;
  /** Whether the graph was recorded with router noise (read from noiseTable). */
  private graphNoise = false;
  private inputs: { ids: Tensor; targets: Tensor } | null = null;
  /** The router noise's per-layer seeds and scale, read by a graph recorded with noise. */
  private noiseTable: Tensor | null = null;
  private useGraph: boolean;
  /** Why recording failed, when it did (the run then steps uncaptured). */
  graphError: string | null = null;
  private eagerSteps = 0;
  /** Steps replayed from the graph, and graphs recorded (for reports and tests). */
  replays = 0;
  captures = 0;
  /** The host's time in the last step, waiting for the device's results not counted (ms). */
  lastHostMs = 0;

  constructor(
    readonly model: DeepSeekModel,
    readonly opt: AdamW,
    readonly shape: BatchShape,
    o: StepRunnerOptions = {},
  ) {
    this.useGraph =
      (o.graph ?? process.env.MOE8_CUDA_GRAPH !== "0") && typeof model.b.captureGraph === "function";
  }

  /**
   * Whether this step can be the recorded one: see the file comment. A step given collectives runs
   * uncaptured whatever the group's size (NCCL's group of one at `--gpus 1` too): their calls are not
   * part of a recording.
   */
  private graphable(o: StepOptions): boolean {
    return this.useGraph && (o.accum ?? 1) === 1 && o.collectives === undefined && !o.fp8Stats;
  }

  async step(batch: StepBatch, lr: number, o: StepOptions = {}): Promise<StepResult> {
    const b = this.model.b;
    const t0 = performance.now();
    if (!this.graphable(o) || this.eagerSteps === 0) return this.uncaptured(batch, lr, o, t0);
    this.loadInputs(batch);
    const noise = o.routerNoise && o.routerNoise.scale > 0 ? o.routerNoise : null;
    if (noise) {
      const values = this.model.routerNoiseTable(noise);
      this.noiseTable ??= b.keep(b.zeros([values.length / 2, 2], "i32"));
      b.write(this.noiseTable, values);
    }
    // Memory the graph lent to work that still holds it: record again (the rare case of a caller
    // keeping tensors across steps that were made after the recording). So too when the noise
    // starts or ends.
    if (this.graph && (this.graph.borrowed() > 0 || this.graphNoise !== (noise !== null))) this.dropGraph();
    if (!this.graph && !this.tryCapture(noise !== null)) return this.uncaptured(batch, lr, o, t0);
    this.graph!.replay();
    this.replays++;
    this.lastHostMs = performance.now() - t0;
    return this.finish(this.graph!.result, lr);
  }

  /** trainStep itself. */
  private async uncaptured(batch: StepBatch, lr: number, o: StepOptions, t0: number): Promise<StepResult> {
    const b = this.model.b;
    this.eagerSteps++;
    const r = await b.scope(() => {
      const ids = this.device(batch.ids);
      const targets = this.device(batch.targets);
      return trainStep(this.model, this.opt, ids, targets, this.shape, lr, o);
    });
    this.lastHostMs = performance.now() - t0;
    return r;
  }

  /**
   * Records the step; false when recording failed (an op the recording cannot hold, on a path the
   * first step did not take): the run goes on uncaptured, with one line saying why. Nothing ran
   * while recording, so the model and optimiser are as they were.
   */
  private tryCapture(noise: boolean): boolean {
    try {
      this.capture(noise);
      return true;
    } catch (e) {
      this.graphError = e instanceof Error ? e.message : String(e);
      this.useGraph = false;
      this.model.clearSaved();
      console.error(
        `CUDA graph: recording the step failed (${this.graphError}); the run continues uncaptured`,
      );
      return false;
    }
  }

  private device(x: HostArray | Tensor): Tensor {
    const b = this.model.b;
    return ArrayBuffer.isView(x) ? b.upload(x, [x.length], "i32") : (x as Tensor);
  }

  /** The batch copied into the tensors a recording reads (made on first use). */
  private loadInputs(batch: StepBatch): void {
    const b = this.model.b;
    if (!this.inputs) {
      const n = this.shape.batch * this.shape.seq;
      this.inputs = { ids: b.keep(b.zeros([n], "i32")), targets: b.keep(b.zeros([n], "i32")) };
    }
    this.load(this.inputs.ids, batch.ids);
    this.load(this.inputs.targets, batch.targets);
  }

  private load(dst: Tensor, x: HostArray | Tensor): void {
    const b = this.model.b;
    if (ArrayBuffer.isView(x)) b.write(dst, x);
    else b.setRows(dst, 0, x as Tensor);
  }

  private capture(noise: boolean): void {
    this.graph = this.record(noise, (work) => this.model.b.captureGraph!(work));
    this.graphNoise = noise;
    this.captures++;
  }

  /**
   * Hands `recorder` the step's recorded part (zeroed gradients, lossAndGrad, the norm) as the work
   * to record, with the router noise read from the table when `noise`, and clears the noise after.
   */
  private record<R>(noise: boolean, recorder: (work: () => StepTail) => R): R {
    const { model, opt } = this;
    const b = model.b;
    const inputs = this.inputs!;
    try {
      return recorder(() =>
        b.scope(() => {
          model.trace.flow.enabled = false;
          // With noise the layers read its seeds and scale from the table (the values here are not used).
          model.setRouterNoise(noise ? { seed: 0, scale: 1, rowOffset: 0 } : null, this.noiseTable);
          opt.zeroGrad();
          const r = model.lossAndGrad(inputs.ids, inputs.targets, this.shape, 1);
          const { norm, scale } = opt.gradNorm();
          return {
            ce: b.keep(r.ce),
            total: b.keep(r.total),
            mtp: r.mtp && b.keep(r.mtp),
            norm: b.keep(norm),
            scale: b.keep(scale),
            offsets: model.moeLayers.map((m) => b.keep(m.lastOffsets!)),
          };
        }),
      );
    } finally {
      model.setRouterNoise(null);
    }
  }

  /**
   * GPU time per kernel of the step as training replays it, on `batch` (CudaBackend's
   * timeReplayedKernels: the recorded part, without router noise, in a timed graph of its own,
   * replayed `replays` times and freed). The runner's own graph is dropped first (the next step
   * records it again), so that the two never share memory; the model and optimiser are left as they
   * were, the gradients holding this batch's. Null where the backend cannot time a replayed graph or
   * the runner does not replay (MOE8_CUDA_GRAPH=0).
   */
  async profileReplayed(batch: StepBatch, replays = 3): Promise<ReplayedKernelTimes | null> {
    const b = this.model.b;
    if (!this.useGraph || !b.timeReplayedKernels) return null;
    this.dropGraph();
    this.loadInputs(batch);
    try {
      return await this.record(false, (work) => b.timeReplayedKernels!(work, replays));
    } finally {
      // (The layers' offsets were the timed graph's outputs, freed with it.)
      for (const m of this.model.moeLayers) m.lastOffsets = null;
    }
  }

  /** trainStep's part after the norm (finishStep), on the graph's outputs. */
  private finish(out: StepTail, lr: number): Promise<StepResult> {
    const { model, opt } = this;
    model.moeLayers.forEach((m, i) => {
      m.lastOffsets = out.offsets[i];
    });
    return model.b.scope(() =>
      finishStep(model, opt, lr, out, SINGLE_PROCESS, (ms) => {
        this.lastHostMs += ms;
      }),
    );
  }

  private dropGraph(): void {
    this.graph?.dispose();
    this.graph = null;
    for (const m of this.model.moeLayers) m.lastOffsets = null;
  }

  /** Frees the graph and the input tensors (the model and optimiser stay). */
  dispose(): void {
    this.dropGraph();
    if (this.inputs) {
      this.inputs.ids.dispose();
      this.inputs.targets.dispose();
      this.inputs = null;
    }
    this.noiseTable?.dispose();
    this.noiseTable = null;
  }
}
