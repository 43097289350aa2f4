// The backend registry: which backends this process can run, and one constructor for all of them.
import { UsageError } from "@moe8/fp8-core";
import { type Backend, TsBackend } from "@moe8/tensor";
import { CpuBackend } from "./cpu-backend.ts";
import { CudaBackend } from "./cuda-backend.ts";
import { loadNative } from "./index.ts";

export type BackendChoice = "ts" | "cpu" | "cuda" | "auto";

/** Why the cuda backend cannot run in this process, or null when it can. */
export function cudaUnavailable(): string | null {
  const s = loadNative();
  if (!s.addon) return `the native addon is not loaded (${s.reason})`;
  if (!s.addon.info().cudaCompiled || typeof s.addon.cudaInfo !== "function")
    return "this build of @moe8/kernels has no CUDA support (cargo feature `cuda`)";
  const info = s.addon.cudaInfo();
  return info.available ? null : (info.reason ?? "unknown");
}

/** Names of the backends available here, fastest last: always `ts`, `cpu` when the addon loads. */
export function availableBackends(): string[] {
  const out = ["ts"];
  if (loadNative().loaded) out.push("cpu");
  if (out.includes("cpu") && cudaUnavailable() === null) out.push("cuda");
  return out;
}

/** A new backend by name; `auto` picks the fastest one available (cuda, then cpu, then ts). */
export function createBackend(name: BackendChoice): Backend {
  switch (name) {
    case "ts":
      return new TsBackend();
    case "cpu": {
      const s = loadNative();
      if (!s.loaded) throw new UsageError(`backend "cpu" is not available: ${s.reason}`);
      return new CpuBackend();
    }
    case "cuda": {
      const why = cudaUnavailable();
      if (why !== null) throw new UsageError(`backend "cuda" is not available: ${why}`);
      return new CudaBackend();
    }
    case "auto":
      if (loadNative().loaded && cudaUnavailable() === null) return new CudaBackend();
      return loadNative().loaded ? new CpuBackend() : new TsBackend();
    default:
      throw new UsageError(`unknown backend "${name as string}" (choose ts, cpu, cuda or auto)`);
  }
}
