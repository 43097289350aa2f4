// Precision policies (docs/numerics.md, "Presets and overrides"): which precision each part of the
// model computes in. A policy starts from a preset and takes per-package overrides, from CLI-style
// keys (`precision.attention=bf16`) or from JSON; bad input raises a one-line PolicyError.
//
// Meaning of the fields:
// - The GEMM packages (`attention`, `moe-layers`, `model`) each give their Linears a
//   LinearPrecision: a GemmSpec for each of the three GEMMs and the settings below. `moe-layers`
//   covers the experts (the router's gating stays f32 always); `model` covers the output head (the
//   embedding lookup and the norms have no FP8 GEMM: norms are always f32 arithmetic, the
//   embedding's output precision is `outputs`).
// - GemmSpec.format (fp8 precisions only): for fprop the format of both operands; for dgrad and
//   wgrad the format of the gradient operand dy (the other operand, W or x, stays E4M3).
// - `outputs`: precision of the Fprop/Dgrad outputs and of the package's other activations (bf16:
//   the attention core takes BF16 inputs with f32 accumulation; f32: all f32). Wgrad is always f32.
// - `cacheActivations`: how activations for an fp8 Wgrad are kept (fp8: dequantise, transpose and
//   requantise 128x1; bf16: quantise afresh from the high-precision copy). Unused without fp8 GEMMs.
// - `pow2Scales`, `eps`: quantisation options; `promotion`: the promotion interval N_C.
// How each role's operands are then quantised is decided in one place, gemmPlan (roles.ts).

import { UsageError } from "./errors.ts";
import type { Fp8Format } from "./formats.ts";
import { DEFAULT_EPS } from "./quantize.ts";

export type GemmPrecision = "f32" | "bf16" | "fp8" | "fp8-tensorwise" | "fp8-unscaled";
export type PresetName = "fp32" | "bf16" | "fp8" | "fp8-tensorwise" | "fp8-unscaled";
export type GemmRole = "fprop" | "dgrad" | "wgrad";
export type GemmPackageName = "attention" | "moe-layers" | "model";
export type PackageName = GemmPackageName | "optimizer";
export type CachePrecision = "fp8" | "bf16";
export type OutputPrecision = "bf16" | "f32";
export type MomentPrecision = "bf16" | "f32";

export const GEMM_PRECISIONS: readonly GemmPrecision[] = [
  "f32",
  "bf16",
  "fp8",
  "fp8-tensorwise",
  "fp8-unscaled",
];
export const PRESET_NAMES: readonly PresetName[] = ["fp32", "bf16", "fp8", "fp8-tensorwise", "fp8-unscaled"];
export const DEFAULT_PRESET: PresetName = "fp8";
export const GEMM_ROLES: readonly GemmRole[] = ["fprop", "dgrad", "wgrad"];
export const GEMM_PACKAGES: readonly GemmPackageName[] = ["attention", "moe-layers", "model"];
export const PACKAGES: readonly PackageName[] = [...GEMM_PACKAGES, "optimizer"];
const FORMATS: readonly Fp8Format[] = ["e4m3", "e5m2"];
const CACHES: readonly CachePrecision[] = ["fp8", "bf16"];
const OUTPUTS: readonly OutputPrecision[] = ["bf16", "f32"];
const MOMENTS: readonly MomentPrecision[] = ["bf16", "f32"];
export const DEFAULT_PROMOTION = 128;

export interface GemmSpec {
  precision: GemmPrecision;
  /**
   * FP8 format (fp8 precisions only): for fprop, of both operands; for dgrad and wgrad, of the
   * gradient dy (the other operand, W or x, stays E4M3).
   */
  format: Fp8Format;
}

/** A GEMM package's policy: what each of its Linears (and their three GEMMs) runs in. */
export interface LinearPrecision {
  fprop: GemmSpec;
  dgrad: GemmSpec;
  wgrad: GemmSpec;
  /** What Wgrad's x comes from: the FP8 Fprop operand (dequantised, requantised 128x1) or a BF16 copy. */
  cacheActivations: CachePrecision;
  pow2Scales: boolean;
  /** Promotion interval N_C: a multiple of 32 from 32 to 4096 (default 128). */
  promotion: number;
  /** Floor on a group's amax (default 1e-12). */
  eps: number;
  /** Output type of the Fprop and Dgrad GEMMs (Wgrad accumulates into the f32 gradient). */
  outputs: OutputPrecision;
}

