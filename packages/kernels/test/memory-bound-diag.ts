// Achieved memory bandwidth of the memory-bound kernels at the small model's largest shapes, on the
// GPU (not part of the suite): GB/s per kernel from the kernel timer, against a device-to-device
// copy of the same bytes measured in the same run.
//   bun packages/kernels/test/memory-bound-diag.ts
import { Rng } from "@moe8/tensor";
import { CudaBackend } from "../src/cuda-backend.ts";

const cu = new CudaBackend();
const rng = new Rng(3);
const upload = (shape: number[]) => cu.upload(rng.normals(shape.reduce((a, b) => a * b)), shape);
const rows: string[] = [];
async function time(name: string, bytes: number, run: () => void) {
  run(); // compile and warm the allocator
  const r = await cu.timeKernels(async () => {
    for (let i = 0; i < 5; i++) run();
  });
  const ms = r.busyMs / 5;
  const detail = r.kernels.map((k) => `${k.name} ${(k.ms / 5).toFixed(3)}`).join(", ");
  rows.push(
    `${name.padEnd(44)} ${ms.toFixed(3).padStart(8)} ms ${(bytes / ms / 1e6).toFixed(0).padStart(6)} GB/s  (${detail})`,
  );
}
const xs = upload([98304, 1024]);
const w = upload([64, 512, 1024]);
const n = xs.size;
await time("copy f32 [98304, 1024]", 8 * n, () => cu.copy(xs).dispose());
await time("cast f32 -> bf16", 6 * n, () => cu.cast(xs, "bf16").dispose());
await time("quantize tile [98304, 1024]", 5 * n, () => cu.quantize(xs, { group: "tile" }).dispose());
await time("quantize column-tile [98304, 1024]", 5 * n, () =>
  cu.quantize(xs, { group: "column-tile" }).dispose(),
);
const q = cu.quantize(xs, { group: "tile" });
await time("requantize tile -> column-tile", 2 * n, () =>
  cu.requantize(q, { group: "column-tile" }).dispose(),
);
await time("dequantize tile", 5 * n, () => cu.dequantize(q).dispose());
await time("quantize block [64, 512, 1024]", 5 * w.size, () => cu.quantize(w, { group: "block" }).dispose());
const y = upload([98304, 1024]);
await time("addInto f32", 12 * n, () => cu.addInto(y, xs));
for (const r of rows) console.log(r);
