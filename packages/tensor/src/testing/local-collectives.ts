// Several data-parallel ranks in one process, for tests only: each rank has its own backend and
// model replica, and runs as one async task; a collective waits until every rank has called it (the
// k-th call of each rank meets the k-th of the others), then gives every rank the same sum, added in
// rank order as NCCL's ring would give one fixed order. Rank mistakes (different tensor counts or
// sizes) throw instead of hanging.
import type { Collectives } from "../collectives.ts";
import type { Tensor } from "../tensor.ts";

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
    /** Every rank's copies of `tensors` once all have called (the k-th call of each rank meets). */
    const exchange = async (tensors: Tensor[]): Promise<Summable[][]> => {
      const k = calls++;
      const mine = await Promise.all(
        tensors.map(async (t) => {
          const v = await t.read();
          if (!(v instanceof Float32Array || v instanceof Int32Array))
            throw new Error(`collectives: ${t} is not f32 or i32`);
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
      for (let q = 0; q < size; q++)
        tensors.forEach((_, i) => {
          const p = r.parts[q][i];
          if (!p || p.length !== mine[i].length)
            throw new Error(`collectives call ${k}: rank ${q} passed another tensor ${i}`);
        });
      return r.parts;
    };
    return {
      rank,
      size,
      async allReduceSum(tensors) {
        const parts = await exchange(tensors);
        tensors.forEach((t, i) => {
          const sum = parts[0][i].slice();
          for (let q = 1; q < size; q++) {
            const p = parts[q][i];
            for (let j = 0; j < sum.length; j++) sum[j] += p[j];
          }
          t.backend.write(t, sum);
        });
      },
      async broadcast(tensors, roots) {
        const parts = await exchange(tensors);
        tensors.forEach((t, i) => {
          if (roots[i] !== rank) t.backend.write(t, parts[roots[i]][i]);
        });
      },
    };
  });
}
