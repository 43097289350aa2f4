// Expert parallelism's token exchange (issue 22; docs/runtime.md, "Several ranks"): the routed
// experts of a layer are split over the ranks of a group, rank q holding experts
// [q E/R, (q+1) E/R). After routing, a rank's rows are sorted by expert (moePermute), so the rows
// for rank q are one contiguous block: `dispatch` sends each block to its rank, which regroups what
// it receives by local expert (for one grouped GEMM over its experts), and `combine` sends the
// experts' outputs back to where each row came from, in the original order.
//
// Numerics: a row's values arrive unchanged. With NCCL the block goes as FP8 1x128 tiles with their
// scales, as DeepSeek-V3 does: that moves a quarter of the bytes and changes nothing, since the
// experts' Fprop quantises each row in the same 1x128 tiles anyway (a row's tiles do not depend on
// which rows travel with it). The outputs come back in BF16 under the bf16 and fp8 policies.
import type { Backend, Collectives, Tensor } from "@moe8/tensor";

/** How one dispatch moved the rows: what combine needs to send them back. */
export interface ExpertExchange {
  /** Rows this rank sent to each rank (its expert-sorted rows in rank order). */
  sent: number[];
  /** received[q][j]: rows from rank q for this rank's local expert j. */
  received: number[][];
}

export interface Dispatched {
  /** This rank's rows for its own experts, grouped by local expert (rows from rank 0 first). */
  xs: Tensor;
  /** Local expert offsets into xs ([E/R + 1], on the host). */
  offsets: Int32Array;
  exchange: ExpertExchange;
}

/** Rows [start, start + n) of a 2-D tensor, or an empty [0, cols] one. */
function rowsOf(b: Backend, t: Tensor, start: number, n: number): Tensor {
  return n > 0 ? b.rows(t, start, n) : b.zeros([0, t.cols], t.dtype);
}

/** Pieces stacked along rows, in order, into one new tensor. */
function stack(b: Backend, pieces: Tensor[], cols: number): Tensor {
  const out = b.zeros([pieces.reduce((n, p) => n + p.rows, 0), cols]);
  let at = 0;
  for (const p of pieces) {
    if (p.rows > 0) b.setRows(out, at, p);
    at += p.rows;
  }
  return out;
}

/**
 * Sends this rank's expert-sorted rows `xs` ([rows, d]; expert e owns rows offsets[e] ..
 * offsets[e + 1] - 1, offsets on the host, [E + 1]) to the ranks holding their experts.
 */
export async function dispatch(
  b: Backend,
  group: Collectives,
  xs: Tensor,
  offsets: Int32Array,
): Promise<Dispatched> {
  const R = group.size;
  const E = offsets.length - 1;
  if (E % R !== 0) throw new Error(`expert parallel: ${E} experts do not split over ${R} ranks`);
  const El = E / R;
  const d = xs.cols;
  // Per destination rank: its experts' row counts (exchanged first: a receiver must know how many
  // rows of each of its experts come from each rank), then the block of rows itself.
  const counts: Tensor[] = [];
  const blocks: Tensor[] = [];
  const sent: number[] = [];
  for (let q = 0; q < R; q++) {
    const c = new Int32Array(El);
    for (let j = 0; j < El; j++) c[j] = offsets[q * El + j + 1] - offsets[q * El + j];
    counts.push(b.upload(c, [1, El], "i32"));
    const start = offsets[q * El];
    sent.push(offsets[(q + 1) * El] - start);
    blocks.push(rowsOf(b, xs, start, sent[q]));
  }
  const got = await group.allToAll(counts);
  const received = await Promise.all(got.map(async (t) => Array.from((await t.read()) as Int32Array)));
  const inbound = await group.allToAll(blocks);
  // Regroup by local expert: for expert j, its rows from rank 0, then from rank 1, ...
  const pieces: Tensor[] = [];
  const local = new Int32Array(El + 1);
  const next = new Array<number>(R).fill(0); // per source rank: its first row not yet taken
  for (let j = 0; j < El; j++) {
    for (let q = 0; q < R; q++) {
      pieces.push(rowsOf(b, inbound[q], next[q], received[q][j]));
      next[q] += received[q][j];
    }
    local[j + 1] = local[j] + received.reduce((n, r) => n + r[j], 0);
  }
  return { xs: stack(b, pieces, d), offsets: local, exchange: { sent, received } };
}

/**
 * Sends the experts' outputs ys (rows as `dispatch` gave them) back to the ranks the rows came
 * from; returns this rank's rows in its original expert-sorted order.
 */
export async function combine(
  b: Backend,
  group: Collectives,
  ys: Tensor,
  exchange: ExpertExchange,
): Promise<Tensor> {
  const R = group.size;
  const { sent, received } = exchange;
  const El = received[0].length;
  const d = ys.cols;
  // ys is local-expert-major, source rank minor: gather each source rank's rows back into one
  // block in its own (expert-sorted) order.
  const bySource: Tensor[][] = Array.from({ length: R }, () => []);
  let at = 0;
  for (let j = 0; j < El; j++)
    for (let q = 0; q < R; q++) {
      bySource[q].push(rowsOf(b, ys, at, received[q][j]));
      at += received[q][j];
    }
  const back = await group.allToAll(bySource.map((p) => stack(b, p, d)));
  back.forEach((t, q) => {
    if (t.rows !== sent[q])
      throw new Error(`combine: rank ${q} returned ${t.rows} rows, ${sent[q]} were sent`);
  });
  return stack(b, back, d);
}
