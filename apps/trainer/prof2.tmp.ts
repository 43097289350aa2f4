import { parsePolicy } from "@moe8/fp8-core";
import { createBackend } from "@moe8/kernels";
import { CONFIGS, DeepSeekModel, trainStep } from "@moe8/model";
import { ADAMW_DEFAULTS, AdamW } from "@moe8/optimizer";
import { Rng } from "@moe8/tensor";

const prec = process.argv[2] ?? "fp8";
const filt = process.argv[3] ?? "";
const b = createBackend("cpu") as any;
const times = new Map<string, [number, number]>();
const proto = Object.getPrototypeOf(b);
for (const k of Object.getOwnPropertyNames(proto)) {
  if (k === "constructor" || typeof b[k] !== "function") continue;
  const f = b[k].bind(b);
  b[k] = (...a: any[]) => {
    const t = performance.now();
    const r = f(...a);
    const dt = performance.now() - t;
    let key = k;
    if (filt && k.startsWith(filt))
      key =
        k +
        " " +
        a
          .map((x: any) =>
            x?.shape ? `${x.dtype}[${x.shape}]${x.quant ? x.quant.group : ""}` : JSON.stringify(x),
          )
          .join(" ");
    else if (k === "matmul" || k === "groupedMatmul" || k === "attention")
      key = k + ":" + (a[2]?.precision ?? a[3]?.precision);
    const e = times.get(key) ?? [0, 0];
    e[0] += dt;
    e[1]++;
    times.set(key, e);
    return r;
  };
}
const m = new DeepSeekModel(b, CONFIGS.tiny, parsePolicy({ preset: prec }), 0);
const opt = new AdamW(b, m.params, { ...ADAMW_DEFAULTS, moments: "bf16" });
const rng = new Rng(1);
const ids = b.keep(b.upload(rng.ints(2048, 256), [2048], "i32"));
const tg = b.keep(b.upload(rng.ints(2048, 256), [2048], "i32"));
await trainStep(m, opt, ids, tg, { batch: 16, seq: 128 }, 1e-3);
const N = 5;
let best = 1e9;
const all: Map<string, [number, number]>[] = [];
for (let i = 0; i < N; i++) {
  times.clear();
  const t0 = performance.now();
  await trainStep(m, opt, ids, tg, { batch: 16, seq: 128 }, 1e-3);
  const dt = performance.now() - t0;
  if (dt < best) best = dt;
  all.push(new Map([...times].map(([k, v]) => [k, [v[0], v[1]]])));
}
console.log("best step ms", best.toFixed(1));
const keys = [...all[0].keys()];
const med = (xs: number[]) => xs.sort((a, b) => a - b)[xs.length >> 1];
const rows = keys.map(
  (k) => [k, med(all.map((m) => m.get(k)?.[0] ?? 0)), all[0].get(k)![1]] as [string, number, number],
);
let tot = 0;
for (const r of rows) tot += r[1];
console.log("sum of op medians", tot.toFixed(1));
for (const [k, v, n] of rows.sort((a, b) => b[1] - a[1]).slice(0, Number(process.argv[4] ?? 25)))
  console.log(k.padEnd(60), v.toFixed(1), n);
