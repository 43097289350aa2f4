// NCCL, loaded at run time (src/cuda/nccl.rs) and behind the Collectives interface on the cuda
// backend (src/cuda-backend/nccl.ts). Everywhere: a missing library is one clear error naming what
// was tried. Where libnccl.so.2 is found (PyTorch's install on the GPU machine, or MOE8_NCCL_LIB):
// its version and unique ids. Where a GPU is present too: a communicator of one rank through every
// collective (one GPU cannot hold two NCCL ranks). MOE8_REQUIRE_NCCL=1 makes a missing NCCL or GPU a
// failure instead of a skip.
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { CudaBackend } from "../src/cuda-backend.ts";
import { loadNative } from "../src/index.ts";

const native = loadNative().addon;
const compiled = typeof native?.ncclInfo === "function";
const nccl = compiled ? native!.ncclInfo() : null;
const cuda = compiled ? native!.cudaInfo().available : false;
const required = process.env.MOE8_REQUIRE_NCCL === "1";
const addonPath = fileURLToPath(new URL("../native.cjs", import.meta.url));

/** ncclInfo() and ncclUniqueId()'s error in a fresh process (the library is looked up once). */
function inChild(env: Record<string, string>): { info: Record<string, unknown>; idError: string } {
  const js = `const a = require(${JSON.stringify(addonPath)});
    let idError = "";
    try { a.ncclUniqueId(); } catch (e) { idError = e.message; }
    console.log(JSON.stringify({ info: a.ncclInfo(), idError }));`;
  const r = spawnSync(process.execPath, ["-e", js], { env: { ...process.env, ...env }, encoding: "utf8" });
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout);
}

describe.skipIf(!compiled)("NCCL's library", () => {
  it("names what it tried and how to install it when libnccl.so.2 is not there", () => {
    const { info, idError } = inChild({ MOE8_NCCL_LIB: "/nonexistent/libnccl.so.2" });
    expect(info.available).toBe(false);
    expect(info.reason).toContain("/nonexistent/libnccl.so.2");
    expect(info.reason).toContain("MOE8_NCCL_LIB");
    expect(idError).toBe(info.reason);
  });

  it("refuses a unique id of the wrong length before loading anything", () => {
    expect(() => new native!.NcclComm(Buffer.alloc(100), 1, 0)).toThrow(/100 bytes, not 128/);
  });

  it.skipIf(!nccl?.available && !required)("reports its version, and each unique id is new", () => {
    expect(nccl?.reason ?? null).toBeNull();
    expect(nccl?.version).toMatch(/^2\.\d+\.\d+$/);
    // ncclCommSplit came with 2.18.
    const [, minor] = nccl!.version!.split(".").map(Number);
    expect(nccl?.split).toBe(minor >= 18);
    const a = native!.ncclUniqueId();
    const b = native!.ncclUniqueId();
    expect(a.length).toBe(128);
    expect(a.equals(b)).toBe(false);
  });
});

describe.skipIf(!(nccl?.available && cuda) && !required)("NCCL collectives on the cuda backend", () => {
  it("a group of one rank: sums, reductions and broadcasts leave the values, allToAll hands back what was sent", async () => {
    const b = new CudaBackend();
    const comm = new native!.NcclComm(native!.ncclUniqueId(), 1, 0);
    const c = b.ncclCollectives(comm);
    expect([c.rank, c.size]).toEqual([0, 1]);
    const f = Float32Array.from({ length: 1000 }, (_, i) => Math.sin(i) * 1e3);
    const n = Int32Array.from({ length: 77 }, (_, i) => i * 7 - 100);
    await b.scope(async () => {
      const tf = b.upload(f, [10, 100]);
      const ti = b.upload(n, [77], "i32");
      const empty = b.upload(new Float32Array(0), [0, 4]);
      await c.allReduceSum([tf, ti, empty]);
      expect(Array.from((await tf.read()) as Float32Array)).toEqual(Array.from(f));
      expect(Array.from((await ti.read()) as Int32Array)).toEqual(Array.from(n));
      await c.broadcast([tf, ti], [0, 0]);
      expect(Array.from((await tf.read()) as Float32Array)).toEqual(Array.from(f));
      await c.reduceSum([tf, ti, empty], [0, 0, 0]);
      expect(Array.from((await tf.read()) as Float32Array)).toEqual(Array.from(f));
      expect(Array.from((await ti.read()) as Int32Array)).toEqual(Array.from(n));
      await expect(c.reduceSum([tf], [0, 0])).rejects.toThrow(/2 roots for 1 tensors/);
      // Started on the side stream after the work before it, joined before the work after it.
      const x = b.scale(tf, 2);
      c.startReduce([x, ti]);
      c.startReduce([empty], [0]);
      await c.settle();
      const y = b.scale(x, 0.5);
      expect(Array.from((await y.read()) as Float32Array)).toEqual(Array.from(f));
      expect(Array.from((await ti.read()) as Int32Array)).toEqual(Array.from(n));
      const [back] = await c.allToAll([tf]);
      expect(back.shape).toEqual([10, 100]);
      expect(Array.from((await back.read()) as Float32Array)).toEqual(Array.from(f));
      const [none] = await c.allToAll([empty]);
      expect(none.shape).toEqual([0, 4]);
      // The rows to receive given: no count exchange; a count this rank contradicts is refused.
      const [known] = await c.allToAll([tf], [10]);
      expect(Array.from((await known.read()) as Float32Array)).toEqual(Array.from(f));
      await expect(c.allToAll([tf], [11])).rejects.toThrow(/sends itself 10 rows, 11 were expected/);
      await expect(c.allReduceSum([b.cast(b.upload(new Float32Array(4), [4]), "bf16")])).rejects.toThrow(
        /not f32 or i32/,
      );
    });
    comm.dispose();
    expect(comm.disposed).toBe(true);
  });

  it("split: a group of one rank's subgroup (ncclCommSplit) sums and exchanges, and ends with its maker's owner", async () => {
    const b = new CudaBackend();
    const comm = new native!.NcclComm(native!.ncclUniqueId(), 1, 0);
    const made: InstanceType<NonNullable<typeof native>["NcclComm"]>[] = [];
    const c = b.ncclCollectives(comm, made);
    await expect(c.split(-1)).rejects.toThrow("split: color -1 is not an integer >= 0");
    const sub = await c.split(3);
    const subsub = await sub.split(0);
    expect([sub.rank, sub.size, subsub.rank, subsub.size]).toEqual([0, 1, 0, 1]);
    expect(made.length).toBe(2);
    const f = Float32Array.from({ length: 300 }, (_, i) => Math.cos(i) * 10);
    await b.scope(async () => {
      const t = b.upload(f, [3, 100]);
      await subsub.allReduceSum([t]);
      await sub.broadcast([t], [0]);
      const [back] = await sub.allToAll([t], [3]);
      expect(Array.from((await back.read()) as Float32Array)).toEqual(Array.from(f));
    });
    for (const m of made) m.dispose();
    comm.dispose();
    expect(made.every((m) => m.disposed)).toBe(true);
  });
});
