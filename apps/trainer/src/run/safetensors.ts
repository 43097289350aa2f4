// The safetensors format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header
// length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian data.
// Written and read with explicit errors: a truncated or corrupt file names itself and the problem.
import { UsageError } from "../errors.ts";

export type StDtype = "F32" | "BF16" | "I32";

export interface StTensor {
  dtype: StDtype;
  shape: number[];
  data: Float32Array | Uint16Array | Int32Array;
}

const DTYPE_BYTES: Record<StDtype, number> = { F32: 4, BF16: 2, I32: 4 };

export function encodeSafetensors(
  tensors: Map<string, StTensor>,
  metadata: Record<string, string> = {},
): Uint8Array {
  const names = [...tensors.keys()].sort();
  const header: Record<string, unknown> = { __metadata__: metadata };
  let offset = 0;
  for (const n of names) {
    const t = tensors.get(n)!;
    const bytes = t.data.byteLength;
    header[n] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - ((8 + json.length) % 8)) % 8); // keep the data 8-byte aligned
  const head = new TextEncoder().encode(json);
  const out = new Uint8Array(8 + head.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(head.length), true);
  out.set(head, 8);
  let p = 8 + head.length;
  for (const n of names) {
    const d = tensors.get(n)!.data;
    out.set(new Uint8Array(d.buffer, d.byteOffset, d.byteLength), p);
    p += d.byteLength;
  }
  return out;
}

export function decodeSafetensors(
  buf: Uint8Array,
  file: string,
): { tensors: Map<string, StTensor>; metadata: Record<string, string> } {
  const fail = (why: string): never => {
    throw new UsageError(`${file}: ${why}`);
  };
  if (buf.length < 8) fail("truncated safetensors file (no header)");
  const n = Number(new DataView(buf.buffer, buf.byteOffset, buf.byteLength).getBigUint64(0, true));
  if (n > buf.length - 8)
    fail(`truncated safetensors file (header of ${n} bytes in a ${buf.length}-byte file)`);
  let header: Record<string, { dtype: StDtype; shape: number[]; data_offsets: [number, number] }>;
  try {
    header = JSON.parse(new TextDecoder().decode(buf.subarray(8, 8 + n)));
  } catch {
    return fail("corrupt safetensors header (not JSON)");
  }
  const base = 8 + n;
  const tensors = new Map<string, StTensor>();
  let metadata: Record<string, string> = {};
  for (const [name, h] of Object.entries(header)) {
    if (name === "__metadata__") {
      metadata = h as unknown as Record<string, string>;
      continue;
    }
    const size = DTYPE_BYTES[h.dtype];
    if (!size) fail(`tensor ${name}: unsupported dtype ${h.dtype}`);
    const [s, e] = h.data_offsets;
    const count = h.shape.reduce((a, b) => a * b, 1);
    if (e - s !== count * size) fail(`tensor ${name}: ${e - s} bytes for shape [${h.shape}]`);
    if (base + e > buf.length) fail(`truncated safetensors file (tensor ${name} ends past the end)`);
    // Copy into a fresh, aligned buffer (a Node Buffer's slice() would share the whole file's memory).
    const bytes = new Uint8Array(e - s);
    bytes.set(buf.subarray(base + s, base + e));
    const data =
      h.dtype === "F32"
        ? new Float32Array(bytes.buffer)
        : h.dtype === "BF16"
          ? new Uint16Array(bytes.buffer)
          : new Int32Array(bytes.buffer);
    tensors.set(name, { dtype: h.dtype, shape: h.shape, data });
  }
  return { tensors, metadata };
}
