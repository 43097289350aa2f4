// Several ranks of a group in one process, for tests only: each rank has its own backend (and model
// replica), and runs as one async task; a collective waits until every rank has called it (the k-th
// call of each rank meets the k-th of the others). allReduceSum gives every rank the same sum, added
// in rank order as NCCL's ring gives one fixed order; broadcast copies the root's tensor; allToAll
// hands each rank the pieces addressed to it; split forms subgroups whose calls meet only their
// members' (as separate NCCL communicators do). Rank mistakes (different tensor counts or sizes)
// throw instead of hanging.
import {
  type Collectives,
  type CollectiveValues,
  collectivesOver,
  type OpenExchange,
} from "../collectives.ts";

interface Round {
  parts: CollectiveValues[][];
  arrived: number;
  done: Promise<void>;
  release(): void;
}

export function localGroup(size: number): Collectives[] {
  // Every group's rounds, by group id and call number.
  const rounds = new Map<string, Round>();
  const round = (key: string): Round => {
    let r = rounds.get(key);
    if (!r) {
      let release = () => {};
      const done = new Promise<void>((ok) => {
        release = ok;
      });
      r = { parts: [], arrived: 0, done, release };
      rounds.set(key, r);
    }
    return r;
  };
  // World rank `rank`'s view of a group: the k-th call of each member meets the k-th of the others.
  const openFor =
    (rank: number): OpenExchange =>
    (id, members) => {
      const at = members.indexOf(rank);
      if (at < 0) throw new Error(`localGroup: rank ${rank} is not in group ${id}`);
      let calls = 0;
      return async (mine) => {
        const key = `${id}#${calls++}`;
        const r = round(key);
        r.parts[at] = mine;
        if (++r.arrived === members.length) {
          rounds.delete(key);
          r.release();
        }
        await r.done;
        return r.parts;
      };
    };
  const world = Array.from({ length: size }, (_, q) => q);
  return world.map((rank) => collectivesOver(rank, size, openFor(rank)("world", world), openFor(rank)));
}
