// Typed kernel arguments. Every kernel's parameters are declared once, in its .cu file;
// scripts/kernel-signatures.ts copies them into ../cuda/kernels.generated.ts (KERNELS), and a
// launch names its arguments: `cx.launch(KERNELS.elementwise.add_f32, grid, 256, { a, b, out, n })`.
// The argument object's type comes from the table, so a missing, extra or misspelt argument does not
// compile; the encoder writes the values in the declared order, each as its declared kind, and
// rejects a value that kind cannot hold (scripts/nvrtc-check.py checks the table against the PTX).

/**
 * How a parameter is passed: an 8-byte slot holding a u64 (pointers, 64-bit integers), i32, u32, f32
 * or f64; or `tmap`, the 128 bytes of a TMA tensor map (64-byte aligned) passed by value.
 */
export type ArgKind = "u64" | "i32" | "u32" | "f32" | "f64" | "tmap";

/** A TMA tensor map's 128 bytes, from the addon's cudaTensorMap2D. */
export type TensorMapBytes = Uint8Array;
const TMAP_BYTES = 128;
const TMAP_ALIGN = 64;

/** One kernel's row of KERNELS. */
export interface KernelSignature {
  readonly module: string;
  readonly name: string;
  /** __launch_bounds__'s thread count (a launch's block may not exceed it), or null. */
  readonly maxThreads: number | null;
  readonly params: readonly (readonly [string, ArgKind])[];
}

/**
 * The named arguments of a kernel: one number per scalar parameter (a device address for a
 * pointer), the tensor map's bytes for a `tmap` one.
 */
export type KernelArgs<S extends KernelSignature> = {
  readonly [P in S["params"][number] as P[0]]: P[1] extends "tmap" ? TensorMapBytes : number;
};

/** A launch's parameter bytes; `offsets` (null for 8-byte slots throughout) says where each starts. */
export interface EncodedArgs {
  bytes: Uint8Array;
  offsets: number[] | null;
}

/** Slots cuLaunchKernel reads: one 8-byte little-endian slot per parameter, tensor maps 128 bytes. */
const MAX_PARAMS = 64;
const U32_SPAN = 4294967296;

/** Writes kernel arguments into one reused buffer (launches are enqueued one at a time). */
export class ArgEncoder {
  private readonly buf = new ArrayBuffer(8 * MAX_PARAMS + 4 * (TMAP_BYTES + TMAP_ALIGN));
  private readonly view = new DataView(this.buf);
  private readonly u8 = new Uint8Array(this.buf);

  /**
   * The argument bytes of a launch of `sig` with `args`, valid until the next encode: one 8-byte slot
   * per parameter when all are scalars (offsets null), else each parameter at its own aligned offset.
   */
  encode<S extends KernelSignature>(sig: S, args: KernelArgs<S>): EncodedArgs {
    const params = sig.params;
    if (params.length > MAX_PARAMS)
      throw new Error(`${sig.module}.${sig.name}: more than ${MAX_PARAMS} parameters`);
    const values = args as Readonly<Record<string, number | TensorMapBytes>>;
    // The types reject other names in an object literal; this catches them in any other object.
    if (Object.keys(values).length !== params.length) throw argNamesError(sig, values);
    const maps = params.some(([, kind]) => kind === "tmap");
    const offsets: number[] = [];
    let o = 0;
    for (let i = 0; i < params.length; i++) {
      const [name, kind] = params[i];
      const v = values[name];
      if (v === undefined) throw argNamesError(sig, values);
      if (kind === "tmap") {
        if (!(v instanceof Uint8Array && v.byteLength === TMAP_BYTES)) throw badArg(sig, name, kind, v);
        o = Math.ceil(o / TMAP_ALIGN) * TMAP_ALIGN;
        if (o + TMAP_BYTES > this.buf.byteLength)
          throw new Error(`${sig.module}.${sig.name}: too many tensor maps`);
        this.u8.set(v, o);
        offsets.push(o);
        o += TMAP_BYTES;
        continue;
      }
      if (typeof v !== "number") throw badArg(sig, name, kind, v);
      const x = v;
      offsets.push(o);
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
      o += 8;
    }
    return { bytes: new Uint8Array(this.buf, 0, o), offsets: maps ? offsets : null };
  }
}

function argNamesError(sig: KernelSignature, args: Readonly<Record<string, unknown>>): Error {
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
    kind === "tmap"
      ? "a tensor map (128 bytes)"
      : kind === "u64"
        ? "a non-negative integer below 2^53"
        : kind === "f32" || kind === "f64"
          ? "a number"
          : kind === "i32"
            ? "an i32"
            : "a u32";
  const shown = x instanceof Uint8Array ? `${x.byteLength} bytes` : String(x);
  return new Error(`${sig.module}.${sig.name}: argument ${name} = ${shown} is not ${what}`);
}
