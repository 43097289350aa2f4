import { createBackend } from "@moe8/kernels";

const b = createBackend("cpu") as any;
const n = b.n;
const x = new Float32Array(2048 * 128);
for (let i = 0; i < x.length; i++) x[i] = Math.sin(i) * 3;
const d = new Uint8Array(x.length),
  s = new Float32Array(2048);
const s2 = new Float32Array(2048);
for (const g of ["tile", "column-tile"])
  for (let r = 0; r < 3; r++) {
    let t = performance.now();
    for (let i = 0; i < 100; i++)
      n.quantizeFp8(
        x,
        2048,
        128,
        1,
        g,
        "e4m3",
        false,
        false,
        1e-12,
        d,
        g === "tile" ? s : s2.subarray(0, 16 * 128),
        null,
      );
    const a = (performance.now() - t) / 100;
    t = performance.now();
    for (let i = 0; i < 100; i++)
      n.quantizeFp8(
        x,
        2048,
        128,
        1,
        g,
        "e4m3",
        false,
        false,
        1e-12,
        new Uint8Array(x.length),
        new Float32Array(2048),
        null,
      );
    const c = (performance.now() - t) / 100;
    console.log(g, "reuse", a.toFixed(3), "fresh", c.toFixed(3));
  }
const xt = b.upload(x, [2048, 128]);
const t = performance.now();
for (let i = 0; i < 100; i++) b.quantize(xt, { group: "tile", format: "e4m3" });
console.log("backend.quantize", ((performance.now() - t) / 100).toFixed(3));
