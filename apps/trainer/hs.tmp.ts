import { createBackend } from "@moe8/kernels";

const b = createBackend("cpu") as any;
const n = b.n;
const src = new Float32Array(2048 * 256).fill(1);
for (let i = 0; i < 6; i++) {
  const d1 = new Float32Array(2048 * 256);
  let t = performance.now();
  n.addIntoF32(d1, src, 1);
  const a = performance.now() - t;
  const d2 = new Float32Array(2048 * 256);
  t = performance.now();
  n.scaleF32(src, 2, d2);
  const c = performance.now() - t;
  const d3 = new Float32Array(2048 * 256);
  t = performance.now();
  d3.fill(0);
  n.addIntoF32(d3, src, 1);
  const e = performance.now() - t;
  const d4 = new Float32Array(2048 * 256);
  t = performance.now();
  n.headScatterAdd(d4, src.subarray(0, 2048 * 128), 2048, 4, 64, 0, 32);
  const f = performance.now() - t;
  console.log(
    "addInto fresh",
    a.toFixed(2),
    "scale fresh",
    c.toFixed(2),
    "fill+addInto",
    e.toFixed(2),
    "hs",
    f.toFixed(2),
  );
}
