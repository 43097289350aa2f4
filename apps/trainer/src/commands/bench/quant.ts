// `moe8 bench quant --backend cuda`: the FP8 quantisations one training step of `small` runs, at its
// shapes, as milliseconds and as effective memory bandwidth (bytes the kernel must read and write
// over its median time), with the ratio against a plain device copy of 400 MB measured in the same
// run (the bandwidth a memory-bound kernel can reach). The quantisers are a fifth of the small fp8
// step's GPU time (packages/kernels/notes/step.md); this is the bench their kernels are tuned with.
import { UsageError } from "@moe8/fp8-core";
import { createBackend } from "@moe8/kernels";
import { type Backend, Rng, type Tensor } from "@moe8/tensor";
import { deviceMs, formatRow } from "./timing.ts";

/** Routed experts of `small` after routing: 16,384 tokens x 6 choices over 64 experts. */
const E = 64;
const EXPERT_ROWS = 16384 * 6;
const TOKENS = 16384;

interface QuantCase {
  name: string;
  /** What the step quantises this way. */
  what: string;
  rows: number;
  cols: number;
  /** Bytes one call must move: the input read once, codes and scales written once. */
  bytes: number;
  run: (b: Backend, x: Tensor, offsets: Tensor, xq: Tensor) => Tensor;
}

/** Bytes of an input read plus its FP8 codes and one f32 scale per 128 values written. */
const moved = (rows: number, cols: number, inBytes: number) => rows * cols * (inBytes + 1 + 4 / 128);

function cases(): QuantCase[] {
  const tile = (name: string, what: string, rows: number, cols: number): QuantCase => ({
    name,
    what,
    rows,
    cols,
    bytes: moved(rows, cols, 4),
    run: (b, x) => b.quantize(x, { group: "tile" }),
  });
  const coltile = (name: string, what: string, rows: number, cols: number, seg: boolean): QuantCase => ({
    name,
    what,
    rows,
    cols,
    bytes: moved(rows, cols, 4),
    run: (b, x, offsets) => b.quantize(x, { group: "column-tile", segments: seg ? offsets : undefined }),
  });
  const requant = (name: string, what: string, rows: number, cols: number): QuantCase => ({
    name,
    what,
    rows,
    cols,
    bytes: moved(rows, cols, 1 + 4 / 128),
    run: (b, _x, offsets, xq) => b.requantize(xq, { group: "column-tile", segments: offsets }),
  });
  return [
    tile("tile_dense", "a dense Linear's input or gradient", TOKENS, 1024),
    tile("tile_experts_down_dy", "the experts' down Dgrad input", EXPERT_ROWS, 1024),
    tile("tile_experts_gate_up_dy", "the experts' gate_up Dgrad input", EXPERT_ROWS, 512),
    tile("tile_experts_h", "the experts' down Fprop input", EXPERT_ROWS, 256),
    coltile("coltile_dense", "a dense Wgrad's gradient", TOKENS, 1024, false),
    coltile("coltile_experts_down_dy", "the experts' down Wgrad gradient", EXPERT_ROWS, 1024, true),
    coltile("coltile_experts_gate_up_dy", "the experts' gate_up Wgrad gradient", EXPERT_ROWS, 512, true),
    requant("requant_experts_xs", "the experts' gate_up Wgrad input", EXPERT_ROWS, 1024),
    requant("requant_experts_h", "the experts' down Wgrad input", EXPERT_ROWS, 256),
    {
      name: "block_experts_gate_up_w",
      what: "the experts' gate_up weights, once a step",
      rows: E * 512,
      cols: 1024,
      bytes: moved(E * 512, 1024, 4),
      run: (b, x) => b.quantize(b.reshape(x, [E, 512, 1024]), { group: "block" }),
    },
  ];
}

/** Expert offsets of uneven loads as after routing (sizes drawn around rows / E). */
function expertOffsets(rng: Rng): Int32Array {
  const sizes = Array.from({ length: E }, () => 0.5 + rng.next());
  const total = sizes.reduce((s, v) => s + v, 0);
  const off = new Int32Array(E + 1);
  for (let e = 0; e < E; e++)
    off[e + 1] = e === E - 1 ? EXPERT_ROWS : off[e] + Math.floor((sizes[e] / total) * EXPERT_ROWS);
  return off;
}

export async function benchQuant(flags: Record<string, unknown>): Promise<number> {
  const name = (flags.backend as string | undefined) ?? "cuda";
  if (name !== "cuda")
    throw new UsageError(`bench quant: --backend ${name}: only cuda is timed (the step's shapes)`);
  const b = createBackend("cuda");
  const rng = new Rng(5);
  const rows: Record<string, unknown>[] = [];
  const emit = (row: Record<string, unknown>) => {
    rows.push(row);
    if (!flags.json) console.log(formatRow(row));
  };
  const offsets = b.upload(expertOffsets(rng), [E + 1], "i32");
  // One pool of pseudo-normal values with a few outlier channels, reused by every case.
  const pool = rng.normals(1 << 20);
  for (let i = 0; i < pool.length; i += 1024) pool[i] *= 40;
  const fill = (n: number) => {
    const a = new Float32Array(n);
    for (let i = 0; i < n; i += pool.length) a.set(pool.subarray(0, Math.min(pool.length, n - i)), i);
    return a;
  };
  // The baseline: a device copy reads and writes each byte once.
  const big = b.upload(fill(EXPERT_ROWS * 1024), [EXPERT_ROWS, 1024]);
  const copyMs = await deviceMs(b, () => b.copy(big), 10, big);
  const copyGBs = (2 * big.size * 4) / (copyMs * 1e6);
  emit({ case: "copy_f32", rows: EXPERT_ROWS, cols: 1024, ms: +copyMs.toFixed(4), gbs: Math.round(copyGBs) });
  for (const c of cases()) {
    await b.scope(async () => {
      const x = b.reshape(b.rows(big, 0, c.rows * (c.cols / 1024)), [c.rows, c.cols]);
      const xq = b.quantize(x, { group: "tile" });
      const ms = await deviceMs(b, () => c.run(b, x, offsets, xq), 10, big);
      const gbs = c.bytes / (ms * 1e6);
      emit({
        case: c.name,
        rows: c.rows,
        cols: c.cols,
        ms: +ms.toFixed(4),
        gbs: Math.round(gbs),
        of_copy: +(gbs / copyGBs).toFixed(2),
        what: c.what,
      });
    });
  }
  b.release(big);
  b.release(offsets);
  if (flags.json) console.log(JSON.stringify(rows));
  return 0;
}
