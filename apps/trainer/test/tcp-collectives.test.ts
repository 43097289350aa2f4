// The TCP collectives (src/dist/tcp-collectives.ts) over real localhost sockets, ranks in one process:
// the same results as the in-process double (localGroup) for every collective, tensors of both
// dtypes and uneven all-to-all pieces, and a rank that disconnects fails the others' call with its
// name instead of hanging.
import { type Collectives, Rng, type Tensor, TsBackend } from "@moe8/tensor";
import { localGroup } from "@moe8/tensor/testing";
import { describe, expect, it } from "vitest";
import { tcpHub, tcpJoin } from "../src/dist/tcp-collectives.ts";

async function tcpGroup(size: number) {
  const { port, group } = await tcpHub(size);
  const others = await Promise.all(Array.from({ length: size - 1 }, (_, i) => tcpJoin(i + 1, size, port)));
  return [await group, ...others];
}

/** Each rank's results of a fixed round of collectives, as plain arrays. */
async function round(group: Collectives[]) {
  return Promise.all(group.map(roundOn));
}

/** One rank's part of `round`. */
async function roundOn(c: Collectives) {
  return (async () => {
    const b = new TsBackend();
    const rng = new Rng(100 + c.rank);
    const f = b.upload(rng.normals(1000), [10, 100]);
    const i = b.upload(
      Int32Array.from({ length: 7 }, (_, j) => j * (c.rank + 1)),
      [7],
      "i32",
    );
    await c.allReduceSum([f, i]);
    const roots = [1 % c.size, 0];
    const bc = [b.upload(rng.normals(33), [33]), b.upload(Int32Array.of(c.rank, 5), [2], "i32")];
    await c.broadcast(bc, roots);
    const red = [b.upload(rng.normals(20), [20]), b.upload(Int32Array.of(c.rank + 1, 2), [2], "i32")];
    await c.reduceSum(red, [0, c.size - 1]);
    // Started reductions (the gradient buckets): two starts, one settle.
    const st = [b.upload(rng.normals(9), [9]), b.upload(rng.normals(4), [4]), b.upload(rng.normals(6), [6])];
    c.startReduce([st[0]]);
    c.startReduce([st[1], st[2]], [c.size - 1, 0]);
    await c.settle();
    // Rank r sends q + r rows to rank q.
    const send = Array.from({ length: c.size }, (_, q) =>
      b.upload(rng.normals((q + c.rank) * 3), [q + c.rank, 3]),
    );
    const recv = await c.allToAll(send);
    // The same with the rows each rank sends this one given (rank q sends q + rank).
    const known = await c.allToAll(
      send,
      Array.from({ length: c.size }, (_, q) => q + c.rank),
    );
    const read = async (t: Tensor) => Array.from((await t.read()) as Float32Array | Int32Array);
    return {
      sums: [await read(f), await read(i)],
      bc: [await read(bc[0]), await read(bc[1])],
      red: [await read(red[0]), await read(red[1])],
      started: await Promise.all(st.map(read)),
      recv: await Promise.all(recv.map(async (t) => [t.shape, await read(t)])),
      known: await Promise.all(known.map(async (t) => [t.shape, await read(t)])),
    };
  })();
}

/**
 * Each rank of 4 splits its group twice (the replicas of one expert shard: rank % 2; the ranks
 * sharing tokens: rank / 2) and runs `round` in both subgroups, the one subgroup's calls beside the
 * other's, then once more in a split of a split, then in the whole group.
 */
async function splitRounds(group: Collectives[]) {
  return Promise.all(
    group.map(async (c) => {
      const replicas = await c.split(c.rank % 2);
      const shard = await c.split(Math.floor(c.rank / 2));
      const alone = await shard.split(shard.rank);
      return {
        ranks: [replicas, shard, alone].map((g) => [g.rank, g.size]),
        replicas: await roundOn(replicas),
        shard: await roundOn(shard),
        alone: await roundOn(alone),
        whole: await roundOn(c),
      };
    }),
  );
}

