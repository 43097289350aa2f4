// GPU time of a profiled step by kernel class (`bench step --profile` on cuda): the breakdown issue
// 18's measurements compare before and after a change (GEMMs, attention, precision conversions, ...).

/** The classes, in the order they are printed. */
export const KERNEL_CLASSES = [
  "gemm",
  "attention",
  "quantisation",
  "bf16 conversion",
  "moe routing and data movement",
  "norms, rope, heads, swiglu, embedding",
  "loss and optimiser",
  "elementwise",
  "other",
] as const;

export type KernelClass = (typeof KERNEL_CLASSES)[number];

/** The class of a kernel named as the cuda backend's timing names it (`module.entry`, `cublasLt.*`). */
export function kernelClass(name: string): KernelClass {
  const [module, entry = ""] = name.split(".", 2);
  if (module === "cublasLt" || module === "gemm16" || module === "gemm") return "gemm";
  if (module === "gemm_sm90") return entry.startsWith("gemm_") ? "gemm" : "quantisation";
  if (module === "flash" || module === "flash_sm90" || module === "attention") return "attention";
  if (module === "quant") return "quantisation";
  if (module === "moe") return "moe routing and data movement";
  if (module === "nn") return "norms, rope, heads, swiglu, embedding";
  if (module === "optim") return "loss and optimiser";
  if (module === "elementwise") return /bf16/.test(entry) ? "bf16 conversion" : "elementwise";
  return "other";
}

/** GPU ms and launches per class (every class present, zeros included), in KERNEL_CLASSES order. */
export function byKernelClass(kernels: readonly { name: string; ms: number; launches: number }[]) {
  const out = KERNEL_CLASSES.map((c) => ({ class: c, ms: 0, launches: 0 }));
  for (const k of kernels) {
    const row = out[KERNEL_CLASSES.indexOf(kernelClass(k.name))];
    row.ms += k.ms;
    row.launches += k.launches;
  }
  return out.map((r) => ({ ...r, ms: +r.ms.toFixed(2) }));
}
