// Several ranks of a group in one process, for tests only: each rank has its own backend (and model
// replica), and runs as one async task; a collective waits until every rank has called it (the k-th
// call of each rank meets the k-th of the others). allReduceSum gives every rank the same sum, added
// in rank order as NCCL's ring gives one fixed order; broadcast copies the root's tensor; allToAll
// hands each rank the pieces addressed to it. Rank mistakes (different tensor counts or sizes) throw
// instead of hanging.
import { type Collectives, type CollectiveValues, collectivesOver } from "../collectives.ts";

interface Round {
  parts: CollectiveValues[][];
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
    // The k-th call of each rank meets the k-th of the others.
    return collectivesOver(rank, size, async (mine) => {
      const k = calls++;
      const r = round(k);
      r.parts[rank] = mine;
      if (++r.arrived === size) {
        rounds.delete(k);
        r.release();
      }
      await r.done;
      return r.parts;
    });
  });
}
