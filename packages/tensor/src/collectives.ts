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
   * send[q] (2-D, f32 or i32, any number of rows, the same columns on every rank) goes to rank q;
   * returns recv, recv[q] being what rank q sent to this rank, on this rank's backend.
   */
  allToAll(send: Tensor[]): Promise<Tensor[]>;
}

/** The group of one process: every collective leaves its tensors as they are. */
export const SINGLE_PROCESS: Collectives = {
  rank: 0,
  size: 1,
  async allReduceSum() {},
  async broadcast() {},
  async allToAll(send) {
    return send;
  },
};
