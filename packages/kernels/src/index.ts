// Loads the napi-rs addon, or explains why it could not be loaded.
// Never throws: callers (the backend registry, doctor) fall back to the pure-TypeScript backend and
// show `reason` to the user. MOE8_NO_NATIVE=1 forces the addon to be treated as absent (tests use it).
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type * as Native from "../native.d.cts";

export type NativeAddon = typeof Native;
export type NativeInfo = Native.NativeInfo;

export interface NativeStatus {
  loaded: boolean;
  /** Why the addon is not loaded (null when it is). */
  reason: string | null;
  addon: NativeAddon | null;
}

const packageDir = join(dirname(fileURLToPath(import.meta.url)), "..");
let cached: NativeStatus | null = null;

function tryLoad(): NativeStatus {
  if (process.env.MOE8_NO_NATIVE === "1") {
    return { loaded: false, reason: "disabled by MOE8_NO_NATIVE=1", addon: null };
  }
  const loader = join(packageDir, "native.cjs");
  if (!existsSync(loader)) {
    return {
      loaded: false,
      reason: `native addon not built (${loader} missing): install Rust and run \`bun run build\``,
      addon: null,
    };
  }
  try {
    const require = createRequire(import.meta.url);
    const addon = require(loader) as NativeAddon;
    addon.info(); // a stale or foreign binary fails here rather than in the middle of a step
    return { loaded: true, reason: null, addon };
  } catch (err) {
    const msg = err instanceof Error ? err.message.split("\n")[0] : String(err);
    return { loaded: false, reason: `native addon failed to load: ${msg}`, addon: null };
  }
}

/** Load (once) and return the addon status. */
export function loadNative(): NativeStatus {
  cached ??= tryLoad();
  return cached;
}

/** The addon, or a thrown error naming why it is unavailable. */
export function requireNative(): NativeAddon {
  const s = loadNative();
  if (!s.addon) throw new Error(`@moe8/kernels: ${s.reason}`);
  return s.addon;
}

/** A bad backend choice (or one not available here) throws @moe8/fp8-core's UsageError, re-exported here. */
import { KERNELS } from "./cuda/kernels.generated.ts";

export { UsageError } from "@moe8/fp8-core";
export { availableBackends, type BackendChoice, createBackend } from "./backends.ts";
export { type BenchOpsFlags, type BenchOpsOptions, type BenchOpsRow, benchOps, TINY } from "./bench-ops.ts";
export { CpuBackend } from "./cpu-backend.ts";
export { type AttentionPath, attentionPath } from "./cuda-backend/attention.ts";
export {
  type GroupedGemmPath,
  groupedGemmPath,
  type Sm90DenseMode,
  sm90DenseChosen,
} from "./cuda-backend/gemm-sm90.ts";
export { CudaBackend } from "./cuda-backend.ts";

/** Every CUDA kernel the cuda backend can launch, as its timing names them (`module.entry`). */
export function cudaKernelNames(): string[] {
  return Object.entries(KERNELS).flatMap(([module, entries]) =>
    Object.keys(entries).map((e) => `${module}.${e}`),
  );
}
