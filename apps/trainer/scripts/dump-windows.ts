// Writes the first `count` eval windows (seq_len + 1 tokens each, read in order as `moe8 eval` does)
// as little-endian int32 to a file, so other tools (scripts/hf_check.py) can score the same tokens.
//   bun apps/trainer/scripts/dump-windows.ts DATA SEQ_LEN COUNT OUT.bin
import { writeFileSync } from "node:fs";
import { sequentialWindows } from "@moe8/data";

const [data, seqLen, count, out] = process.argv.slice(2);
const windows: Int32Array[] = [];
for await (const w of sequentialWindows(data, Number(seqLen))) {
  windows.push(w.slice());
  if (windows.length === Number(count)) break;
}
const flat = new Int32Array(windows.length * (Number(seqLen) + 1));
for (const [i, w] of windows.entries()) flat.set(w, i * w.length);
writeFileSync(out, new Uint8Array(flat.buffer));
console.log(`wrote ${windows.length} windows of ${Number(seqLen) + 1} tokens to ${out}`);
