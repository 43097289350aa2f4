// Typed kernel arguments. Every kernel's parameters are declared once, in its .cu file;
// scripts/kernel-signatures.ts copies them into ../cuda/kernels.generated.ts (KERNELS), and a
// launch names its arguments: `cx.launch(KERNELS.elementwise.add_f32, grid, 256, { a, b, out, n })`.
// The argument object's type comes from the table, so a missing, extra or misspelt argument does not
// compile; the encoder writes the values in the declared order, each as its declared kind, and
// rejects a value that kind cannot hold (scripts/nvrtc-check.py checks the table against the PTX).

/** How a parameter is passed: an 8-byte slot holding a u64 (pointers, 64-bit integers), i32, u32, f32 or f64. */
export type ArgKind = "u64" | "i32" | "u32" | "f32" | "f64";

/** One kernel's row of KERNELS. */
export interface KernelSignature {
  readonly module: string;
  readonly name: string;
  /** __launch_bounds__'s thread count (a launch's block may not exceed it), or null. */
  readonly maxThreads: number | null;
  readonly params: readonly (readonly [string, ArgKind])[];
}

/** The named arguments of a kernel: one number per parameter (a device address for a pointer). */
export type KernelArgs<S extends KernelSignature> = { readonly [P in S["params"][number] as P[0]]: number };

/** Slots cuLaunchKernel reads: one 8-byte little-endian slot per parameter. */
const MAX_PARAMS = 64;
const U32_SPAN = 4294967296;

/** Writes kernel arguments into one reused buffer (launches are enqueued one at a time). */
export class ArgEncoder {
  private readonly buf = new ArrayBuffer(8 * MAX_PARAMS);
  private readonly view = new DataView(this.buf);

  /** The argument bytes of a launch of `sig` with `args`: valid until the next encode. */
  encode<S extends KernelSignature>(sig: S, args: KernelArgs<S>): Uint8Array {
    const params = sig.params;
    if (params.length > MAX_PARAMS)
      throw new Error(`${sig.module}.${sig.name}: more than ${MAX_PARAMS} parameters`);
    const values = args as Readonly<Record<string, number>>;
    // The types reject other names in an object literal; this catches them in any other object.
    if (Object.keys(values).length !== params.length) throw argNamesError(sig, values);
    for (let i = 0; i < params.length; i++) {
      const [name, kind] = params[i];
      const x = values[name];
      if (x === undefined) throw argNamesError(sig, values);
      const o = i * 8;
      this.view.setBigUint64(o, 0n, true);
      switch (kind) {
        case "u64":
          if (!(Number.isSafeInteger(x) && x >= 0)) throw badArg(sig, name, kind, x);
          this.view.setUint32(o, x % U32_SPAN, true);
          this.view.setUint32(o + 4, Math.floor(x / U32_SPAN), true);
          break;
        case "i32":
          if (!(Number.isInteger(x) && x >= -2147483648 && x <= 2147483647)) throw badArg(sig, name, kind, x);
          this.view.setInt32(o, x, true);
          break;
        case "u32":
          if (!(Number.isInteger(x) && x >= 0 && x < U32_SPAN)) throw badArg(sig, name, kind, x);
          this.view.setUint32(o, x, true);
          break;
        case "f32":
          if (typeof x !== "number") throw badArg(sig, name, kind, x);
          this.view.setFloat32(o, x, true);
          break;
        case "f64":
          if (typeof x !== "number") throw badArg(sig, name, kind, x);
          this.view.setFloat64(o, x, true);
          break;
      }
    }
    return new Uint8Array(this.buf, 0, params.length * 8);
  }
}

function argNamesError(sig: KernelSignature, args: Readonly<Record<string, number>>): Error {
  const names = sig.params.map(([n]) => n);
  const missing = names.filter((n) => !(n in args));
  const extra = Object.keys(args).filter((k) => !names.includes(k));
  const why = [
    missing.length ? `missing ${missing.join(", ")}` : "",
    extra.length ? `no parameter ${extra.join(", ")}` : "",
  ];
  return new Error(`${sig.module}.${sig.name}: ${why.filter((w) => w).join("; ")}`);
}

function badArg(sig: KernelSignature, name: string, kind: ArgKind, x: unknown): Error {
  const what =
    kind === "u64"
      ? "a non-negative integer below 2^53"
      : kind === "f32" || kind === "f64"
        ? "a number"
        : kind === "i32"
          ? "an i32"
          : "a u32";
  return new Error(`${sig.module}.${sig.name}: argument ${name} = ${String(x)} is not ${what}`);
}
