// Run outputs other tools can read: metrics.jsonl (one object per step), loss.svg and, for a model
// with MoE layers, expert-load.svg (each layer's load max/mean over the steps).
import { closeSync, existsSync, ftruncateSync, openSync } from "node:fs";
import { join } from "node:path";
import { ioReason, openRegularSync, readAtSync } from "@moe8/data";
import { UsageError } from "@moe8/fp8-core";
import { appendText, writeFileDurable } from "./io.ts";
import { linePlot } from "./svg.ts";

export interface StepMetrics {
  step: number;
  loss: number;
  lr: number;
  grad_norm: number;
  tokens_per_s: number;
  ms_per_step: number;
  /** Multi-token prediction: the MTP module's mean cross-entropy (token i + 2). */
  mtp_loss?: number;
  /** Load balance over MoE layers: mean coefficient of variation and worst max/mean. */
  load_cv?: number;
  load_max_over_mean?: number;
  /** Each MoE layer's max/mean load, in layer order (1 is perfect balance, E/k total collapse). */
  load_max_over_mean_by_layer?: number[];
  /** Experts that received no token this step, summed over the MoE layers. */
  load_idle_experts?: number;
  /**
   * Expert parallelism, logged steps: the leader's wall time in the token exchanges (dispatch and
   * combine of every MoE layer, forward and backward; the device synchronised around each).
   */
  expert_exchange_ms?: number;
  val_loss?: number;
  /**
   * The validation batches' expert loads (routing without training's router noise): the worst MoE
   * layer's max/mean over all of them, and the experts that received none of their tokens.
   */
  val_load_max_over_mean?: number;
  val_load_idle_experts?: number;
  skipped?: boolean;
  [k: string]: number | number[] | boolean | undefined;
}

/** The curve points of metrics.jsonl lines (a skipped step's loss is null in JSON). */
interface CurvePoint {
  step: number;
  loss: number | null;
  val_loss?: number | null;
  mtp_loss?: number | null;
  load_max_over_mean_by_layer?: number[] | null;
}

/**
 * Cuts metrics.jsonl back to the lines of steps up to `step` (those past it were written by the
 * interrupted process and are written again) and returns those lines' curve points. The file is
 * read in chunks and truncated in place, so it may be any length. Its last line may be torn (a
 * partial write on a full disk, a kill mid-line: no newline at its end) and is dropped with a note;
 * a damaged line anywhere else is refused, naming the line.
 */
export function truncateMetrics(runDir: string, step: number, note: (msg: string) => void): CurvePoint[] {
  const path = join(runDir, "metrics.jsonl");
  if (!existsSync(path)) return [];
  const file = openRegularSync(path, "metrics file");
  const points: CurvePoint[] = [];
  let keep = 0; // bytes of the lines kept
  let line = 0;
  try {
    let pos = 0;
    let rest = Buffer.alloc(0);
    let done = false;
    while (!done && pos < file.size) {
      const chunk = readAtSync(file.fd, Math.min(1 << 20, file.size - pos), pos);
      pos += chunk.length;
      let buf = Buffer.concat([rest, chunk]);
      let nl = buf.indexOf(10);
      while (nl >= 0) {
        line++;
        const text = buf.subarray(0, nl).toString("utf8");
        let row: CurvePoint | null = null;
        try {
          row = JSON.parse(text);
        } catch {}
        if (!row || typeof row !== "object" || !Number.isSafeInteger(row.step))
          throw new UsageError(
            `${path}: line ${line} is damaged (not a metrics object); move the file aside to resume without the earlier curves`,
          );
        if (row.step > step) {
          done = true;
          break;
        }
        points.push({
          step: row.step,
          loss: row.loss ?? null,
          val_loss: row.val_loss,
          mtp_loss: row.mtp_loss,
          load_max_over_mean_by_layer: row.load_max_over_mean_by_layer,
        });
        keep += nl + 1;
        buf = buf.subarray(nl + 1);
        nl = buf.indexOf(10);
      }
      rest = buf;
    }
    if (!done && rest.length > 0)
      note(`${path}: dropped a torn last line (${rest.length} bytes without a newline)`);
  } finally {
    closeSync(file.fd);
  }
  if (keep < file.size) {
    try {
      const fd = openSync(path, "r+");
      try {
        ftruncateSync(fd, keep);
      } finally {
        closeSync(fd);
      }
    } catch (err) {
      throw new UsageError(`cannot write ${path}: ${ioReason(err)}`);
    }
  }
  return points;
}

export class MetricsLog {
  readonly train: [number, number][] = [];
  readonly val: [number, number][] = [];
  /** Multi-token prediction: the MTP module's loss (token i + 2) per step. */
  readonly mtp: [number, number][] = [];
  /** Per step, each MoE layer's load max/mean. */
  readonly load: [number, number[]][] = [];

  /** `moeLayers`: the model's MoE layer numbers, naming expert-load.svg's curves (none: no plot). */
  constructor(
    readonly dir: string,
    readonly moeLayers: number[] = [],
  ) {}

  /** Restores the curves of a resumed run (the jsonl already holds its earlier lines). */
  preload(rows: CurvePoint[]): void {
    for (const r of rows) this.track(r);
  }

  private track(m: CurvePoint): void {
    if (typeof m.loss === "number" && Number.isFinite(m.loss)) this.train.push([m.step, m.loss]);
    if (typeof m.val_loss === "number") this.val.push([m.step, m.val_loss]);
    if (typeof m.mtp_loss === "number" && Number.isFinite(m.mtp_loss)) this.mtp.push([m.step, m.mtp_loss]);
    const byLayer = m.load_max_over_mean_by_layer;
    if (Array.isArray(byLayer) && byLayer.length === this.moeLayers.length) this.load.push([m.step, byLayer]);
  }

  append(m: StepMetrics): void {
    appendText(join(this.dir, "metrics.jsonl"), `${JSON.stringify(m)}\n`);
    this.track(m);
  }

  /** Starts an empty metrics.jsonl (a new run, or one restarted before its first checkpoint). */
  reset(): void {
    writeFileDurable(join(this.dir, "metrics.jsonl"), "");
  }

  /** Writes loss.svg and, for a model with MoE layers, expert-load.svg. */
  writePlot(title: string): void {
    const svg = linePlot(
      [
        { name: "train loss", points: this.train },
        { name: "validation loss", points: this.val },
        ...(this.mtp.length ? [{ name: "MTP loss (token i + 2)", points: this.mtp }] : []),
      ],
      { title, xLabel: "step", yLabel: "cross-entropy (nats)" },
    );
    writeFileDurable(join(this.dir, "loss.svg"), svg, { fsync: false }); // a plot: whole, not durable
    if (this.moeLayers.length === 0) return;
    const steps = this.load.map(([step]) => step);
    const load = linePlot(
      [
        ...this.moeLayers.map((layer, i) => ({
          name: `layer ${layer}`,
          points: this.load.map(([step, v]): [number, number] => [step, v[i]]),
        })),
        // Perfect balance, so that the axis always shows how far from it the layers are.
        {
          name: "balanced",
          points: steps.length
            ? ([
                [steps[0], 1],
                [steps.at(-1)!, 1],
              ] as [number, number][])
            : [],
          color: "#888",
          dashed: true,
        },
      ],
      { title: `${title}: expert load`, xLabel: "step", yLabel: "load max/mean (1 = balanced)" },
    );
    writeFileDurable(join(this.dir, "expert-load.svg"), load, { fsync: false });
  }
}
