// Timings of every non-GEMM op at the `tiny` model's shapes (docs/model.md): 2048 tokens per step
// (batch 16 x seq 128), hidden 128, 4 heads with q.k head dim 48 (32 nope + 16 rope) and v head
// dim 32, 8 routed experts with top-2, vocabulary 256. `bun run bench ops` prints these rows for
// the ts and cpu backends.
import { performance } from "node:perf_hooks";
import type { Backend, PreparedAdamW, Tensor } from "@moe8/tensor";
import { availableBackends, type BackendChoice, createBackend } from "./backends.ts";

export interface BenchOpsOptions {
  /** Timed repetitions per op (the median is reported); default 10. */
  reps?: number;
  /** Untimed runs before timing; default 2. */
  warmup?: number;
  /** Only these ops (names as in the rows); default all. */
  ops?: string[];
  /** Stop repeating an op once this many milliseconds were spent on it (at least 1 timed run); default 2000. */
  budgetMs?: number;
}

export interface BenchOpsRow {
  op: string;
  backend: string;
  /** Median wall time of one call, milliseconds. */
  ms: number;
  /** For the attention ops: the causal useful arithmetic (2 flops a multiply-add, masked half
   * not counted) per second at that median, in GFLOP/s. */
  gflops?: number;
}

/** The tiny model's shapes used by the bench. */
export const TINY = {
  batch: 16,
  seq: 128,
  tokens: 2048,
  d: 128,
  heads: 4,
  dqk: 48,
  dnope: 32,
  drope: 16,
  dv: 32,
  kvRank: 64,
  ffn: 512,
  moeFfn: 128,
  experts: 8,
  k: 2,
  vocab: 256,
  params: 1_860_000,
} as const;

/** Deterministic pseudo-normal data (a cheap LCG: the values only need to be realistic in scale). */
function data(n: number, seed: number, std = 1): Float32Array {
  const a = new Float32Array(n);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    let u = 0;
    for (let j = 0; j < 4; j++) {
      s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
      u += s / 4294967296;
    }
    a[i] = (u - 2) * 1.732 * std;
  }
  return a;
}

function ints(n: number, max: number, seed: number): Int32Array {
  const a = new Int32Array(n);
  let s = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    a[i] = Math.floor((s / 4294967296) * max);
  }
  return a;
}

/** A timed op: its name, one call, and (attention) the useful flops of one call. */
type Case = [name: string, run: () => void, flops?: number];

/** Multiply-adds of causal attention over `pairs` (query, key) pairs, as flops: the forward
 * computes q.k and p.v per pair, the backward q.k, dO.v, p.dO (dv), dS.q (dk) and dS.k (dq). */
function attentionFlops(pairs: number, dqk: number, dv: number) {
  return { forward: 2 * pairs * (dqk + dv), backward: 2 * pairs * (3 * dqk + 2 * dv) };
}

