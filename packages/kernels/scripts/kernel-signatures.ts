// Generates src/cuda/kernels.generated.ts, the one TypeScript copy of every CUDA kernel's signature,
// from the declarations in src/cuda/kernels/*.cu (where each signature is written once):
//
//     bun packages/kernels/scripts/kernel-signatures.ts
//
// It reads every `KERNEL void [__cluster_dims__(x, y, z)] [__launch_bounds__(n)] name(params)`
// declaration (KERNEL is
// common.cuh's `extern "C" __global__`), including those inside function-like macros with `##`
// token pasting, which it expands at each instantiation (flash.cu's FLASH_SHAPE). Each C parameter
// becomes the kind of its argument: an 8-byte slot for pointers and 64-bit integers (u64), int
// (i32), unsigned (u32), float (f32) and double (f64), or the 128 bytes of a TMA tensor map for
// `const __grid_constant__ CUtensorMap` (tmap, gemm_sm90.cu); any other type is an error, as is a
// declaration it cannot read. It
// also copies the integer constants #defined in common.cuh and in each module (group and format
// codes, tile sizes, grid limits), so the host never restates them. No NVRTC is needed; the kernel
// tests fail when the committed file is stale, and scripts/nvrtc-check.py compares the table with
// the parameters of each compiled entry point (PTX), so this parser cannot drift from the compiler.
import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import { basename, dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import type { ArgKind } from "../src/cuda-backend/launch.ts";

export interface ParsedKernel {
  name: string;
  /** __launch_bounds__'s thread count, or null when the kernel declares none. */
  maxThreads: number | null;
  params: [string, ArgKind][];
}

export interface ParsedSources {
  /** module (file name without .cu) -> kernels in source order. */
  modules: Map<string, ParsedKernel[]>;
  /** "common" (common.cuh) and each module -> its integer #defines in source order. */
  defines: Map<string, [string, number][]>;
}

const packageDir = join(dirname(fileURLToPath(import.meta.url)), "..");
export const KERNEL_DIR = join(packageDir, "src", "cuda", "kernels");
export const GENERATED_PATH = join(packageDir, "src", "cuda", "kernels.generated.ts");

class SignatureError extends Error {
  override name = "SignatureError";
}

/** Source text with line continuations joined and comments removed (string literals kept). */
function stripComments(src: string): string {
  const text = src.replace(/\\\r?\n/g, " ");
  let out = "";
  for (let i = 0; i < text.length; ) {
    const c = text[i];
    if (c === '"' || c === "'") {
      let j = i + 1;
      while (j < text.length && text[j] !== c) j += text[j] === "\\" ? 2 : 1;
      out += text.slice(i, j + 1);
      i = j + 1;
    } else if (text.startsWith("//", i)) {
      while (i < text.length && text[i] !== "\n") i++;
    } else if (text.startsWith("/*", i)) {
      const end = text.indexOf("*/", i + 2);
      if (end < 0) throw new SignatureError("unterminated /* comment");
      out += " ";
      i = end + 2;
    } else {
      out += c;
      i++;
    }
  }
  return out;
}

interface Macro {
  params: string[];
  body: string;
}

interface Source {
  /** The code with every preprocessor line blanked (so offsets keep the source order). */
  code: string;
  macros: Map<string, Macro>;
  /** Object-like #defines whose value is an integer literal. */
  integers: [string, number][];
  typedefs: Map<string, string>;
}

function readSource(src: string): Source {
  const lines = stripComments(src).split("\n");
  const macros = new Map<string, Macro>();
  const integers: [string, number][] = [];
  const code: string[] = [];
  for (const line of lines) {
    const d = /^\s*#\s*define\s+([A-Za-z_]\w*)(\([^)]*\))?\s*(.*)$/.exec(line);
    if (d) {
      const [, name, params, body] = d;
      if (params !== undefined) {
        const list = params
          .slice(1, -1)
          .split(",")
          .map((p) => p.trim());
        macros.set(name, { params: list.filter((p) => p !== ""), body });
      } else if (/^-?(0x[0-9a-fA-F]+|\d+)[uUlL]*$/.test(body.trim())) {
        integers.push([name, Number(body.trim().replace(/[uUlL]+$/, ""))]);
      }
    }
    code.push(/^\s*#/.test(line) ? "" : line);
  }
  const typedefs = new Map<string, string>();
  for (const m of code.join("\n").matchAll(/\btypedef\s+([A-Za-z_][\w\s]*?)\s+([A-Za-z_]\w*)\s*;/g))
    typedefs.set(m[2], m[1].replace(/\s+/g, " "));
  return { code: code.join("\n"), macros, integers, typedefs };
}

/** The argument texts of a call whose "(" is at `open`, and the offset after its ")". */
function callArgs(text: string, open: number): { args: string[]; end: number } {
  const args: string[] = [];
  let depth = 0;
  let start = open + 1;
  for (let i = open; i < text.length; i++) {
    const c = text[i];
    if (c === "(") depth++;
    else if (c === ")" && --depth === 0) {
      args.push(text.slice(start, i).trim());
      return { args: args.length === 1 && args[0] === "" ? [] : args, end: i + 1 };
    } else if (c === "," && depth === 1) {
      args.push(text.slice(start, i).trim());
      start = i + 1;
    }
  }
  throw new SignatureError(`unbalanced parentheses in ${text.slice(open, open + 60)}`);
}

/** A macro body with its parameters replaced by the arguments, then `##` pasted. */
function expand(name: string, m: Macro, args: string[]): string {
  if (args.length !== m.params.length)
    throw new SignatureError(`${name}: ${args.length} arguments for ${m.params.length} parameters`);
  if (m.params.length === 0) return m.body;
  const byName = new Map(m.params.map((p, i) => [p, args[i]]));
  const re = new RegExp(`\\b(${m.params.join("|")})\\b`, "g");
  const text = m.body.replace(re, (p) => byName.get(p)!).replace(/\s*##\s*/g, "");
  if (text.replace(/"(?:[^"\\]|\\.)*"/g, "").includes("#"))
    throw new SignatureError(`${name}: stringification (#) in a kernel macro is not supported`);
  return text;
}

const KERNEL_START = /\bKERNEL\b|\bextern\s*"C"/g;
const DECLARATION =
  /(?:KERNEL|extern\s*"C"\s+__global__)\s+void\s+(?:__cluster_dims__\s*\([^()]*\)\s*)?(?:__launch_bounds__\s*\(([^()]*)\)\s*)?([A-Za-z_]\w*)\s*\(([^()]*)\)\s*\{/y;

/** Whether a function-like macro declares kernels: itself, or through a kernel macro it invokes. */
function declaresKernels(name: string, src: Source, seen = new Set<string>()): boolean {
  const body = src.macros.get(name)?.body ?? "";
  if (/\bKERNEL\b|\bextern\s*"C"/.test(body)) return true;
  seen.add(name);
  for (const other of src.macros.keys())
    if (!seen.has(other) && new RegExp(`\\b${other}\\s*\\(`).test(body) && declaresKernels(other, src, seen))
      return true;
  return false;
}

/** Kernels declared in `text` (each with its offset), expanding kernel macros' instantiations. */
function declarations(text: string, src: Source, depth = 0): { at: number; decl: string[] }[] {
  if (depth > 8) throw new SignatureError("kernel macros nested more than 8 deep");
  const found: { at: number; decl: string[] }[] = [];
  for (const m of text.matchAll(KERNEL_START)) {
    DECLARATION.lastIndex = m.index;
    const d = DECLARATION.exec(text);
    if (!d)
      throw new SignatureError(
        `cannot read the kernel declaration at: ${text.slice(m.index, m.index + 120)}`,
      );
    found.push({ at: m.index, decl: [d[1] ?? "", d[2], d[3]] });
  }
  for (const [name, macro] of src.macros) {
    if (!declaresKernels(name, src)) continue;
    for (const m of text.matchAll(new RegExp(`\\b${name}\\s*\\(`, "g"))) {
      const { args } = callArgs(text, m.index + m[0].length - 1);
      for (const inner of declarations(expand(name, macro, args), src, depth + 1))
        found.push({ at: m.index, decl: inner.decl });
    }
  }
  return found.sort((a, b) => a.at - b.at);
}

const SCALAR_KINDS: Record<string, ArgKind> = {
  int: "i32",
  "signed int": "i32",
  signed: "i32",
  unsigned: "u32",
  "unsigned int": "u32",
  "long long": "u64",
  "long long int": "u64",
  "unsigned long long": "u64",
  "unsigned long long int": "u64",
  float: "f32",
  double: "f64",
};

function paramKind(kernel: string, param: string, typedefs: Map<string, string>): [string, ArgKind] {
  const words = param.replace(/\*/g, " * ").split(/\s+/);
  const tokens = words.filter(
    (t) => t !== "" && !["const", "volatile", "__restrict__", "__restrict", "__grid_constant__"].includes(t),
  );
  const name = tokens.pop();
  if (!name || !/^[A-Za-z_]\w*$/.test(name) || tokens.length === 0)
    throw new SignatureError(`${kernel}: cannot read the parameter "${param}" (type and name needed)`);
  if (tokens.includes("*")) return [name, "u64"];
  if (tokens.join(" ") === "CUtensorMap") {
    // By value in the parameter space, where the TMA instructions read it (a copy would not do).
    if (!words.includes("const") || !words.includes("__grid_constant__"))
      throw new SignatureError(
        `${kernel}: tensor map "${param}" must be a const __grid_constant__ parameter`,
      );
    return [name, "tmap"];
  }
  let type = tokens.join(" ");
  for (let i = 0; i < 8 && typedefs.has(type); i++) type = typedefs.get(type)!;
  const kind = SCALAR_KINDS[type];
  if (!kind)
    throw new SignatureError(`${kernel}: parameter "${param}" has type ${type}, which has no argument kind`);
  return [name, kind];
}

function launchBound(kernel: string, text: string, integers: Map<string, number>): number | null {
  if (text === "") return null;
  const first = text.split(",")[0].trim();
  const n = /^\d+$/.test(first) ? Number(first) : integers.get(first);
  if (n === undefined) throw new SignatureError(`${kernel}: cannot evaluate __launch_bounds__(${text})`);
  return n;
}

/** Every module's kernels and every file's integer constants. */
export function parseKernelSources(dir = KERNEL_DIR): ParsedSources {
  const common = readSource(readFileSync(join(dir, "common.cuh"), "utf8"));
  const modules = new Map<string, ParsedKernel[]>();
  const defines = new Map<string, [string, number][]>([["common", common.integers]]);
  const files = readdirSync(dir)
    .filter((f) => f.endsWith(".cu"))
    .sort();
  if (files.length === 0) throw new SignatureError(`no .cu files in ${dir}`);
  for (const file of files) {
    const module = basename(file, ".cu");
    try {
      const src = readSource(readFileSync(join(dir, file), "utf8"));
      for (const [k, v] of common.macros) if (!src.macros.has(k)) src.macros.set(k, v);
      for (const [k, v] of common.typedefs) if (!src.typedefs.has(k)) src.typedefs.set(k, v);
      const integers = new Map([...common.integers, ...src.integers]);
      const kernels: ParsedKernel[] = [];
      const seen = new Set<string>();
      for (const { decl } of declarations(src.code, src)) {
        const [bounds, name, list] = decl;
        if (seen.has(name)) throw new SignatureError(`kernel ${name} is declared twice`);
        seen.add(name);
        const params = list.trim() === "" || list.trim() === "void" ? [] : list.split(",");
        const parsed = params.map((p) => paramKind(name, p.trim(), src.typedefs));
        const names = new Set(parsed.map(([n]) => n));
        if (names.size !== parsed.length) throw new SignatureError(`${name}: two parameters share a name`);
        kernels.push({ name, maxThreads: launchBound(name, bounds, integers), params: parsed });
      }
      modules.set(module, kernels);
      defines.set(module, src.integers);
    } catch (e) {
      if (e instanceof SignatureError) throw new SignatureError(`${file}: ${e.message}`);
      throw e;
    }
  }
  return { modules, defines };
}

/** The generated TypeScript module: one kernel per line (scripts/nvrtc-check.py reads those lines). */
export function renderTable(parsed: ParsedSources, dir = KERNEL_DIR): string {
  const from = relative(join(packageDir, "..", ".."), dir);
  const out = [
    `// Generated from ${from}/*.cu by \`bun packages/kernels/scripts/kernel-signatures.ts\`: do not edit.`,
    "// test/kernel-signatures.test.ts fails when this file is stale, and scripts/nvrtc-check.py checks it",
    "// against the parameters of the compiled entry points (PTX).",
    "// biome-ignore-all format: one kernel per line, the layout scripts/nvrtc-check.py reads",
    "",
    "/** Each module's kernels: parameters in declaration order, each with the kind of its argument slot. */",
    "export const KERNELS = {",
  ];
  for (const [module, kernels] of parsed.modules) {
    out.push(`  ${module}: {`);
    for (const k of kernels) {
      const params = k.params.map(([n, kind]) => `["${n}", "${kind}"]`).join(", ");
      out.push(
        `    ${k.name}: { module: "${module}", name: "${k.name}", maxThreads: ${k.maxThreads}, params: [${params}] },`,
      );
    }
    out.push("  },");
  }
  out.push("} as const;", "");
  out.push("/** Integer constants #defined in common.cuh (`common`) and in each module. */");
  out.push("export const DEFINES = {");
  for (const [file, ints] of parsed.defines)
    out.push(`  ${file}: {${ints.map(([n, v]) => ` ${n}: ${v}`).join(",")}${ints.length ? " " : ""}},`);
  out.push("} as const;", "");
  return out.join("\n");
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  try {
    const parsed = parseKernelSources();
    writeFileSync(GENERATED_PATH, renderTable(parsed));
    const n = [...parsed.modules.values()].reduce((s, k) => s + k.length, 0);
    console.log(`kernel-signatures: ${n} kernels in ${parsed.modules.size} modules -> ${GENERATED_PATH}`);
  } catch (e) {
    console.error(`kernel-signatures: ${e instanceof Error ? e.message : String(e)}`);
    process.exit(1);
  }
}
