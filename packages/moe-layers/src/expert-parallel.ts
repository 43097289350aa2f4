// Expert parallelism's token exchange (issue 22; docs/runtime.md, "Several ranks"): the routed
// experts of a layer are split over the ranks of a group, rank q holding experts
// [q E/R, (q+1) E/R). After routing, a rank's rows are sorted by expert (moePermute), so the rows
// for rank q are one contiguous block: `dispatch` sends each block to its rank, which regroups what
// it receives by local expert (for one grouped GEMM over its experts), and `combine` sends the
// experts' outputs back to where each row came from, in the original order.
//
// What travels: the collectives move f32 and i32 values, so a BF16 or FP8 matrix goes as its bytes
// in i32 words with its scales beside them (Backend.toWords) and is made again on arrival, bit for
// bit. Under the FP8 policy the MoE layer dispatches its tokens as FP8 1x128 tiles with their
// scales, as DeepSeek-V3 does (a quarter of f32's bytes and a few percent for the scales): the same
// bits the experts' Fprop would quantise, since a row's tiles do not depend on the rows travelling
// with it. The experts' outputs come back in BF16 under the bf16 and fp8 policies.
import type { Backend, Collectives, Tensor, WordsKind } from "@moe8/tensor";

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
function stack(b: Backend, pieces: Tensor[], cols: number, dtype: Tensor["dtype"]): Tensor {
  const out = b.zeros([pieces.reduce((n, p) => n + p.rows, 0), cols], dtype);
  let at = 0;
  for (const p of pieces) {
    if (p.rows > 0) b.setRows(out, at, p);
    at += p.rows;
  }
  return out;
}

/**
 * A matrix as the row-aligned f32/i32 parts the collectives move (itself when f32; its words, and
 * its scales when FP8, otherwise), and how to make it again from the parts as they arrive.
 */
function onWire(b: Backend, t: Tensor): { parts: Tensor[]; rebuild: (parts: Tensor[]) => Tensor } {
  if (t.dtype === "f32" || t.dtype === "i32") return { parts: [t], rebuild: ([p]) => p };
  const kind: WordsKind =
    t.dtype === "bf16" ? { dtype: "bf16" } : { dtype: t.dtype, group: t.quant?.group as "tile" | "row" };
  const { words, scales } = b.toWords(t);
  return {
    parts: scales ? [words, scales] : [words],
    rebuild: ([w, s]) => {
      const out = b.fromWords(w, s ?? null, kind);
      w.dispose();
      s?.dispose();
      return out;
    },
  };
}

/**
 * Frees the exchange's temporaries at once (the collectives of one process hand back what they were
 * given, so a tensor may be in two lists), but never the caller's `keep`.
 */
function release(lists: Tensor[][], keep: Tensor[]): void {
  const all = new Set(lists.flat());
  for (const t of keep) all.delete(t);
  for (const t of all) t.dispose();
}

/**
 * Each part's pieces (pieces[q][i]: part i's rows for rank q) sent by one allToAll per part;
 * recvRows[q]: the rows rank q sends this rank in every part (known from the counts exchanged
 * first, so that NCCL need not exchange them again).
 */
async function exchangeParts(
  group: Collectives,
  pieces: Tensor[][],
  recvRows: number[],
): Promise<Tensor[][]> {
  const got: Tensor[][] = pieces.map(() => []);
  for (let i = 0; i < pieces[0].length; i++) {
    const inbound = await group.allToAll(
      pieces.map((p) => p[i]),
      recvRows,
    );
    inbound.forEach((t, q) => {
      got[q].push(t);
    });
  }
  return got;
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
  // Per destination rank: its experts' row counts (exchanged first: a receiver must know how many
  // rows of each of its experts come from each rank), then the block of rows itself.
  const wire = onWire(b, xs);
  const counts: Tensor[] = [];
  const blocks: Tensor[][] = [];
  const sent: number[] = [];
  for (let q = 0; q < R; q++) {
    const c = new Int32Array(El);
    for (let j = 0; j < El; j++) c[j] = offsets[q * El + j + 1] - offsets[q * El + j];
    counts.push(b.upload(c, [1, El], "i32"));
    const start = offsets[q * El];
    sent.push(offsets[(q + 1) * El] - start);
    blocks.push(wire.parts.map((p) => rowsOf(b, p, start, sent[q])));
  }
  const got = await group.allToAll(counts, new Array<number>(R).fill(1));
  const received = await Promise.all(got.map(async (t) => Array.from((await t.read()) as Int32Array)));
  const inbound = await exchangeParts(
    group,
    blocks,
    received.map((r) => r.reduce((n, c) => n + c, 0)),
  );
  // Regroup by local expert: for expert j, its rows from rank 0, then from rank 1, ...
  const pieces: Tensor[][] = wire.parts.map(() => []);
  const local = new Int32Array(El + 1);
  const next = new Array<number>(R).fill(0); // per source rank: its first row not yet taken
  for (let j = 0; j < El; j++) {
    for (let q = 0; q < R; q++) {
      inbound[q].forEach((t, i) => {
        pieces[i].push(rowsOf(b, t, next[q], received[q][j]));
      });
      next[q] += received[q][j];
    }
    local[j + 1] = local[j] + received.reduce((n, r) => n + r[j], 0);
  }
  const parts = pieces.map((ps, i) => stack(b, ps, wire.parts[i].cols, wire.parts[i].dtype));
  release([counts, got, blocks.flat(), inbound.flat(), pieces.flat(), wire.parts], [xs]);
  return { xs: wire.rebuild(parts), offsets: local, exchange: { sent, received } };
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
  const wire = onWire(b, ys);
  // ys is local-expert-major, source rank minor: gather each source rank's rows back into one
  // block in its own (expert-sorted) order.
  const bySource: Tensor[][][] = Array.from({ length: R }, () => wire.parts.map(() => []));
  let at = 0;
  for (let j = 0; j < El; j++)
    for (let q = 0; q < R; q++) {
      wire.parts.forEach((p, i) => {
        bySource[q][i].push(rowsOf(b, p, at, received[q][j]));
      });
      at += received[q][j];
    }
  const blocks = bySource.map((ps) =>
    ps.map((pieces, i) => stack(b, pieces, wire.parts[i].cols, wire.parts[i].dtype)),
  );
  const back = await exchangeParts(group, blocks, sent);
  back.forEach((ts, q) => {
    if (ts[0].rows !== sent[q])
      throw new Error(`combine: rank ${q} returned ${ts[0].rows} rows, ${sent[q]} were sent`);
  });
  const parts = wire.parts.map((p, i) =>
    stack(
      b,
      back.map((ts) => ts[i]),
      p.cols,
      p.dtype,
    ),
  );
  release([bySource.flat(2), blocks.flat(), back.flat(), wire.parts], [ys]);
  return wire.rebuild(parts);
}