export interface OptimizerPolicy {
  /** AdamW moments. */
  moments: MomentPrecision;
  /** Master weights and gradients: always f32. */
  master: "f32";
}

export interface PrecisionPolicy {
  /** The preset the policy started from (overrides do not change it). */
  preset: PresetName;
  attention: LinearPrecision;
  "moe-layers": LinearPrecision;
  model: LinearPrecision;
  optimizer: OptimizerPolicy;
}

/** Bad policy input: a UsageError, so the CLI reports it in one line with exit code 2. */
export class PolicyError extends UsageError {}

// ---- presets ---------------------------------------------------------------------------------------

function gemmPackage(precision: GemmPrecision, outputs: OutputPrecision, fp8: boolean): LinearPrecision {
  const spec = (): GemmSpec => ({ precision, format: "e4m3" });
  return {
    fprop: spec(),
    dgrad: spec(),
    wgrad: spec(),
    cacheActivations: fp8 ? "fp8" : "bf16",
    pow2Scales: false,
    promotion: DEFAULT_PROMOTION,
    eps: DEFAULT_EPS,
    outputs,
  };
}

/** A fresh copy of a preset, exactly as the presets table of docs/numerics.md gives it. */
export function presetPolicy(name: PresetName | string): PrecisionPolicy {
  if (!(PRESET_NAMES as readonly string[]).includes(name))
    throw new PolicyError(`precision: unknown preset ${quote(name)} (allowed: ${PRESET_NAMES.join(", ")})`);
  const preset = name as PresetName;
  if (preset === "fp32") {
    return {
      preset,
      attention: gemmPackage("f32", "f32", false),
      "moe-layers": gemmPackage("f32", "f32", false),
      model: gemmPackage("f32", "f32", false),
      optimizer: { moments: "f32", master: "f32" },
    };
  }
  // bf16 and the fp8 presets: everything outside the Linear GEMMs is as in bf16, in particular the
  // embedding and the output head stay BF16 under fp8.
  const fp8 = preset !== "bf16";
  const linear: GemmPrecision = preset === "bf16" ? "bf16" : preset;
  return {
    preset,
    attention: gemmPackage(linear, "bf16", fp8),
    "moe-layers": gemmPackage(linear, "bf16", fp8),
    model: gemmPackage("bf16", "bf16", fp8),
    optimizer: { moments: "bf16", master: "f32" },
  };
}

// ---- overrides -------------------------------------------------------------------------------------

/** A user-supplied string, quoted and escaped so the message stays on one line. */
function quote(value: string): string {
  return JSON.stringify(String(value));
}

function pick<T extends string>(key: string, value: string, allowed: readonly T[], what: string): T {
  if (!(allowed as readonly string[]).includes(value))
    throw new PolicyError(`${key}: unknown ${what} ${quote(value)} (allowed: ${allowed.join(", ")})`);
  return value as T;
}

function parseBoolean(key: string, value: string): boolean {
  if (value === "true") return true;
  if (value === "false") return false;
  throw new PolicyError(`${key}: invalid boolean ${quote(value)} (allowed: true, false)`);
}

function parsePromotion(key: string, value: string): number {
  const n = Number(value);
  if (value.trim() === "" || !Number.isInteger(n) || n < 32 || n > 4096 || n % 32 !== 0)
    throw new PolicyError(
      `${key}: invalid promotion interval ${quote(value)} (allowed: a multiple of 32 from 32 to 4096)`,
    );
  return n;
}

function parseEps(key: string, value: string): number {
  const n = Number(value);
  if (value.trim() === "" || !Number.isFinite(n) || !(Math.fround(n) > 0))
    throw new PolicyError(`${key}: invalid eps ${quote(value)} (allowed: a positive finite number)`);
  return n;
}

