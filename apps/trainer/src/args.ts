// A small flag parser: `--name value`, `--name=value`, boolean `--name`, an integer that may be left
// out (`--expert-parallel` alone, or `--expert-parallel 2`: "optional-int"), and dotted names such as
// `--precision.attention=bf16`. Each command declares its flags; anything else, a bare argument
// included (`train 100` is not `--steps 100`), is a UsageError. Values are quoted cut short.
// `--help` anywhere lists the command's flags (HelpRequest).
import { brief, clip } from "@moe8/data/errors";
import { UsageError } from "@moe8/fp8-core";

export type FlagKind = "string" | "number" | "int" | "optional-int" | "boolean" | "list";

export interface FlagSpec {
  [name: string]: FlagKind;
}

export interface ParsedArgs {
  flags: Record<string, string | number | boolean | string[]>;
  /** Dotted flags matched by a declared prefix ending in `.` (e.g. `precision.`), in order. */
  dotted: [string, string][];
}

/**
 * Thrown by parseArgs for `--help`: the CLI prints the command's flags from the very table the parser
 * was given (so help lists exactly what is accepted) and exits 0.
 */
export class HelpRequest extends Error {
  constructor(
    readonly spec: FlagSpec,
    readonly dottedPrefixes: string[],
  ) {
    super("--help");
  }
}

export function parseArgs(argv: string[], spec: FlagSpec, dottedPrefixes: string[] = []): ParsedArgs {
  if (argv.includes("--help") && !Object.hasOwn(spec, "help")) throw new HelpRequest(spec, dottedPrefixes);
  const out: ParsedArgs = { flags: {}, dotted: [] };
  let lastBoolean: string | null = null; // the boolean flag just read, bare (`--debug`)
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith("--")) {
      // `--json 4`: name the flag that takes no value rather than the stray argument alone.
      if (lastBoolean !== null)
        throw new UsageError(`flag --${lastBoolean} takes no value (got ${brief(arg)})`);
      throw new UsageError(`unexpected argument ${brief(arg)} (flags are --name value)`);
    }
    lastBoolean = null;
    const eq = arg.indexOf("=");
    const name = eq >= 0 ? arg.slice(2, eq) : arg.slice(2);
    let value: string | undefined = eq >= 0 ? arg.slice(eq + 1) : undefined;
    const prefix = dottedPrefixes.find((p) => name.startsWith(p));
    const kind = Object.hasOwn(spec, name) ? spec[name] : undefined;
    if (!kind && !prefix) throw new UsageError(`unknown flag --${clip(name, 60)}`);
    if (kind === "boolean") {
      if (value !== undefined && value !== "true" && value !== "false")
        throw new UsageError(`flag --${name} takes no value (got ${brief(value)})`);
      out.flags[name] = value !== "false";
      if (value === undefined) lastBoolean = name;
      continue;
    }
    if (kind === "optional-int") {
      // Bare (no value, or a flag next): true; else the next argument, an integer.
      if (value === undefined && (argv[i + 1] === undefined || argv[i + 1].startsWith("--"))) {
        out.flags[name] = true;
        continue;
      }
      value ??= argv[++i];
      const n = Number(value);
      if (value.trim() === "" || !Number.isInteger(n))
        throw new UsageError(`flag --${name}: ${brief(value)} is not an integer`);
      out.flags[name] = n;
      continue;
    }
    if (value === undefined) {
      value = argv[++i];
      if (value === undefined || value.startsWith("--")) throw new UsageError(`flag --${name} needs a value`);
    }
    if (!kind) {
      out.dotted.push([name, value]);
      continue;
    }
    if (kind === "number" || kind === "int") {
      const n = Number(value);
      if (value.trim() === "" || !Number.isFinite(n))
        throw new UsageError(`flag --${name}: ${brief(value)} is not a number`);
      if (kind === "int" && !Number.isInteger(n))
        throw new UsageError(`flag --${name}: ${brief(value)} is not an integer`);
      out.flags[name] = n;
    } else if (kind === "list") {
      const prev = out.flags[name];
      out.flags[name] = [...(Array.isArray(prev) ? prev : []), value];
    } else {
      out.flags[name] = value;
    }
  }
  return out;
}

/** An integer flag's value checked against [min, max], or undefined when the flag was not given. */
export function intFlag(
  flags: ParsedArgs["flags"] | Record<string, unknown>,
  name: string,
  min: number,
  max: number,
): number | undefined {
  const v = flags[name];
  if (v === undefined) return undefined;
  if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max)
    throw new UsageError(`--${name} ${v}: must be an integer in [${min}, ${max}]`);
  return v;
}
