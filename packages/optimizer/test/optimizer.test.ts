import { Param, TsBackend } from "@moe8/tensor";
import { describe, expect, it } from "vitest";
import { ADAMW_DEFAULTS, AdamW } from "../src/adamw.ts";
import { learningRate, type ScheduleConfig } from "../src/schedule.ts";

const S: ScheduleConfig = {
  kind: "cosine",
  peak: 1e-3,
  warmup: 10,
  total: 110,
  minRatio: 0.1,
  decayFraction: 0.2,
};

describe("schedules", () => {
  it("linear warm-up then cosine to 10% of peak", () => {
    expect(learningRate(S, 1)).toBeCloseTo(1e-4, 12);
    expect(learningRate(S, 10)).toBeCloseTo(1e-3, 12);
    expect(learningRate(S, 60)).toBeCloseTo(1e-4 + 0.9e-3 * 0.5, 12); // half-way: cos(pi/2) = 0
    expect(learningRate(S, 110)).toBeCloseTo(1e-4, 12);
  });
  it("warm-up-stable-decay holds the peak, then decays linearly over the last fraction", () => {
    const w = { ...S, kind: "wsd" as const };
    expect(learningRate(w, 50)).toBe(1e-3);
    expect(learningRate(w, 88)).toBe(1e-3); // decay starts at 110 - 22
    expect(learningRate(w, 99)).toBeCloseTo(1e-3 + (1e-4 - 1e-3) * 0.5, 12);
    expect(learningRate(w, 110)).toBeCloseTo(1e-4, 12);
  });
});

describe("AdamW", () => {
  const b = new TsBackend();
  const grad = Float32Array.of(0.5, -2, 0, 3);
  const start = Float32Array.of(1, -1, 0.5, 2);

  function run(moments: "f32" | "bf16", decay: boolean) {
    const p = Param.create(b, { name: "w", init: start, shape: [4], decay });
    b.write(p.grad, grad);
    const opt = new AdamW(b, [p], { ...ADAMW_DEFAULTS, moments });
    const one = b.keep(b.upload(Float32Array.of(1), [1]));
    opt.update(0.01, one);
    opt.update(0.01, one);
    return { p, opt };
  }

  it("matches the update written out by hand (two steps, f32 moments, decoupled decay)", async () => {
    const { p } = run("f32", true);
    const got = (await p.value.read()) as Float32Array;
    for (let i = 0; i < 4; i++) {
      let w = start[i];
      let m = 0;
      let v = 0;
      for (let t = 1; t <= 2; t++) {
        m = 0.9 * m + 0.1 * grad[i];
        v = 0.95 * v + 0.05 * grad[i] ** 2;
        w = w * (1 - 0.01 * 0.1) - (0.01 * (m / (1 - 0.9 ** t))) / (Math.sqrt(v / (1 - 0.95 ** t)) + 1e-8);
      }
      expect(got[i]).toBeCloseTo(w, 6);
    }
  });

  it("lrScale trains a parameter group at its multiple of the learning rate, the others at lr", async () => {
    const mk = (name: string, group?: "router") => {
      const p = Param.create(b, { name, init: start, shape: [4], decay: false, group });
      b.write(p.grad, grad);
      return p;
    };
    const [w, r] = [mk("w"), mk("gate.weight", "router")];
    const opt = new AdamW(b, [w, r], { ...ADAMW_DEFAULTS, moments: "f32", lrScale: { router: 0.25 } });
    opt.update(0.01, b.keep(b.upload(Float32Array.of(1), [1])));
    const [dw, dr] = [w, r].map(async (p) =>
      Array.from((await p.value.read()) as Float32Array, (x, i) => x - start[i]),
    );
    const [a, c] = await Promise.all([dw, dr]);
    // Step 1 of Adam moves each element by lr * g / (|g| + eps): -0.01 or +0.01, 0 where g is 0.
    for (let i = 0; i < 4; i++) {
      expect(a[i]).toBeCloseTo(grad[i] === 0 ? 0 : -0.01 * Math.sign(grad[i]), 6);
      expect(c[i]).toBeCloseTo(a[i] * 0.25, 6);
    }
  });

  it("no weight decay for parameters marked so; BF16 moments stay close to f32 ones", async () => {
    const nd = (await run("f32", false).p.value.read()) as Float32Array;
    expect(nd[2]).toBe(0.5); // zero gradient and no decay: unchanged
    const bf = (await run("bf16", true).p.value.read()) as Float32Array;
    const f = (await run("f32", true).p.value.read()) as Float32Array;
    for (let i = 0; i < 4; i++) expect(Math.abs(bf[i] - f[i])).toBeLessThan(1e-4);
  });

  it("state round-trips exactly (checkpoint and resume)", async () => {
    const a = run("bf16", true);
    const saved = new Map<string, Float32Array>();
    for (const [k, t] of a.opt.stateTensors()) saved.set(k, (await b.cast(t, "f32").read()) as Float32Array);
    const p2 = Param.create(b, { name: "w", init: start, shape: [4], decay: true });
    const o2 = new AdamW(b, [p2], { ...ADAMW_DEFAULTS, moments: "bf16" });
    o2.loadState(a.opt.step, (k) => saved.get(k));
    expect(o2.step).toBe(2);
    for (const [k, t] of o2.stateTensors())
      expect(Array.from((await t.read()) as Uint16Array)).toEqual(
        Array.from((await a.opt.stateTensors().get(k)!.read()) as Uint16Array),
      );
    expect(() => o2.loadState(2, () => undefined)).toThrow(/missing w\.exp_avg/);
  });

  it("a fused weight resumes from a checkpoint that kept one moment per part (before the fusion)", async () => {
    // Two experts of [gate; up] = [2 x 2 rows, 3 columns]; the old state has gate and up apart.
    const name = "l.experts.gate_up_proj.weight";
    const p = Param.create(b, {
      name,
      init: new Float32Array(24),
      shape: [2, 4, 3],
      decay: true,
      parts: ["gate_proj", "up_proj"],
    });
    const opt = new AdamW(b, [p], { ...ADAMW_DEFAULTS, moments: "f32" });
    const part = (base: number) => Float32Array.from({ length: 12 }, (_, i) => base + i);
    const old = new Map([
      ["l.experts.gate_proj.weight.exp_avg", part(100)],
      ["l.experts.up_proj.weight.exp_avg", part(200)],
      ["l.experts.gate_proj.weight.exp_avg_sq", part(300)],
      ["l.experts.up_proj.weight.exp_avg_sq", part(400)],
    ]);
    opt.loadState(7, (k) => old.get(k));
    const m = Array.from((await opt.stateTensors().get(`${name}.exp_avg`)!.read()) as Float32Array);
    // Expert 0: gate rows 0-1, up rows 0-1; expert 1: gate rows 2-3, up rows 2-3.
    expect(m).toEqual([
      100, 101, 102, 103, 104, 105, 200, 201, 202, 203, 204, 205, 106, 107, 108, 109, 110, 111, 206, 207, 208,
      209, 210, 211,
    ]);
    old.delete("l.experts.up_proj.weight.exp_avg_sq");
    expect(() => opt.loadState(7, (k) => old.get(k))).toThrow(
      /missing l\.experts\.gate_up_proj\.weight\.exp_avg_sq/,
    );
  });
});