// Settings one GEMM package takes (`precision.<package>.<setting>`), and those that also apply to
// every GEMM package at once (`precision.<setting>`).
const PACKAGE_SETTINGS = [
  ...GEMM_ROLES,
  "format",
  "gradients",
  "cacheActivations",
  "pow2Scales",
  "promotion",
  "eps",
  "outputs",
] as const;
const GLOBAL_SETTINGS = ["gradients", "cacheActivations", "pow2Scales", "promotion", "eps"] as const;
const ROLE_SETTINGS = ["precision", "format"] as const;
const OPTIMIZER_SETTINGS = ["moments", "master"] as const;

/** Applies `setting = value` to one GEMM package. */
function setPackage(p: LinearPrecision, key: string, setting: string, value: string): void {
  switch (setting) {
    case "fprop":
    case "dgrad":
    case "wgrad":
      p[setting].precision = pick(key, value, GEMM_PRECISIONS, "precision");
      return;
    case "format": {
      const format = pick(key, value, FORMATS, "format");
      for (const role of GEMM_ROLES) p[role].format = format;
      return;
    }
    case "gradients": {
      const format = pick(key, value, FORMATS, "format");
      p.dgrad.format = format;
      p.wgrad.format = format;
      return;
    }
    case "cacheActivations":
      p.cacheActivations = pick(key, value, CACHES, "cache precision");
      return;
    case "pow2Scales":
      p.pow2Scales = parseBoolean(key, value);
      return;
    case "promotion":
      p.promotion = parsePromotion(key, value);
      return;
    case "eps":
      p.eps = parseEps(key, value);
      return;
    case "outputs":
      p.outputs = pick(key, value, OUTPUTS, "output precision");
      return;
  }
}

function tooLong(key: string): never {
  throw new PolicyError(`${key}: unknown key (too many parts)`);
}

/** Applies one override, `precision.<...> = value`, to `policy` in place. */
function applyOverride(policy: PrecisionPolicy, rawKey: string, value: string): void {
  const key = rawKey.replace(/^--/, "");
  const parts = key.split(".");
  if (parts[0] !== "precision")
    throw new PolicyError(`${quote(key)}: unknown key (precision keys start with "precision.")`);
  if (parts.length === 1) throw new PolicyError(`${key}: the preset is chosen before overrides`);
  const [, head, setting, sub] = parts;
  if ((GEMM_PACKAGES as readonly string[]).includes(head)) {
    const pkg = policy[head as GemmPackageName];
    if (setting === undefined) {
      const precision = pick(key, value, GEMM_PRECISIONS, "precision");
      for (const role of GEMM_ROLES) pkg[role].precision = precision;
      return;
    }
    pick(key, setting, PACKAGE_SETTINGS, `${head} setting`);
    if (sub === undefined) {
      setPackage(pkg, key, setting, value);
      return;
    }
    if (parts.length > 4 || !(GEMM_ROLES as readonly string[]).includes(setting)) tooLong(key);
    const spec = pkg[setting as GemmRole];
    if (pick(key, sub, ROLE_SETTINGS, `${setting} setting`) === "precision")
      spec.precision = pick(key, value, GEMM_PRECISIONS, "precision");
    else spec.format = pick(key, value, FORMATS, "format");
    return;
  }
  if (head === "optimizer") {
    if (setting === undefined)
      throw new PolicyError(`${key}: needs a setting (allowed: ${OPTIMIZER_SETTINGS.join(", ")})`);
    if (sub !== undefined) tooLong(key);
    if (pick(key, setting, OPTIMIZER_SETTINGS, "optimizer setting") === "moments")
      policy.optimizer.moments = pick(key, value, MOMENTS, "moments precision");
    else policy.optimizer.master = pick(key, value, ["f32"] as const, "master precision");
    return;
  }
  if ((GLOBAL_SETTINGS as readonly string[]).includes(head)) {
    if (setting !== undefined) tooLong(key);
    for (const name of GEMM_PACKAGES) setPackage(policy[name], key, head, value);
    return;
  }
  throw new PolicyError(
    `${key}: unknown package or setting ${quote(head)} (allowed: ${[...PACKAGES, ...GLOBAL_SETTINGS].join(", ")})`,
  );
}

