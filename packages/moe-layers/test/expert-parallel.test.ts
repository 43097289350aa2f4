// Expert parallelism's exchange on 1, 2 and 4 simulated ranks (localGroup): every rank routes its
// own rows to random experts (some experts get none), dispatch brings each expert its rows from all
// ranks, each rank applies its experts (expert e multiplies by e + 1, so a row that reached the wrong
// expert, or came back to the wrong place, shows), and combine returns every row exactly once, in
// its rank's original order.
import { type Backend, Rng, TsBackend } from "@moe8/tensor";
import { localGroup } from "@moe8/tensor/testing";
import { describe, expect, it } from "vitest";
import { combine, dispatch } from "../src/expert-parallel.ts";

const E = 8;
const D = 4;

/** Rank r's rows: expert ids sorted (as moePermute leaves them), offsets, values. */
function routedRows(seed: number, rows: number) {
  const rng = new Rng(seed);
  // Experts 2 and 5 get no row on any rank.
  const ids = Array.from({ length: rows }, () => [0, 1, 3, 4, 6, 7][rng.int(6)]).sort((a, b) => a - b);
  const offsets = new Int32Array(E + 1);
  for (const e of ids) offsets[e + 1]++;
  for (let e = 0; e < E; e++) offsets[e + 1] += offsets[e];
  return { ids, offsets, values: rng.normals(rows * D) };
}

describe("expert parallel dispatch and combine", () => {
  for (const ranks of [1, 2, 4])
    it(`${ranks} rank(s): every row reaches its expert and comes back once, in order`, async () => {
      const group = localGroup(ranks);
      const results = await Promise.all(
        group.map(async (g) => {
          const b: Backend = new TsBackend();
          const mine = routedRows(40 + g.rank, 13 + 7 * g.rank); // uneven row counts per rank
          const xs = b.upload(mine.values, [mine.ids.length, D]);
          const sent = await dispatch(b, g, xs, mine.offsets);
          // The local experts' rows: expert j of this rank has exactly the rows routed to it by all ranks.
          const El = E / ranks;
          const local = (await sent.xs.read()) as Float32Array;
          const scaled = new Float32Array(local.length);
          for (let j = 0; j < El; j++)
            for (let r = sent.offsets[j]; r < sent.offsets[j + 1]; r++)
              for (let c = 0; c < D; c++) scaled[r * D + c] = local[r * D + c] * (g.rank * El + j + 1);
          const back = await combine(b, g, b.upload(scaled, [sent.xs.rows, D]), sent.exchange);
          return { mine, back: (await back.read()) as Float32Array, got: sent.offsets };
        }),
      );
      // Rows per expert over the group = what each expert received.
      const El = E / ranks;
      for (let q = 0; q < ranks; q++)
        for (let j = 0; j < El; j++) {
          const e = q * El + j;
          const routed = results.reduce((n, r) => n + r.mine.offsets[e + 1] - r.mine.offsets[e], 0);
          expect(results[q].got[j + 1] - results[q].got[j], `expert ${e}`).toBe(routed);
        }
      for (const { mine, back } of results) {
        expect(back.length).toBe(mine.values.length);
        mine.ids.forEach((e, r) => {
          for (let c = 0; c < D; c++)
            expect(back[r * D + c]).toBe(Math.fround(mine.values[r * D + c] * (e + 1)));
        });
      }
    });

  it("refuses experts that do not split over the ranks", async () => {
    const [g] = localGroup(1).map((x) => ({ ...x, size: 3 }));
    const b = new TsBackend();
    await expect(dispatch(b, g, b.zeros([2, D]), new Int32Array([0, 1, 2, 2, 2]))).rejects.toThrow(
      /4 experts do not split over 3 ranks/,
    );
  });
});
