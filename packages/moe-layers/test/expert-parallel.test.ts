// Expert parallelism's exchange on 1, 2 and 4 simulated ranks (localGroup): every rank routes its
// own rows to random experts (some experts get none), dispatch brings each expert its rows from all
// ranks, each rank applies its experts (expert e multiplies by e + 1, so a row that reached the wrong
// expert, or came back to the wrong place, shows), and combine returns every row exactly once, in
// its rank's original order.
import { presetPolicy } from "@moe8/fp8-core";
import { type Backend, type Collectives, Rng, type Tensor, TsBackend } from "@moe8/tensor";
import { localGroup } from "@moe8/tensor/testing";
import { describe, expect, it } from "vitest";
import { combine, dispatch } from "../src/expert-parallel.ts";
import { MoELayer, type MoeConfig } from "../src/moe.ts";

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

// The layer itself on 2 and 4 simulated ranks: each rank routes its own sequences, its experts run
// on the rows every rank routed to them, and the results are one process's over the whole batch:
// outputs and input gradients row for row (each row's arithmetic is the same), each rank's expert
// weight gradients the matching slice of the whole layer's, the router's and shared experts'
// gradients summed over the ranks equal to the whole's to f32 re-association.
describe("expert-parallel MoE layer", () => {
  const cfg: MoeConfig = {
    hidden_size: 8,
    moe_intermediate_size: 6,
    n_routed_experts: 8,
    num_experts_per_tok: 2,
    n_shared_experts: 1,
    routed_scaling_factor: 1.5,
    bias_update_speed: 0.001,
    bias_update_rule: "sign",
    seq_aux_alpha: 0.1,
  };
  const SEQS = 4;
  const SEQ = 6;
  const layer = (g?: Collectives) => {
    const rng = new Rng(9);
    return new MoELayer(new TsBackend(), {
      cfg,
      prefix: "moe",
      precision: presetPolicy("fp32")["moe-layers"],
      init: (n) => rng.normals(n, 0.4),
      expertGroup: g,
    });
  };
  const read = async (t: Tensor) => Array.from((await t.read()) as Float32Array);

  for (const ranks of [2, 4])
    it(`${ranks} ranks: one process's outputs, input and weight gradients`, async () => {
      const rng = new Rng(31);
      const d = cfg.hidden_size;
      const x = rng.normals(SEQS * SEQ * d);
      const dy = rng.normals(SEQS * SEQ * d);
      const whole = layer();
      const wb = whole.b;
      const y = await read(whole.forward(wb.upload(x, [SEQS * SEQ, d]), SEQS, SEQ));
      const dx = await read(whole.backward(wb.upload(dy, [SEQS * SEQ, d])));
      const grads = await Promise.all(whole.params.map((p) => read(p.grad)));

      const rows = (SEQS / ranks) * SEQ;
      const parts = await Promise.all(
        localGroup(ranks).map(async (g) => {
          const m = layer(g);
          const mine = (v: Float32Array) =>
            m.b.upload(v.slice(g.rank * rows * d, (g.rank + 1) * rows * d), [rows, d]);
          // (The balance loss is a mean over a rank's sequences: its gradient scaled by the rank's
          // share of them, as a data-parallel step scales it.)
          const yr = await read(await m.forwardExpertParallel(mine(x), SEQS / ranks, SEQ, 1 / ranks));
          const dxr = await read(await m.backwardExpertParallel(mine(dy)));
          return { m, yr, dxr, grads: await Promise.all(m.params.map((p) => read(p.grad))) };
        }),
      );
      expect(parts.flatMap((p) => p.yr)).toEqual(y);
      expect(parts.flatMap((p) => p.dxr)).toEqual(dx);
      whole.params.forEach((p, i) => {
        const local = parts[0].m.params[i];
        expect(local.name).toBe(p.name);
        if (p.name.startsWith("moe.experts.")) {
          // Expert-major stacked weights: rank q's gradient is the q-th slice of the whole's.
          const n = grads[i].length / ranks;
          parts.forEach((part, q) => {
            const want = grads[i].slice(q * n, (q + 1) * n);
            const got = part.grads[i];
            got.forEach((v, j) => {
              expect(Math.abs(v - want[j]), `${p.name}[${q * n + j}]`).toBeLessThanOrEqual(
                1e-5 * (1 + Math.abs(want[j])),
              );
            });
          });
        } else {
          // Replicated: each rank's gradient covers its own tokens, their sum the whole batch's.
          grads[i].forEach((want, j) => {
            const sum = parts.reduce((a, part) => a + part.grads[i][j], 0);
            expect(Math.abs(sum - want), `${p.name}[${j}]`).toBeLessThanOrEqual(1e-5 * (1 + Math.abs(want)));
          });
        }
      });
      // The loads every rank routed, summed, are the whole batch's (what the bias update reads).
      const loads = await Promise.all(parts.map(({ m }) => m.loadStats()));
      const whole_ = await whole.loadStats();
      expect(whole_.counts).toEqual(
        loads.reduce(
          (a, l) => a.map((c, e) => c + l.counts[e]),
          whole_.counts.map(() => 0),
        ),
      );
    });

  // Under the BF16 and FP8 policies (the tokens go as FP8 1x128 tiles with their scales under FP8,
  // the experts' BF16 outputs come back as BF16; the gradients travel as f32): the experts' rows
  // from rank 0 come first, as their tokens do in one process, so even the Wgrad's 128-token column
  // tiles are the same and the results are the same bits, but for the replicated gradients' sum
  // over the ranks. `wire` records what each forward's allToAll moved (element type and row width):
  // the counts, the rows (FP8: codes as words, then scales), the outputs (BF16 as words).
  for (const policy of ["bf16", "fp8"] as const)
    it(`2 ranks under the ${policy} policy: one process's bits`, async () => {
      const wide: MoeConfig = { ...cfg, hidden_size: 256, moe_intermediate_size: 128 };
      const make = (g?: Collectives) => {
        const rng = new Rng(9);
        return new MoELayer(new TsBackend(), {
          cfg: wide,
          prefix: "moe",
          precision: presetPolicy(policy)["moe-layers"],
          init: (n) => rng.normals(n, 0.1),
          expertGroup: g,
        });
      };
      const f32 = async (t: Tensor) => read(t.dtype === "f32" ? t : t.backend.cast(t, "f32"));
      const d = wide.hidden_size;
      const [seqs, seq] = [4, 64];
      const rng = new Rng(31);
      const x = rng.normals(seqs * seq * d);
      const dy = rng.normals(seqs * seq * d);
      const whole = make();
      const y = await f32(whole.forward(whole.b.upload(x, [seqs * seq, d]), seqs, seq));
      const dx = await f32(whole.backward(whole.b.upload(dy, [seqs * seq, d])));
      const grads = await Promise.all(whole.params.map((p) => f32(p.grad)));
      const rows = (seqs / 2) * seq;
      const parts = await Promise.all(
        localGroup(2).map(async (g) => {
          const wire: string[] = [];
          const m = make({
            ...g,
            allToAll: (send, recvRows) => {
              wire.push(`${send[0].dtype}[${send[0].cols}]`);
              return g.allToAll(send, recvRows);
            },
          });
          const mine = (v: Float32Array) =>
            m.b.upload(v.slice(g.rank * rows * d, (g.rank + 1) * rows * d), [rows, d]);
          const yr = await f32(await m.forwardExpertParallel(mine(x), seqs / 2, seq, 1 / 2));
          const forwardWire = wire.splice(0);
          const dxr = await f32(await m.backwardExpertParallel(mine(dy)));
          return { yr, dxr, grads: await Promise.all(m.params.map((p) => f32(p.grad))), forwardWire };
        }),
      );
      const El = wide.n_routed_experts / 2;
      for (const p of parts)
        expect(p.forwardWire).toEqual(
          policy === "fp8"
            ? [`i32[${El}]`, `i32[${d / 4}]`, `f32[${d / 128}]`, `i32[${d / 2}]`]
            : [`i32[${El}]`, `f32[${d}]`, `i32[${d / 2}]`],
        );
      expect(parts.flatMap((p) => p.yr)).toEqual(y);
      expect(parts.flatMap((p) => p.dxr)).toEqual(dx);
      whole.params.forEach((p, i) => {
        if (p.name.startsWith("moe.experts.")) {
          const n = grads[i].length / 2;
          parts.forEach((part, q) => {
            expect(part.grads[i], `${p.name}, rank ${q}`).toEqual(grads[i].slice(q * n, (q + 1) * n));
          });
          return;
        }
        let diff = 0;
        let norm = 0;
        grads[i].forEach((want, j) => {
          diff += (parts[0].grads[i][j] + parts[1].grads[i][j] - want) ** 2;
          norm += want * want;
        });
        expect(Math.sqrt(diff / norm), p.name).toBeLessThan(1e-6);
      });
    }, 60_000);

  it("refuses the one-process calls on an expert-parallel layer, and experts that do not split", async () => {
    const [g] = localGroup(2);
    const m = layer(g);
    expect(() => m.forward(m.b.zeros([SEQ, cfg.hidden_size]), 1, SEQ)).toThrow(/runs forwardExpertParallel/);
    expect(() => layer({ ...g, size: 3 })).toThrow(/8 experts do not split over 3 ranks/);
  });
});
