// The Collectives of one rank over NCCL (issue 22; src/cuda/nccl.rs): what a data-parallel step
// sums, broadcasts and exchanges, moved between GPUs on the backend's stream without the host
// copying anything. The arithmetic differs from the in-process double's (collectivesOver adds in
// rank order; NCCL's ring or tree adds in its own order), but every rank receives the same bits of
// an all-reduce, which is what keeps the replicas identical.
import { BYTES_PER_ELEMENT, type Collectives, checkSplitColor, type Tensor } from "@moe8/tensor";
import type { NcclComm } from "../../native.d.cts";
import type { CudaContext } from "./context.ts";

type Moved = "f32" | "i32";

function moved(t: Tensor, op: string): Moved {
  if (t.dtype !== "f32" && t.dtype !== "i32") throw new Error(`${op}: ${t} is not f32 or i32`);
  return t.dtype;
}

/** The device address of a tensor's first element (0 for an empty tensor: NCCL then moves nothing). */
function addr(cx: CudaContext, t: Tensor): number {
  return t.size === 0 ? 0 : cx.p(t);
}

/**
 * `made`: where the communicators that `split` makes are put, for their owner to dispose with
 * `comm` (nothing frees them otherwise).
 */
export function ncclCollectives(cx: CudaContext, comm: NcclComm, made: NcclComm[] = []): Collectives {
  const { rank, size } = comm;
  // One NCCL group per dtype, the tensors in the caller's order.
  const byDtype = (tensors: Tensor[], op: string) =>
    (["f32", "i32"] as const)
      .map((d) => [d, tensors.map((t, i) => [t, i] as const).filter(([t]) => moved(t, op) === d)] as const)
      .filter(([, ts]) => ts.length > 0);
  /** `call` per dtype with the tensors' addresses, sizes and roots (-1 where `roots` is absent). */
  const rooted = (
    op: string,
    tensors: Tensor[],
    roots: number[] | undefined,
    call: (ptrs: number[], counts: number[], roots: number[], dtype: Moved) => void,
  ) => {
    if (roots && roots.length !== tensors.length)
      throw new Error(`${op}: ${roots.length} roots for ${tensors.length} tensors`);
    for (const [dtype, ts] of byDtype(tensors, op))
      call(
        ts.map(([t]) => addr(cx, t)),
        ts.map(([t]) => t.size),
        ts.map(([, i]) => roots?.[i] ?? -1),
        dtype,
      );
  };
  return {
    rank,
    size,
    async allReduceSum(tensors) {
      for (const [dtype, ts] of byDtype(tensors, "allReduceSum"))
        comm.allReduceSum(
          ts.map(([t]) => addr(cx, t)),
          ts.map(([t]) => t.size),
          dtype,
        );
    },
    async broadcast(tensors, roots) {
      rooted("broadcast", tensors, roots, (p, n, r, d) => comm.broadcast(p, n, r, d));
    },
    async reduceSum(tensors, roots) {
      rooted("reduceSum", tensors, roots, (p, n, r, d) => comm.reduceSum(p, n, r, d));
    },
    // Started reductions run on the communicator's side stream after what the backend's stream
    // has enqueued so far; settle makes the backend's stream wait for them (the host does not).
    startReduce(tensors, roots) {
      rooted("startReduce", tensors, roots, (p, n, r, d) => comm.startReduce(p, n, r, d));
    },
    async settle() {
      comm.join();
    },
    async allToAll(send, recvRows) {
      if (send.length !== size) throw new Error(`allToAll: ${send.length} tensors for ${size} ranks`);
      if (recvRows && recvRows.length !== size)
        throw new Error(`allToAll: ${recvRows.length} row counts for ${size} ranks`);
      const dtype = moved(send[0], "allToAll");
      const cols = send[0].shape[send[0].shape.length - 1];
      for (const t of send)
        if (moved(t, "allToAll") !== dtype || t.shape.length !== 2 || t.shape[1] !== cols)
          throw new Error(`allToAll: ${t} is not a [rows, ${cols}] ${dtype} matrix like ${send[0]}`);
      // The rows each rank sends this one: as the caller says, or every rank's row counts for every
      // rank exchanged first (the receivers size their buffers from them; a host synchronisation).
      let rowsFrom: readonly number[];
      if (recvRows) rowsFrom = recvRows;
      else {
        const mine = cx.backend.upload(
          Int32Array.from(send, (t) => t.shape[0]),
          [size],
          "i32",
        );
        const all = cx.make([size * size], "i32");
        comm.allGather(cx.p(mine), cx.p(all), size, "i32");
        const counts = (await all.read()) as Int32Array;
        mine.dispose();
        all.dispose();
        rowsFrom = Array.from({ length: size }, (_, q) => counts[q * size + rank]);
      }
      if (rowsFrom[rank] !== send[rank].shape[0])
        throw new Error(
          `allToAll: this rank sends itself ${send[rank].shape[0]} rows, ${rowsFrom[rank]} were expected`,
        );
      const recv = send.map((_, q) => cx.make([rowsFrom[q], cols], dtype));
      comm.exchange(
        send.map((t) => addr(cx, t)),
        send.map((t) => t.size),
        recv.map((t) => addr(cx, t)),
        recv.map((t) => t.size),
        dtype,
      );
      const own = send[rank];
      if (own.size > 0)
        cx.n.cudaDtod(cx.buf(recv[rank]), 0, cx.buf(own), 0, own.size * BYTES_PER_ELEMENT[dtype]);
      return recv;
    },
    async split(color) {
      checkSplitColor(color);
      const sub = comm.split(color);
      made.push(sub);
      return ncclCollectives(cx, sub, made);
    },
  };
}