export interface PolicyArgs {
  /** Preset name (default fp8). */
  preset?: string;
  /** CLI-style overrides in order, keys without the leading dashes: ["precision.attention", "bf16"]. */
  overrides?: [key: string, value: string][];
}

/**
 * The policy a command line asks for: the preset, then each override in order (later ones win).
 * An override with the bare key `precision` also chooses the preset.
 */
export function parsePolicy(args: PolicyArgs = {}): PrecisionPolicy {
  const overrides = args.overrides ?? [];
  let preset = args.preset ?? DEFAULT_PRESET;
  for (const [key, value] of overrides) if (key.replace(/^--/, "") === "precision") preset = value;
  const policy = presetPolicy(preset);
  for (const [key, value] of overrides) {
    if (key.replace(/^--/, "") === "precision") continue;
    applyOverride(policy, key, value);
  }
  return policy;
}

// ---- JSON --------------------------------------------------------------------------------------------

/** Flattens a JSON object into override pairs: { attention: { fprop: "bf16" } } -> precision.attention.fprop. */
function flatten(obj: Record<string, unknown>, prefix: string, out: [string, string][]): void {
  for (const [name, value] of Object.entries(obj)) {
    const key = `${prefix}.${name}`;
    if (value !== null && typeof value === "object" && !Array.isArray(value))
      flatten(value as Record<string, unknown>, key, out);
    else if (typeof value === "string" || typeof value === "number" || typeof value === "boolean")
      out.push([key, String(value)]);
    else
      throw new PolicyError(
        `${key}: expected a string, number, boolean or object (got ${JSON.stringify(value)})`,
      );
  }
}

/**
 * A policy from JSON of the policy's own shape, every field optional:
 * `{ "preset": "fp8", "moe-layers": { "wgrad": "bf16" }, "optimizer": { "moments": "f32" } }`.
 * A role takes a precision string or `{ precision, format }`; a package may be a precision string.
 */
export function policyFromJson(json: unknown): PrecisionPolicy {
  if (json === null || typeof json !== "object" || Array.isArray(json))
    throw new PolicyError(`precision: expected a JSON object (got ${JSON.stringify(json)})`);
  const { preset, ...rest } = json as Record<string, unknown>;
  if (preset !== undefined && typeof preset !== "string")
    throw new PolicyError(`precision.preset: expected a string (got ${JSON.stringify(preset)})`);
  const overrides: [string, string][] = [];
  flatten(rest, "precision", overrides);
  return parsePolicy({ preset, overrides });
}

/** The whole policy as a plain JSON object that policyFromJson reads back to an equal policy. */
export function policyToJson(policy: PrecisionPolicy): Record<string, unknown> {
  return JSON.parse(JSON.stringify(policy));
}

// ---- description and helpers ------------------------------------------------------------------------

function describeSpec(spec: GemmSpec): string {
  return isFp8Precision(spec.precision) && spec.format !== "e4m3"
    ? `${spec.precision}/${spec.format}`
    : spec.precision;
}

/** One line, e.g. `fp8: attention[gemm=fp8 cache=fp8 pow2=false promotion=128 outputs=bf16] ...`. */
export function describePolicy(policy: PrecisionPolicy): string {
  const parts = GEMM_PACKAGES.map((name) => {
    const p = policy[name];
    const roles = GEMM_ROLES.map((r) => describeSpec(p[r]));
    const gemm =
      roles[0] === roles[1] && roles[1] === roles[2]
        ? `gemm=${roles[0]}`
        : GEMM_ROLES.map((r, i) => `${r}=${roles[i]}`).join(" ");
    const eps = p.eps === DEFAULT_EPS ? "" : ` eps=${p.eps}`;
    return `${name}[${gemm} cache=${p.cacheActivations} pow2=${p.pow2Scales} promotion=${p.promotion}${eps} outputs=${p.outputs}]`;
  });
  const o = policy.optimizer;
  return `${policy.preset}: ${parts.join(" ")} optimizer[moments=${o.moments} master=${o.master}]`;
}

/** Whether a GEMM precision quantises its operands to FP8. */
export function isFp8Precision(precision: GemmPrecision): boolean {
  return precision === "fp8" || precision === "fp8-tensorwise" || precision === "fp8-unscaled";
}
