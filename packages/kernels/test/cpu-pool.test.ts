// The cpu backend's buffer pool on its own (src/cpu-pool.ts): size classes, reuse, initialisation
// and the counters. tests/cpu-pool.test.ts holds it to its purpose under real training steps.
import { describe, expect, it } from "vitest";
import { CpuBackend } from "../src/cpu-backend.ts";
import { HostBufferPool, sizeClass } from "../src/cpu-pool.ts";

describe("size classes", () => {
  it("hold the size asked for, at most 25% more above 256 bytes, and are stable", () => {
    let prev = 0;
    for (let bytes = 1; bytes < 1 << 22; bytes = Math.ceil(bytes * 1.07) + 1) {
      const c = sizeClass(bytes);
      expect(c).toBeGreaterThanOrEqual(bytes);
      expect(c).toBeGreaterThanOrEqual(prev);
      if (bytes > 256) expect(c).toBeLessThanOrEqual(bytes * 1.25 + 64);
      expect(sizeClass(c)).toBe(c);
      prev = c;
    }
    expect([sizeClass(1), sizeClass(256), sizeClass(257), sizeClass(512), sizeClass(513)]).toEqual([
      256, 256, 320, 512, 640,
    ]);
  });
});

describe("HostBufferPool", () => {
  it("hands a given-back buffer out again, zeroed when asked, and counts hits and misses", () => {
    const pool = new HostBufferPool();
    const a = pool.take("f32", 1000, "zeroed") as Float32Array;
    a.fill(3);
    pool.give(a);
    expect(pool.stats()).toEqual({ hits: 0, misses: 1, ownedBytes: 4096, freeBytes: 4096 });
    const b = pool.take("i32", 900, "zeroed");
    expect(b.buffer).toBe(a.buffer);
    expect(b.length).toBe(900);
    expect(b.every((v) => v === 0)).toBe(true);
    expect(pool.stats()).toEqual({ hits: 1, misses: 1, ownedBytes: 4096, freeBytes: 0 });
    pool.give(b);
    const c = pool.take("f32", 1000, "poison") as Float32Array;
    expect(c.every(Number.isNaN)).toBe(true);
  });

  it("a buffer given back twice is handed out once; foreign arrays are ignored", () => {
    const pool = new HostBufferPool();
    const a = pool.take("f32", 100, "any");
    pool.give(a);
    pool.give(a);
    pool.give(new Float32Array(100));
    const x = pool.take("f32", 100, "any");
    const y = pool.take("f32", 100, "any");
    expect(x.buffer).toBe(a.buffer);
    expect(y.buffer).not.toBe(a.buffer);
    expect(pool.stats().misses).toBe(2);
  });

  it("capacity sizes the buffer for the largest length of a varying array", () => {
    const pool = new HostBufferPool();
    pool.give(pool.take("f32", 10, "any", 5000));
    expect(pool.take("f32", 4900, "any", 5000).length).toBe(4900);
    expect(pool.stats().hits).toBe(1);
  });

  it("trim drops the free buffers", () => {
    const pool = new HostBufferPool();
    pool.give(pool.take("e4m3", 1 << 20, "any"));
    const inUse = pool.take("f32", 10, "any");
    pool.trim();
    expect(pool.stats()).toMatchObject({ ownedBytes: 256, freeBytes: 0 });
    pool.give(inUse);
    expect(pool.stats().freeBytes).toBe(256);
  });
});

describe("the cpu backend's storage", () => {
  it("released tensors give their storage back; zeros() clears a reused buffer", async () => {
    const be = new CpuBackend();
    const first = be.scope(() => {
      const t = be.upload(Float32Array.of(1, 2, 3, 4), [2, 2]);
      return t.storage as Float32Array;
    });
    const misses = be.poolStats().misses;
    const z = be.zeros([2, 2]);
    expect((z.storage as Float32Array).buffer).toBe(first.buffer);
    expect(Array.from((await z.read()) as Float32Array)).toEqual([0, 0, 0, 0]);
    expect(be.poolStats().misses).toBe(misses);
  });
});
