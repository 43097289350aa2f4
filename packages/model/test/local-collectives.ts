// Several data-parallel ranks in one process, for tests only: each rank has its own backend and
// model replica, and runs as one async task; a collective waits until every rank has called it (the
// k-th call of each rank meets the k-th of the others), then gives every rank the same sum, added in
// rank order as NCCL's ring would give one fixed order. Rank mistakes (different tensor counts or
// sizes) throw instead of hanging.
import type { Collectives } from "../src/collectives.ts";

type Summable = Float32Array | Int32Array;

interface Round {
  parts: Summable[][];
  arrived: number;
  done: Promise<void>;
  release(): void;
}

export function localGroup(size: number): Collectives[] {
  const rounds = new Map<number, Round>();
  const round = (k: number): Round => {
    let r = rounds.get(k);
    if (!r) {
      let release = () => {};
      const done = new Promise<void>((ok) => {
        release = ok;
      });
      r = { parts: [], arrived: 0, done, release };
      rounds.set(k, r);
    }
    return r;
  };
  return Array.from({ length: size }, (_, rank) => {
    let calls = 0;
    return {
      rank,
      size,
      async allReduceSum(tensors) {
        const k = calls++;
        const mine = await Promise.all(
          tensors.map(async (t) => {
            const v = await t.read();
            if (!(v instanceof Float32Array || v instanceof Int32Array))
              throw new Error(`allReduceSum: ${t} is not f32 or i32`);
            return v.slice();
          }),
        );
        const r = round(k);
        r.parts[rank] = mine;
        if (++r.arrived === size) {
          rounds.delete(k);
          r.release();
        }
        await r.done;
        tensors.forEach((t, i) => {
          const sum = r.parts[0][i].slice();
          for (let q = 1; q < size; q++) {
            const p = r.parts[q][i];
            if (!p || p.length !== sum.length)
              throw new Error(`allReduceSum call ${k}: rank ${q} passed another tensor ${i}`);
            for (let j = 0; j < sum.length; j++) sum[j] += p[j];
          }
          t.backend.write(t, sum);
        });
      },
    };
  });
}
