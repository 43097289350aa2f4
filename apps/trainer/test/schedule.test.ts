// A resumed run given another length: the learning rate continues from where the run was, as
// docs/model.md ("Changing a run's length") says, with no jump at the step it was resumed at.
import { describe, expect, it } from "vitest";
import { DEFAULTS } from "../src/run/config.ts";
import { lrAt, resized, runSchedule } from "../src/run/schedule.ts";

const base = { ...DEFAULTS, lr: 1e-2, warmup: 10, minLrRatio: 0.1, decayFraction: 0.2 };
const floor = 1e-3;

describe("resized schedules", () => {
  it("cosine past warm-up: a half cosine from the current learning rate to the floor at the new end", () => {
    const old = runSchedule({ ...base, schedule: "cosine", steps: 100 });
    const s = resized(old, 40, 200);
    const at40 = lrAt(old, 40);
    expect(s.from).toEqual({ step: 40, lr: at40 });
    expect(lrAt(s, 41)).toBeLessThan(at40);
    expect(at40 - lrAt(s, 41)).toBeLessThan(at40 - lrAt(old, 41)); // stretched: it falls more slowly
    expect(lrAt(s, 120)).toBeCloseTo(floor + (at40 - floor) / 2, 12); // half-way
    expect(lrAt(s, 200)).toBeCloseTo(floor, 12);
    // A finished run stays at its floor.
    const done = resized(old, 100, 150);
    expect(lrAt(done, 101)).toBeCloseTo(floor, 12);
    expect(lrAt(done, 150)).toBeCloseTo(floor, 12);
  });

  it("in warm-up: the schedule of a run started with the new length", () => {
    const old = runSchedule({ ...base, schedule: "cosine", steps: 100 });
    const s = resized(old, 5, 300);
    const fresh = runSchedule({ ...base, schedule: "cosine", steps: 300 });
    for (const step of [6, 10, 11, 150, 300]) expect(lrAt(s, step)).toBe(lrAt(fresh, step));
  });

  it("WSD at its peak: the stable phase goes on and the decay moves to the new end", () => {
    const old = runSchedule({ ...base, schedule: "wsd", steps: 100 }); // decay over steps 81-100
    const s = resized(old, 60, 200); // decay over steps 161-200
    const fresh = runSchedule({ ...base, schedule: "wsd", steps: 200 });
    for (const step of [61, 100, 160, 161, 180, 200]) expect(lrAt(s, step)).toBe(lrAt(fresh, step));
    expect(lrAt(s, 160)).toBe(1e-2);
    expect(lrAt(s, 200)).toBeCloseTo(floor, 12);
  });

  it("WSD decaying: a straight line from the current learning rate to the floor at the new end", () => {
    const old = runSchedule({ ...base, schedule: "wsd", steps: 100 });
    const at90 = lrAt(old, 90);
    expect(at90).toBeLessThan(1e-2);
    const s = resized(old, 90, 190);
    expect(lrAt(s, 140)).toBeCloseTo((at90 + floor) / 2, 12);
    expect(lrAt(s, 190)).toBeCloseTo(floor, 12);
  });

  it("extended twice, and shortened: continuous, from the schedule in force", () => {
    const old = runSchedule({ ...base, schedule: "cosine", steps: 100 });
    const once = resized(old, 40, 200);
    const twice = resized(once, 120, 300);
    expect(twice.from).toEqual({ step: 120, lr: lrAt(once, 120) });
    expect(lrAt(twice, 300)).toBeCloseTo(floor, 12);
    const shorter = resized(old, 40, 60);
    expect(lrAt(shorter, 60)).toBeCloseTo(floor, 12);
    expect(resized(old, 40, 100)).toBe(old); // the same length: nothing changes
  });
});
