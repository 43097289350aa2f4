// Collective operations across the ranks of a data-parallel group (issue 22's engine; docs/runtime.md,
// "Several ranks"). A training step sums its gradients, losses and expert loads over the ranks
// through this interface whatever the world size: one process is the group of one
// (SINGLE_PROCESS, where every collective is the identity), so a single-GPU run goes through the
// same step code as a data-parallel one. Tests simulate several ranks in one process
// (`localGroup` in @moe8/tensor/testing); across GPUs the implementation is NCCL's.
import type { Tensor } from "./tensor.ts";

export interface Collectives {
  /** This process's rank, 0 .. size - 1. */
  readonly rank: number;
  /** Ranks in the group. */
  readonly size: number;
  /**
   * In place: each tensor becomes the element-wise sum of that tensor over the ranks (f32 or i32;
   * every rank passes the same list, in the same order, with the same shapes). The sum's order is
   * fixed (rank 0 + rank 1 + ...), so every rank gets the same bits.
   */
  allReduceSum(tensors: Tensor[]): Promise<void>;
  /** In place: tensor i becomes rank roots[i]'s tensor i on every rank (each rank passes the same list). */
  broadcast(tensors: Tensor[], roots: number[]): Promise<void>;
  /**
   * In place on rank roots[i] only: its tensor i becomes the sum of tensor i over the ranks (in the
   * order allReduceSum adds); the other ranks' tensor i is left as it was. What a sharded optimiser
   * needs of the gradients (each owner the sum of its parameters'): half the traffic of an
   * all-reduce, the other half being the broadcast of the updated weights.
   */
  reduceSum(tensors: Tensor[], roots: number[]): Promise<void>;
  /**
   * Starts, on tensors whose values are final, a reduceSum to `roots` (or with no roots an
   * allReduceSum) that may run beside the work enqueued after it: with NCCL on a stream of its own,
   * so that a bucket of gradients travels while the backward pass computes the next. The tensors
   * must be neither read nor written until `settle()`, which completes every reduction started so
   * far. Every rank starts the same reductions in the same order.
   */
  startReduce(tensors: Tensor[], roots?: number[]): void;
  settle(): Promise<void>;
  /**
   * send[q] (2-D, f32 or i32, any number of rows, the same columns on every rank) goes to rank q;
   * returns recv, recv[q] being what rank q sent to this rank, on this rank's backend. recvRows[q],
   * when the caller knows it, is the number of rows rank q sends this rank: NCCL then sizes the
   * buffers from it instead of exchanging every rank's counts first (an all-gather and a host
   * synchronisation less); where the rows are seen (the host's collectives) a mismatch is an error.
   */
  allToAll(send: Tensor[], recvRows?: readonly number[]): Promise<Tensor[]>;
  /**
   * A collective over this group (every rank calls it, in the same order as its other calls):
   * the ranks that pass the same `color` (an integer >= 0) form a new group, ranked in this group's
   * order, and each gets its own. What expert parallelism over part of the ranks runs on: the ranks
   * sharing their experts' tokens, and the replicas of the same experts (NCCL's ncclCommSplit).
   */
  split(color: number): Promise<Collectives>;
}

/** The group of one process: every collective leaves its tensors as they are. */
export const SINGLE_PROCESS: Collectives = {
  rank: 0,
  size: 1,
  async allReduceSum() {},
  async broadcast() {},
  async reduceSum() {},
  startReduce() {},
  async settle() {},
  async allToAll(send, recvRows) {
    if (recvRows && send[0].rows !== recvRows[0])
      throw new Error(`allToAll: rank 0 sent ${send[0].rows} rows, ${recvRows[0]} were expected`);
    return send;
  },
  async split(color) {
    checkSplitColor(color);
    return SINGLE_PROCESS;
  },
};

/** A split's color checked: an integer >= 0 (what every transport's `split` takes). */
export function checkSplitColor(color: number): void {
  if (!Number.isInteger(color) || color < 0) throw new Error(`split: color ${color} is not an integer >= 0`);
}

/**
 * The ranks of the group a split gives this rank: the ranks (of the parent, in its order) that
 * passed this rank's color, from every rank's color.
 */
function splitMembers(colors: ArrayLike<number>, rank: number): number[] {
  const out: number[] = [];
  for (let q = 0; q < colors.length; q++) if (colors[q] === colors[rank]) out.push(q);
  return out;
}

/** The values a collective moves: f32 or i32 tensors' contents. */
export type CollectiveValues = Float32Array | Int32Array;

/**
 * The k-th collective call's exchange: every rank's copies of its `tensors` (parts[q][i]: rank q's
 * tensor i), once all ranks have made their k-th call. With `sameSizes`, a tensor whose size differs
 * between ranks is an error.
 */
export type Exchange = (mine: CollectiveValues[], sameSizes: boolean) => Promise<CollectiveValues[][]>;

