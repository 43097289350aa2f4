// What `bench gemm` times and on which groups: the experts' uneven offsets it reports (PyTorch's
// grouped GEMM is timed on the same ones), and deviceMs taking each call's GPU span from a backend
// that times its kernels with device events, as PyTorch's CUDA-event timers do.
import { type Backend, TsBackend } from "@moe8/tensor";
import { describe, expect, it } from "vitest";
import { expertOffsets } from "../src/commands/bench/gemm-device.ts";
import { deviceMs } from "../src/commands/bench/timing.ts";

describe("bench gemm's timing", () => {
  it("times the experts on 64 uneven groups of 98,304 rows, the same every run", () => {
    const off = expertOffsets();
    expect(off.length).toBe(65);
    expect(off[0]).toBe(0);
    expect(off[64]).toBe(98304);
    const sizes = Array.from({ length: 64 }, (_, e) => off[e + 1] - off[e]);
    const mean = 98304 / 64;
    // Drawn from 0.5 to 1.5 of the mean (normalised to the rows): uneven, none empty.
    expect(Math.min(...sizes)).toBeGreaterThan(0.3 * mean);
    expect(Math.max(...sizes)).toBeLessThan(1.7 * mean);
    expect(Math.max(...sizes) / Math.min(...sizes)).toBeGreaterThan(1.5);
    expect([...expertOffsets()]).toEqual([...off]);
  });

  it("times them on 64 balanced groups of 1,536 rows with --groups balanced", () => {
    const off = expertOffsets("balanced");
    expect(off.length).toBe(65);
    expect(Array.from({ length: 64 }, (_, e) => off[e + 1] - off[e])).toEqual(new Array(64).fill(1536));
  });

  it("deviceMs takes the median of the calls' GPU spans where the backend times its kernels", async () => {
    const b = new TsBackend();
    const spans = [5, 1, 9, 2, 7, 3, 8, 4, 6, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23];
    let calls = 0;
    const timed = Object.assign(Object.create(b), {
      async timeKernels(run: () => Promise<unknown>) {
        await run();
        return { spanMs: spans[calls++] };
      },
    }) as Backend;
    let ops = 0;
    const ms = await deviceMs(
      timed,
      () => {
        ops++;
        return b.zeros([2, 2]);
      },
      3,
    );
    // 3 warm-up calls (spans 5, 1, 9 dropped), then the median of the next 20 (2 .. 22 without 5, 1, 9).
    expect(calls).toBe(23);
    expect(ops).toBe(23);
    const kept = spans.slice(3).sort((x, y) => x - y);
    expect(ms).toBe(kept[10]);
  });
});