describe("collectives over TCP", () => {
  for (const size of [1, 2, 4])
    it(`${size} ranks give the in-process double's results, bit for bit`, async () => {
      const tcp = await tcpGroup(size);
      try {
        expect(await round(tcp.map((g) => g.collectives))).toEqual(await round(localGroup(size)));
      } finally {
        for (const g of tcp) g.close();
      }
    });

  it("split: each subgroup gives a group of its size's results, over TCP as in the double", async () => {
    const [two, one, four] = [
      await round(localGroup(2)),
      await round(localGroup(1)),
      await round(localGroup(4)),
    ];
    // Rank r is rank r / 2 of the replicas {r % 2, r % 2 + 2} and rank r % 2 of the shard {2 (r / 2), +1}.
    const want = [0, 1, 2, 3].map((r) => ({
      ranks: [
        [r >> 1, 2],
        [r & 1, 2],
        [0, 1],
      ],
      replicas: two[r >> 1],
      shard: two[r & 1],
      alone: one[0],
      whole: four[r],
    }));
    expect(await splitRounds(localGroup(4))).toEqual(want);
    const tcp = await tcpGroup(4);
    try {
      expect(await splitRounds(tcp.map((g) => g.collectives))).toEqual(want);
    } finally {
      for (const g of tcp) g.close();
    }
  });

  it("split refuses a color that is not an integer >= 0", async () => {
    await expect(localGroup(1)[0].split(-1)).rejects.toThrow("split: color -1 is not an integer >= 0");
    await expect(localGroup(1)[0].split(0.5)).rejects.toThrow("split: color 0.5 is not an integer >= 0");
  });

  it("allToAll with the rows to receive given: the same pieces, and a wrong count is an error", async () => {
    const got = await Promise.allSettled(
      localGroup(2).map(async (c) => {
        const b = new TsBackend();
        const send = [b.zeros([2, 3]), b.zeros([1, 3])];
        return c.allToAll(send, c.rank === 0 ? [2, 2] : [1, 1]);
      }),
    );
    // Every rank sends 2 rows to rank 0 and 1 to rank 1.
    expect(got.map((g) => g.status)).toEqual(["fulfilled", "fulfilled"]);
    const wrong = await Promise.allSettled(
      localGroup(2).map(async (c) =>
        c.allToAll([new TsBackend().zeros([1, 3]), new TsBackend().zeros([1, 3])], [2, 1]),
      ),
    );
    expect(wrong[0]).toMatchObject({
      status: "rejected",
      reason: { message: "allToAll: rank 0 sent 1 rows, 2 were expected" },
    });
  });

  it("reduceSum: each root holds the sum in rank order, the other ranks keep their own", async () => {
    const group = localGroup(3);
    const mine = (r: number) => Float32Array.from({ length: 5 }, (_, j) => (r + 1) * 0.1 + j);
    const got = await Promise.all(
      group.map(async (c) => {
        const b = new TsBackend();
        const t = [b.upload(mine(c.rank), [5]), b.upload(Int32Array.of(c.rank, 10), [2], "i32")];
        await c.reduceSum(t, [2, 0]);
        return Promise.all(t.map(async (x) => Array.from((await x.read()) as Float32Array | Int32Array)));
      }),
    );
    const sum = Float32Array.from(mine(0));
    for (const r of [1, 2])
      mine(r).forEach((v, j) => {
        sum[j] += v;
      });
    expect(got[2][0]).toEqual(Array.from(sum));
    expect(got[0][0]).toEqual(Array.from(mine(0)));
    expect(got[1][0]).toEqual(Array.from(mine(1)));
    expect(got[0][1]).toEqual([3, 30]);
    expect(got[1][1]).toEqual([1, 10]);
    expect(got[2][1]).toEqual([2, 10]);
    await expect(group[0].reduceSum([new TsBackend().zeros([1])], [])).rejects.toThrow(
      /0 roots for 1 tensors/,
    );
  });

  it("startReduce and settle: the same sums as reduceSum and allReduceSum", async () => {
    const run = (started: boolean) =>
      Promise.all(
        localGroup(3).map(async (c) => {
          const b = new TsBackend();
          const rng = new Rng(7 + c.rank);
          const t = [b.upload(rng.normals(8), [8]), b.upload(rng.normals(5), [5])];
          if (started) {
            c.startReduce([t[0]]);
            c.startReduce([t[1]], [1]);
            // Nothing moves before settle.
            const own = Array.from(new Rng(7 + c.rank).normals(8));
            expect(Array.from((await t[0].read()) as Float32Array)).toEqual(own);
            await c.settle();
          } else {
            await c.allReduceSum([t[0]]);
            await c.reduceSum([t[1]], [1]);
          }
          return Promise.all(t.map(async (x) => Array.from((await x.read()) as Float32Array)));
        }),
      );
    expect(await run(true)).toEqual(await run(false));
    const c = localGroup(2)[0];
    expect(() => c.startReduce([new TsBackend().zeros([1])], [0, 1])).toThrow(/2 roots for 1 tensors/);
    await c.settle(); // nothing started: returns at once
  });

  it("a rank that leaves fails the others' next call, naming it", async () => {
    const [hub, one, two] = await tcpGroup(3);
    const b = new TsBackend();
    two.close();
    const calls = [hub, one].map((g) => g.collectives.allReduceSum([b.upload(new Float32Array(4), [4])]));
    await expect(calls[0]).rejects.toThrow(/rank 2 disconnected/);
    hub.close();
    await expect(calls[1]).rejects.toThrow(/rank 0 disconnected/);
    one.close();
  });

  it("gives up on ranks that never connect", async () => {
    const { group } = await tcpHub(3, 0, 300);
    await expect(group).rejects.toThrow(/2 of 2 ranks did not connect within 0.3 s/);
  });
});
