// `moe8 bench ops`: every non-GEMM op at the `tiny` model's shapes (packages/kernels/src/bench-ops.ts),
// one row per op and backend.
import { benchOps as timeOps } from "@moe8/kernels";
import { formatRow } from "./timing.ts";

export async function benchOps(flags: Record<string, unknown>): Promise<number> {
  const rows = await timeOps(flags);
  if (flags.json) console.log(JSON.stringify(rows));
  else for (const r of rows) console.log(formatRow(r));
  return 0;
}