/** A tensor's values for a collective (a copy), or an error for another dtype. */
export async function collectiveValues(t: Tensor): Promise<CollectiveValues> {
  const v = await t.read();
  if (!(v instanceof Float32Array || v instanceof Int32Array))
    throw new Error(`collectives: ${t} is not f32 or i32`);
  return v.slice();
}

/**
 * A transport's exchange among some of its ranks: `id` names the group (the same string on each of
 * its members, different for every group ever made), `members` are its ranks in the transport's own
 * numbering (the first group's ranks), in group-rank order.
 */
export type OpenExchange = (id: string, members: readonly number[]) => Exchange;

/**
 * The collectives of rank `rank` of `size` on an exchange of everyone's values (in one process for
 * tests, over sockets between processes): allReduceSum adds in rank order (rank 0 + rank 1 + ..., in
 * the tensor's precision), so every rank gets the same bits; broadcast copies the root's values;
 * allToAll hands each rank the pieces addressed to it. `open` makes the exchanges of the groups
 * `split` forms (without it, split fails); `id` and `members` are this group's, as `open` got them.
 */
export function collectivesOver(
  rank: number,
  size: number,
  exchange: Exchange,
  open?: OpenExchange,
  id = "world",
  members: readonly number[] = Array.from({ length: size }, (_, q) => q),
): Collectives {
  let splits = 0;
  const gather = async (tensors: Tensor[], sameSizes = true) => {
    const mine = await Promise.all(tensors.map(collectiveValues));
    const parts = await exchange(mine, sameSizes);
    for (let q = 0; q < size; q++)
      mine.forEach((m, i) => {
        const p = parts[q]?.[i];
        if (!p || (sameSizes && p.length !== m.length))
          throw new Error(`collectives: rank ${q} passed another tensor ${i} than rank ${rank}`);
      });
    return parts;
  };
  const sumOf = (parts: CollectiveValues[][], i: number) => {
    const sum = parts[0][i].slice();
    for (let q = 1; q < size; q++) {
      const p = parts[q][i];
      for (let j = 0; j < sum.length; j++) sum[j] += p[j];
    }
    return sum;
  };
  // startReduce's tensors and roots (undefined: every rank) until settle.
  let started: { t: Tensor; root: number | undefined }[] = [];
  return {
    rank,
    size,
    startReduce(tensors, roots) {
      if (roots && roots.length !== tensors.length)
        throw new Error(`startReduce: ${roots.length} roots for ${tensors.length} tensors`);
      tensors.forEach((t, i) => {
        started.push({ t, root: roots?.[i] });
      });
    },
    // The host has no second stream: the started reductions go as one exchange here.
    async settle() {
      const list = started;
      started = [];
      if (list.length === 0) return;
      const parts = await gather(list.map((x) => x.t));
      list.forEach(({ t, root }, i) => {
        if (root === undefined || root === rank) t.backend.write(t, sumOf(parts, i));
      });
    },
    async allReduceSum(tensors) {
      const parts = await gather(tensors);
      tensors.forEach((t, i) => {
        t.backend.write(t, sumOf(parts, i));
      });
    },
    async reduceSum(tensors, roots) {
      if (roots.length !== tensors.length)
        throw new Error(`reduceSum: ${roots.length} roots for ${tensors.length} tensors`);
      // (Every rank sends everything here: the exchange is one all-to-all-of-everything; the
      // saving is NCCL's.)
      const parts = await gather(tensors);
      tensors.forEach((t, i) => {
        if (roots[i] === rank) t.backend.write(t, sumOf(parts, i));
      });
    },
    async allToAll(send, recvRows) {
      if (send.length !== size) throw new Error(`allToAll: ${send.length} tensors for ${size} ranks`);
      const parts = await gather(send, false);
      return parts.map((p, q) => {
        const t = send[q];
        const cols = t.shape[t.shape.length - 1];
        const data = p[rank];
        if (recvRows && data.length / cols !== recvRows[q])
          throw new Error(
            `allToAll: rank ${q} sent ${data.length / cols} rows, ${recvRows[q]} were expected`,
          );
        return t.backend.upload(data, [data.length / cols, cols], t.dtype);
      });
    },
    async broadcast(tensors, roots) {
      const parts = await gather(tensors);
      tensors.forEach((t, i) => {
        if (roots[i] !== rank) t.backend.write(t, parts[roots[i]][i]);
      });
    },
    async split(color) {
      checkSplitColor(color);
      if (!open) throw new Error(`split: the group "${id}" cannot form subgroups`);
      const k = splits++;
      const colors = (await exchange([Int32Array.of(color)], true)).map((p) => p[0][0]);
      const sub = splitMembers(colors, rank);
      const subId = `${id}/${k}:${color}`;
      const subMembers = sub.map((q) => members[q]);
      return collectivesOver(sub.indexOf(rank), sub.length, open(subId, subMembers), open, subId, subMembers);
    },
  };
}
