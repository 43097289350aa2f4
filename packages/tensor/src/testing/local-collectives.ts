// Several ranks of a group in one process, for tests only: each rank has its own backend (and model
// replica), and runs as one async task; a collective waits until every rank has called it (the k-th
// call of each rank meets the k-th of the others). allReduceSum gives every rank the same sum, added
// in rank order as NCCL's ring gives one fixed order; broadcast copies the root's tensor; allToAll
// hands each rank the pieces addressed to it. Rank mistakes (different tensor counts or sizes) throw
// instead of hanging.
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
    const exchange = async (tensors: Tensor[], sameSizes = true): Promise<Summable[][]> => {
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
          if (!p || (sameSizes && p.length !== mine[i].length))
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
      async allToAll(send) {
        if (send.length !== size) throw new Error(`allToAll: ${send.length} tensors for ${size} ranks`);
        const parts = await exchange(send, false);
        return parts.map((p, q) => {
          const t = send[q];
          const cols = t.shape[t.shape.length - 1];
          const data = p[rank];
          return t.backend.upload(data, [data.length / cols, cols], t.dtype);
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