/** Builds the inputs (long-lived, released by the returned `dispose`) and the timed closures. */
function cases(b: Backend): { list: Case[]; dispose: () => void } {
  const T = TINY;
  const N = T.tokens;
  const kept: Tensor[] = [];
  const hold = (...ts: Tensor[]) => {
    for (const t of ts) kept.push(b.keep(t));
  };
  const up = (a: Float32Array | Int32Array, shape: number[], dtype: "f32" | "i32" = "f32") => {
    const t = b.upload(a, shape, dtype);
    hold(t);
    return t;
  };
  const x = up(data(N * T.d, 1), [N, T.d]);
  const y = up(data(N * T.d, 2), [N, T.d]);
  const w = up(data(T.d, 3, 0.1), [T.d]);
  const q = up(data(N * T.heads * T.dqk, 4), [N, T.heads * T.dqk]);
  const k = up(data(N * T.heads * T.dqk, 5), [N, T.heads * T.dqk]);
  const v = up(data(N * T.heads * T.dv, 6), [N, T.heads * T.dv]);
  const dO = up(data(N * T.heads * T.dv, 7), [N, T.heads * T.dv]);
  const kpe = up(data(N * T.drope, 8), [N, T.drope]);
  const qnope = up(data(N * T.heads * T.dnope, 9), [N, T.heads * T.dnope]);
  // The gate and up projections' outputs side by side, as their fused GEMM writes them.
  const gu = up(data(N * 2 * T.ffn, 10), [N, 2 * T.ffn]);
  const dh = up(data(N * T.ffn, 11), [N, T.ffn]);
  const emb = up(data(T.vocab * T.d, 12), [T.vocab, T.d]);
  const ids = up(ints(N, T.vocab, 13), [N], "i32");
  const logits = up(data(N * T.experts, 14), [N, T.experts]);
  const bias = up(data(T.experts, 15, 0.01), [T.experts]);
  const vocabLogits = up(data(N * T.vocab, 16, 2), [N, T.vocab]);
  const targets = up(ints(N, T.vocab, 17), [N], "i32");
  const attn = { batch: T.batch, seq: T.seq, heads: T.heads, scale: 1 / Math.sqrt(T.dqk) };
  const rope = { heads: T.heads, width: T.dqk, offset: T.dnope, dim: T.drope, seqLen: T.seq, theta: 10000 };
  const slice = { heads: T.heads, width: T.dqk, start: T.dnope, len: T.drope };
  const flops = attentionFlops((T.batch * T.heads * T.seq * (T.seq + 1)) / 2, T.dqk, T.dv);
  const decodeFlops = attentionFlops(T.batch * T.heads * T.seq, T.dqk, T.dv).forward;

  // Forward results the backward ops consume.
  const fwd = b.rmsnorm(x, w, 1e-6);
  const att = b.attention(q, k, v, { ...attn, precision: "f32" });
  const att16 = b.attention(q, k, v, { ...attn, precision: "bf16" });
  const r = b.router(logits, bias, T.k, 1);
  const bl = b.balanceLoss(r.scores, r.topIdx, { batch: T.batch, seq: T.seq, alpha: 1e-4 });
  const perm = b.moePermute(x, r.topIdx, T.experts);
  const dweights = up(data(N * T.k, 18), [N, T.k]);
  const sliced = b.headSlice(q, slice);
  hold(
    fwd.y,
    fwd.rstd,
    att.o,
    att.lse,
    att16.o,
    att16.lse,
    r.scores,
    r.topIdx,
    r.weights,
    bl.loss,
    bl.dscores,
  );
  // A KV-cache decode step: one query per sequence against its seq keys.
  const qStep = b.rows(q, 0, T.batch);
  hold(perm.xs, perm.slot, perm.offsets, sliced, qStep);

  // Optimiser state for a parameter set of the tiny model's size, in 16 tensors.
  const groups = 16;
  const per = Math.ceil(T.params / groups);
  const params = Array.from({ length: groups }, (_, i) => up(data(per, 100 + i, 0.02), [per]));
  const grads = Array.from({ length: groups }, (_, i) => up(data(per, 200 + i, 1e-3), [per]));
  const moments = (dt: "f32" | "bf16") =>
    params.map(() => {
      const t = b.zeros([per], dt);
      hold(t);
      return t;
    });
  const [m32, v32, m16, v16] = [moments("f32"), moments("f32"), moments("bf16"), moments("bf16")];
  const gradScale = up(Float32Array.of(1), [1]);
  const dE = b.zeros([T.vocab, T.d]);
  const acc = b.zeros([N, T.d]);
  const bs = b.zeros([T.experts]);
  hold(dE, acc, bs);
  // As the optimiser runs them: prepared once, one call (on cuda one launch, two for the norm) a step.
  const clip = b.prepareClipScale(grads);
  const prepare = (m: Tensor[], vv: Tensor[]) =>
    b.prepareAdamW(params.map((p, i) => ({ p, g: grads[i], m: m[i], v: vv[i], decay: true })));
  const [adam32, adam16] = [prepare(m32, v32), prepare(m16, v16)];
  let step = 0;
  const adam = (a: PreparedAdamW) => {
    step++;
    a.update({ lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1, step, gradScale });
  };

  const list: Case[] = [
    ["add", () => b.add(x, y)],
    ["addInto", () => b.addInto(acc, y, 0.5)],
    ["scale", () => b.scale(x, 0.5)],
    ["sum", () => b.sum(x)],
    ["cast f32->bf16", () => b.cast(x, "bf16")],
    ["rmsnorm", () => b.rmsnorm(x, w, 1e-6)],
    ["rmsnormBackward", () => b.rmsnormBackward(y, x, w, fwd.rstd)],
    ["rope", () => b.rope(q, rope)],
    ["headSlice", () => b.headSlice(q, slice)],
    ["headScatterAdd", () => b.headScatterAdd(b.zeros(q.shape), sliced, slice)],
    ["headConcat", () => b.headConcat(qnope, kpe, T.heads, 1)],
    ["attention f32", () => b.attention(q, k, v, { ...attn, precision: "f32" }), flops.forward],
    [
      "attentionBackward f32",
      () => b.attentionBackward(dO, q, k, v, att.o, att.lse, { ...attn, precision: "f32" }),
      flops.backward,
    ],
    ["attention bf16", () => b.attention(q, k, v, { ...attn, precision: "bf16" }), flops.forward],
    [
      "attention decode f32 (1 query, seq keys)",
      () => b.attention(qStep, k, v, { ...attn, seq: 1, kvSeq: T.seq, precision: "f32" }),
      decodeFlops,
    ],
    [
      "attentionBackward bf16",
      () => b.attentionBackward(dO, q, k, v, att16.o, att16.lse, { ...attn, precision: "bf16" }),
      flops.backward,
    ],
    [
      "attention forward+backward bf16",
      () => {
        const a = b.attention(q, k, v, { ...attn, precision: "bf16" });
        b.attentionBackward(dO, q, k, v, a.o, a.lse, { ...attn, precision: "bf16" });
      },
      flops.forward + flops.backward,
    ],
    ["swiglu", () => b.swiglu(gu)],
    ["swigluBackward", () => b.swigluBackward(dh, gu)],
    ["embedding", () => b.embedding(emb, ids)],
    ["embeddingBackward", () => b.embeddingBackward(dE, x, ids)],
    ["router", () => b.router(logits, bias, T.k, 1)],
    ["routerBackward", () => b.routerBackward(dweights, r.scores, r.topIdx, 1, bl.dscores)],
    ["balanceLoss", () => b.balanceLoss(r.scores, r.topIdx, { batch: T.batch, seq: T.seq, alpha: 1e-4 })],
    ["moePermute", () => b.moePermute(x, r.topIdx, T.experts)],
    ["moePermuteBackward", () => b.moePermuteBackward(perm.xs, perm.slot, N)],
    ["moeCombine", () => b.moeCombine(perm.xs, perm.slot, r.weights)],
    ["moeCombineBackward", () => b.moeCombineBackward(x, perm.xs, perm.slot, r.weights)],
    ["biasUpdate", () => b.biasUpdate(bs, perm.offsets, { gamma: 1e-3, rule: "error" })],
    ["crossEntropy", () => b.crossEntropy(vocabLogits, targets, 1)],
    ["quantize tile", () => b.quantize(x, { group: "tile" })],
    ["dequantize tile", () => b.dequantize(b.quantize(x, { group: "tile" }))],
    ["clipScale (1.86M params)", () => clip.clipScale(1)],
    ["adamw f32 moments (1.86M params)", () => adam(adam32)],
    ["adamw bf16 moments (1.86M params)", () => adam(adam16)],
  ];
  return {
    list,
    dispose: () => {
      for (const prepared of [clip, adam32, adam16]) prepared.dispose();
      for (const t of kept) b.release(t);
    },
  };
}

