// Learning-rate schedules: linear warm-up then cosine decay to a floor (docs/model.md: 10% of peak), and
// warm-up-stable-decay (WSD: constant after warm-up, then a linear decay over the last fraction).

export interface ScheduleConfig {
  kind: "cosine" | "wsd";
  peak: number;
  warmup: number;
  total: number;
  /** Final learning rate as a fraction of the peak. */
  minRatio: number;
  /** WSD only: the fraction of the run spent decaying. */
  decayFraction: number;
}

/** Learning rate at 1-based `step`. */
export function learningRate(s: ScheduleConfig, step: number): number {
  if (s.warmup > 0 && step <= s.warmup) return (s.peak * step) / s.warmup;
  const floor = s.peak * s.minRatio;
  if (s.kind === "cosine") {
    const span = Math.max(1, s.total - s.warmup);
    const t = Math.min(1, (step - s.warmup) / span);
    return floor + (s.peak - floor) * 0.5 * (1 + Math.cos(Math.PI * t));
  }
  const decaySteps = Math.max(1, Math.round(s.total * s.decayFraction));
  const decayStart = s.total - decaySteps;
  if (step <= decayStart) return s.peak;
  const t = Math.min(1, (step - decayStart) / decaySteps);
  return s.peak + (floor - s.peak) * t;
}
