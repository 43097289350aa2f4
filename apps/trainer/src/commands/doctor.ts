// `moe8 doctor [--json]`: what this machine and install can run, and why not when something is missing.

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { arch, cpus, platform, release, totalmem } from "node:os";
import { dirname, join } from "node:path";
import { attentionPath, groupedGemmPath, loadNative } from "@moe8/kernels";
import { type FlagSpec, parseArgs } from "../args.ts";
import { currentRuntime } from "../runtime.ts";

export const DOCTOR_FLAGS: FlagSpec = { json: "boolean", debug: "boolean" };

export interface DoctorReport {
  runtime: { name: string; version: string };
  os: { platform: string; release: string; arch: string };
  cpu: { model: string; cores: number; simd: string | null; memoryGiB: number };
  native: {
    loaded: boolean;
    reason: string | null;
    version?: string;
    target?: string;
    threads?: number;
    cudaCompiled?: boolean;
  };
  backends: string[];
  cuda: {
    available: boolean;
    reason: string;
    name?: string;
    memoryGiB?: number;
    computeCapability?: string;
    arch?: string;
    driver?: string;
    nvrtc?: string;
    cublasLt?: string;
    /**
     * The kernels of the experts' grouped FP8 Fprop/Dgrad: "sm90-wgmma" (gemm_sm90.cu) or "mma.sync"
     * (gemm.cu), and why.
     */
    groupedGemm?: { kernel: string; reason: string };
    attention?: { kernel: string; reason: string };
    /** Whether training steps are replayed from a CUDA graph (docs/runtime.md rule 8). */
    graph?: { on: boolean; reason: string };
  };
  /** NCCL (libnccl.so.2, loaded at run time) for several GPUs' ranks; absent without the cuda feature. */
  nccl?: { available: boolean; version?: string; path?: string; reason?: string; split?: boolean };
  arrow: string;
}

function arrowVersion(): string {
  // Resolve the package's entry and read its package.json: the same under Bun, tsx and Deno.
  const main = createRequire(import.meta.url).resolve("apache-arrow");
  return (JSON.parse(readFileSync(join(dirname(main), "package.json"), "utf8")) as { version: string })
    .version;
}

export function doctorReport(): DoctorReport {
  const native = loadNative();
  const info = native.addon?.info();
  const backends = ["ts"];
  if (native.loaded) backends.push("cpu");
  const ci = info?.cudaCompiled && native.addon?.cudaInfo ? native.addon.cudaInfo() : null;
  const cuda: DoctorReport["cuda"] = !info
    ? { available: false, reason: "native addon not loaded" }
    : !ci
      ? { available: false, reason: "addon built without the `cuda` feature" }
      : ci.available
        ? {
            available: true,
            reason: "",
            name: ci.name ?? undefined,
            memoryGiB: Math.round(((ci.totalMemory ?? 0) / 2 ** 30) * 10) / 10,
            computeCapability: ci.computeCapability ?? undefined,
            arch: ci.arch ?? undefined,
            driver: ci.driverVersion ?? undefined,
            nvrtc: ci.nvrtcVersion ?? undefined,
            cublasLt: ci.cublasLtVersion ?? undefined,
            groupedGemm: groupedGemmPath(ci.computeCapability),
            attention: attentionPath(ci.computeCapability),
            graph:
              process.env.MOE8_CUDA_GRAPH === "0"
                ? { on: false, reason: "MOE8_CUDA_GRAPH=0: every step issues its launches" }
                : {
                    on: true,
                    reason: "from the second step on, one replay a step (MOE8_CUDA_GRAPH=0 turns it off)",
                  },
          }
        : { available: false, reason: ci.reason ?? "unknown" };
  if (cuda.available) backends.push("cuda");
  const ni = info?.cudaCompiled && native.addon?.ncclInfo ? native.addon.ncclInfo() : null;
  const nccl = ni
    ? ni.available
      ? { available: true, version: ni.version ?? undefined, path: ni.path ?? undefined, split: ni.split }
      : { available: false, reason: ni.reason ?? "unknown" }
    : undefined;
  const c = cpus();
  return {
    runtime: currentRuntime(),
    os: { platform: platform(), release: release(), arch: arch() },
    cpu: {
      model: c[0]?.model ?? "unknown",
      cores: c.length,
      simd: info?.simd ?? null,
      memoryGiB: Math.round((totalmem() / 2 ** 30) * 10) / 10,
    },
    native: info
      ? {
          loaded: true,
          reason: null,
          version: info.version,
          target: info.target,
          threads: info.threads,
          cudaCompiled: info.cudaCompiled,
        }
      : { loaded: false, reason: native.reason },
    backends,
    cuda,
    nccl,
    arrow: arrowVersion(),
  };
}

export async function doctor(argv: string[]): Promise<number> {
  const { flags } = parseArgs(argv, DOCTOR_FLAGS);
  const r = doctorReport();
  if (flags.json) {
    console.log(JSON.stringify(r));
    return 0;
  }
  const ok = (b: boolean) => (b ? "yes" : "no");
  console.log(`runtime      ${r.runtime.name} ${r.runtime.version}`);
  console.log(`os           ${r.os.platform} ${r.os.release} (${r.os.arch})`);
  console.log(
    `cpu          ${r.cpu.model}, ${r.cpu.cores} cores, ${r.cpu.memoryGiB} GiB, SIMD ${r.cpu.simd ?? "unknown (native addon not loaded)"}`,
  );
  console.log(
    `native addon ${ok(r.native.loaded)}${r.native.loaded ? ` (moe8-kernels ${r.native.version}, ${r.native.target}, ${r.native.threads} threads)` : ` - ${r.native.reason}`}`,
  );
  const cu = r.cuda;
  console.log(
    `cuda         ${ok(cu.available)}${
      cu.available
        ? ` (${cu.name}, ${cu.memoryGiB} GiB, compute ${cu.computeCapability} -> ${cu.arch}, driver CUDA ${cu.driver}, NVRTC ${cu.nvrtc}, cuBLASLt ${cu.cublasLt})`
        : ` - ${cu.reason}`
    }`,
  );
  if (cu.groupedGemm)
    console.log(
      `FP8 GEMMs (experts' and chosen dense roles) on ${cu.groupedGemm.kernel} (${cu.groupedGemm.reason})`,
    );
  if (cu.attention) console.log(`BF16 attention on ${cu.attention.kernel} (${cu.attention.reason})`);
  if (cu.graph)
    console.log(
      `training step ${cu.graph.on ? "replayed from a CUDA graph" : "uncaptured"} (${cu.graph.reason})`,
    );
  if (r.nccl)
    console.log(
      `nccl         ${ok(r.nccl.available)}${r.nccl.available ? ` (${r.nccl.version}, ${r.nccl.path}${r.nccl.split ? "" : "; no ncclCommSplit: --expert-parallel P below the GPU count needs NCCL 2.18+"})` : ` - ${r.nccl.reason}`}`,
    );
  console.log(`backends     ${r.backends.join(", ")}`);
  console.log(`apache-arrow ${r.arrow}`);
  return 0;
}
