// A run's learning rate, and how it goes on when a resumed run is given another length
// (`--resume RUN --steps N`). Up to the step it was resumed at, a run has followed its schedule; from
// there (docs/model.md, "Changing a run's length"):
// - still in warm-up (either schedule), or WSD still at its peak with its decay not yet due over
//   the new length: the schedule as if the run had been started with N steps, whose warm-up and
//   stable phase are those it has followed (WSD's stable phase is extended, its decay moved to the
//   new end);
// - otherwise (cosine past warm-up, WSD decaying): from the learning rate it had at that step down
//   to the floor at step N, in the schedule's own shape (a half cosine, a straight line).
// The step and learning rate it was resumed at are recorded in its checkpoints (trainer-state
// `schedule_from`), so every later resume computes the same learning rates.
import { learningRate, type ScheduleConfig } from "@moe8/optimizer";
import type { TrainConfig } from "./config.ts";

/** Where a run's length changed: the step it had done, and the learning rate of that step. */
export interface ScheduleFrom {
  step: number;
  lr: number;
}

export interface RunSchedule extends ScheduleConfig {
  /** null: the run has the length it started with. */
  from: ScheduleFrom | null;
}

export function runSchedule(cfg: TrainConfig, from: ScheduleFrom | null = null): RunSchedule {
  return {
    kind: cfg.schedule,
    peak: cfg.lr,
    warmup: cfg.warmup,
    total: cfg.steps,
    minRatio: cfg.minLrRatio,
    decayFraction: cfg.decayFraction,
    from,
  };
}

/** Learning rate at 1-based `step`. */
export function lrAt(s: RunSchedule, step: number): number {
  const from = s.from;
  if (!from || step <= from.step) return learningRate(s, step);
  const wsdDecayStart = s.total - Math.max(1, Math.round(s.total * s.decayFraction));
  const stillPlanned =
    from.step <= s.warmup || (s.kind === "wsd" && from.lr === s.peak && from.step <= wsdDecayStart);
  if (stillPlanned) return learningRate(s, step);
  const floor = s.peak * s.minRatio;
  const t = Math.min(1, (step - from.step) / Math.max(1, s.total - from.step));
  return s.kind === "cosine"
    ? floor + (from.lr - floor) * 0.5 * (1 + Math.cos(Math.PI * t))
    : from.lr + (floor - from.lr) * t;
}

/** The schedule of a run resumed after `step` steps with `steps` steps in all. */
export function resized(s: RunSchedule, step: number, steps: number): RunSchedule {
  if (steps === s.total) return s;
  // Nothing done yet: the run simply starts with the new length.
  if (step === 0) return { ...s, total: steps, from: null };
  return { ...s, total: steps, from: { step, lr: lrAt(s, step) } };
}
