import { createBackend } from "@moe8/kernels";

const b = createBackend("cpu") as any;
const n = b.n;
const x = new Float32Array(2048 * 128);
for (let i = 0; i < x.length; i++) x[i] = Math.sin(i) * 3;
const d = new Uint8Array(x.length),
  s = new Float32Array(2048);
const t = performance.now();
for (let i = 0; i < 5000; i++)
  n.quantizeFp8(x, 2048, 128, 1, "tile", "e4m3", false, false, 1e-12, d, s, null);
console.log(((performance.now() - t) / 5000).toFixed(3));
