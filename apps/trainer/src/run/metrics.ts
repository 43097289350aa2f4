// Run outputs other tools can read: metrics.jsonl (one object per step) and loss.svg.
import { appendFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { linePlot } from "./svg.ts";

export interface StepMetrics {
  step: number;
  loss: number;
  lr: number;
  grad_norm: number;
  tokens_per_s: number;
  ms_per_step: number;
  /** Load balance over MoE layers: mean coefficient of variation and worst max/mean. */
  load_cv?: number;
  load_max_over_mean?: number;
  val_loss?: number;
  skipped?: boolean;
  [k: string]: number | boolean | undefined;
}

export class MetricsLog {
  readonly train: [number, number][] = [];
  readonly val: [number, number][] = [];

  constructor(readonly dir: string) {}

  /** Restores the curves of a resumed run (the jsonl already holds its earlier lines). */
  preload(rows: StepMetrics[]): void {
    for (const r of rows) this.track(r);
  }

  private track(m: StepMetrics): void {
    if (Number.isFinite(m.loss)) this.train.push([m.step, m.loss]);
    if (m.val_loss !== undefined) this.val.push([m.step, m.val_loss]);
  }

  append(m: StepMetrics): void {
    appendFileSync(join(this.dir, "metrics.jsonl"), `${JSON.stringify(m)}\n`);
    this.track(m);
  }

  writePlot(title: string): void {
    const svg = linePlot(
      [
        { name: "train loss", points: this.train },
        { name: "validation loss", points: this.val },
      ],
      { title, xLabel: "step", yLabel: "cross-entropy (nats)" },
    );
    const tmp = join(this.dir, ".loss.svg.tmp");
    writeFileSync(tmp, svg);
    renameSync(tmp, join(this.dir, "loss.svg"));
  }
}
