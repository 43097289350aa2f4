// The safetensors format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header
// length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian data.
// Files are written and read tensor by tensor through a file descriptor, so checkpoints larger than
// a JavaScript buffer (the `small` model's optimizer state is 3.7 GB) work; a truncated or corrupt
// file is a one-line error naming it.
import { createHash } from "node:crypto";
import { closeSync, fstatSync, fsyncSync, openSync, readSync, writeSync } from "node:fs";
import { UsageError } from "@moe8/fp8-core";

export type StDtype = "F32" | "BF16" | "I32";

export interface StTensor {
  dtype: StDtype;
  shape: number[];
  data: Float32Array | Uint16Array | Int32Array;
}

const DTYPE_BYTES: Record<StDtype, number> = { F32: 4, BF16: 2, I32: 4 };

function writeAll(fd: number, buf: Uint8Array): void {
  let off = 0;
  while (off < buf.length) off += writeSync(fd, buf, off, buf.length - off);
}

/** Writes a safetensors file (fsynced) and returns its sha256. */
export function writeSafetensors(
  path: string,
  tensors: Map<string, StTensor>,
  metadata: Record<string, string> = {},
): string {
  const names = [...tensors.keys()].sort();
  const header: Record<string, unknown> = { __metadata__: metadata };
  let offset = 0;
  for (const n of names) {
    const t = tensors.get(n)!;
    header[n] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.byteLength] };
    offset += t.data.byteLength;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - ((8 + json.length) % 8)) % 8); // keep the data 8-byte aligned
  const head = new TextEncoder().encode(json);
  const len = new Uint8Array(8);
  new DataView(len.buffer).setBigUint64(0, BigInt(head.length), true);
  const hash = createHash("sha256");
  const fd = openSync(path, "w");
  try {
    for (const part of [len, head, ...names.map((n) => tensors.get(n)!.data)]) {
      const bytes =
        part instanceof Uint8Array ? part : new Uint8Array(part.buffer, part.byteOffset, part.byteLength);
      writeAll(fd, bytes);
      hash.update(bytes);
    }
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  return hash.digest("hex");
}

/** sha256 of a file, read in chunks. */
export function sha256File(path: string): string {
  const hash = createHash("sha256");
  const fd = openSync(path, "r");
  try {
    const buf = new Uint8Array(1 << 24);
    for (;;) {
      const n = readSync(fd, buf, 0, buf.length, null);
      if (n <= 0) break;
      hash.update(buf.subarray(0, n));
    }
  } finally {
    closeSync(fd);
  }
  return hash.digest("hex");
}

function readExact(fd: number, length: number, position: number): Uint8Array {
  const buf = new Uint8Array(length);
  let off = 0;
  while (off < length) {
    const n = readSync(fd, buf, off, length - off, position + off);
    if (n <= 0) break;
    off += n;
  }
  return off === length ? buf : buf.subarray(0, off);
}

export function readSafetensors(path: string): {
  tensors: Map<string, StTensor>;
  metadata: Record<string, string>;
} {
  const fail = (why: string): never => {
    throw new UsageError(`${path}: ${why}`);
  };
  const fd = openSync(path, "r");
  try {
    const size = fstatSync(fd).size;
    if (size < 8) fail("truncated safetensors file (no header)");
    const n = Number(new DataView(readExact(fd, 8, 0).buffer).getBigUint64(0, true));
    if (n > size - 8) fail(`truncated safetensors file (header of ${n} bytes in a ${size}-byte file)`);
    let header: Record<string, { dtype: StDtype; shape: number[]; data_offsets: [number, number] }> = {};
    try {
      header = JSON.parse(new TextDecoder().decode(readExact(fd, n, 8)));
    } catch {
      fail("corrupt safetensors header (not JSON)");
    }
    const base = 8 + n;
    const tensors = new Map<string, StTensor>();
    let metadata: Record<string, string> = {};
    for (const [name, h] of Object.entries(header)) {
      if (name === "__metadata__") {
        metadata = h as unknown as Record<string, string>;
        continue;
      }
      const bytesPer = DTYPE_BYTES[h.dtype];
      if (!bytesPer) fail(`tensor ${name}: unsupported dtype ${h.dtype}`);
      const [s, e] = h.data_offsets;
      const count = h.shape.reduce((a, b) => a * b, 1);
      if (e - s !== count * bytesPer) fail(`tensor ${name}: ${e - s} bytes for shape [${h.shape}]`);
      if (base + e > size) fail(`truncated safetensors file (tensor ${name} ends past the end)`);
      const bytes = readExact(fd, e - s, base + s);
      const data =
        h.dtype === "F32"
          ? new Float32Array(bytes.buffer)
          : h.dtype === "BF16"
            ? new Uint16Array(bytes.buffer)
            : new Int32Array(bytes.buffer);
      tensors.set(name, { dtype: h.dtype, shape: h.shape, data });
    }
    return { tensors, metadata };
  } finally {
    closeSync(fd);
  }
}
