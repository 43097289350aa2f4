import { parsePolicy } from "@moe8/fp8-core";
import { createBackend } from "@moe8/kernels";
import { CONFIGS, DeepSeekModel, trainStep } from "@moe8/model";
import { ADAMW_DEFAULTS, AdamW } from "@moe8/optimizer";
import { Rng } from "@moe8/tensor";

const prec = process.argv[2] ?? "fp8";
const b = createBackend("cpu") as any;
const times = new Map<string, number>();
const proto = Object.getPrototypeOf(b);
for (const k of Object.getOwnPropertyNames(proto)) {
  if (k === "constructor" || typeof b[k] !== "function") continue;
  const f = b[k].bind(b);
  b[k] = (...a: any[]) => {
    const t = performance.now();
    const r = f(...a);
    const key =
      k +
      (k === "matmul" || k === "groupedMatmul" || k === "attention"
        ? ":" + (a[2]?.precision ?? a[3]?.precision)
        : "");
    times.set(key, (times.get(key) ?? 0) + performance.now() - t);
    return r;
  };
}
const m = new DeepSeekModel(b, CONFIGS.tiny, parsePolicy({ preset: prec }), 0);
const opt = new AdamW(b, m.params, { ...ADAMW_DEFAULTS, moments: "bf16" });
const rng = new Rng(1);
const ids = b.keep(b.upload(rng.ints(2048, 256), [2048], "i32"));
const tg = b.keep(b.upload(rng.ints(2048, 256), [2048], "i32"));
await trainStep(m, opt, ids, tg, { batch: 16, seq: 128 }, 1e-3);
times.clear();
const t0 = performance.now();
for (let i = 0; i < 3; i++) await trainStep(m, opt, ids, tg, { batch: 16, seq: 128 }, 1e-3);
const tot = (performance.now() - t0) / 3;
console.log("step ms", tot.toFixed(1));
for (const [k, v] of [...times].sort((a, b) => b[1] - a[1]).slice(0, 20))
  console.log(k.padEnd(28), (v / 3).toFixed(1));