/** CLI-style selection: `backend` names one backend (default: every available one). */
export interface BenchOpsFlags extends BenchOpsOptions {
  backend?: string;
}

function isBackend(x: unknown): x is Backend {
  return typeof x === "object" && x !== null && typeof (x as Backend).matmul === "function";
}

/**
 * Times each non-GEMM op (median of `reps` after `warmup`), one row per op and backend: on
 * `backend` when given one, or on the backends named by `flags.backend` (default: ts and cpu, as
 * available) when given CLI flags.
 */
export function benchOps(backend: Backend, opts?: BenchOpsOptions): BenchOpsRow[];
export function benchOps(flags?: BenchOpsFlags): BenchOpsRow[];
export function benchOps(target?: Backend | BenchOpsFlags, opts: BenchOpsOptions = {}): BenchOpsRow[] {
  if (isBackend(target)) return benchOne(target, opts);
  const flags = target ?? {};
  const names = flags.backend ? [flags.backend] : availableBackends();
  return names.flatMap((n) => benchOne(createBackend(n as BackendChoice), flags));
}

function benchOne(backend: Backend, opts: BenchOpsOptions): BenchOpsRow[] {
  const reps = opts.reps ?? 10;
  const warmup = opts.warmup ?? 2;
  const budget = opts.budgetMs ?? 2000;
  const { list, dispose } = backend.scope(() => cases(backend));
  const rows: BenchOpsRow[] = [];
  try {
    for (const [op, run, flops] of list) {
      if (opts.ops && !opts.ops.includes(op)) continue;
      for (let i = 0; i < warmup; i++) backend.scope(run);
      const times: number[] = [];
      const start = performance.now();
      while (times.length < reps && (times.length === 0 || performance.now() - start < budget)) {
        const t0 = performance.now();
        backend.scope(run);
        times.push(performance.now() - t0);
      }
      times.sort((a, b) => a - b);
      const ms = times[Math.floor(times.length / 2)];
      const row: BenchOpsRow = { op, backend: backend.name, ms };
      if (flops) row.gflops = Math.round(flops / ms / 1e5) / 10;
      rows.push(row);
    }
  } finally {
    dispose();
  }
  return rows;
}
