// The safetensors format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header
// length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian data.
// Files are written and read tensor by tensor through a file descriptor, so checkpoints larger than
// a JavaScript buffer (the `small` model's optimizer state is 3.7 GB) work. The whole header is
// validated before any tensor is read, with the rules of the format's reference implementation: at
// most 100 MB of JSON starting with "{", every entry a known dtype, a shape of non-negative integers
// and two integer offsets, the byte count matching dtype x shape, and the offsets, sorted, contiguous
// from 0 to exactly the end of the file (no overlap, no gap, no trailing bytes). Anything else is a
// one-line UsageError naming the file and the tensor.
import { createHash } from "node:crypto";
import { closeSync, fsyncSync, openSync } from "node:fs";
import { openRegularSync, readAtSync } from "@moe8/data";
import { UsageError } from "@moe8/fp8-core";
import { writeAllSync } from "./io.ts";

export type StDtype = "F32" | "BF16" | "I32";

export interface StTensor {
  dtype: StDtype;
  shape: number[];
  data: Float32Array | Uint16Array | Int32Array;
}

const DTYPE_BYTES: Record<StDtype, number> = { F32: 4, BF16: 2, I32: 4 };

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
      writeAllSync(fd, bytes);
      hash.update(bytes);
    }
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  return hash.digest("hex");
}

/** sha256 of a regular file, read in chunks. */
export function sha256File(path: string): string {
  const hash = createHash("sha256");
  const { fd, size } = openRegularSync(path, "checkpoint file");
  try {
    for (let pos = 0; pos < size; pos += 1 << 24)
      hash.update(readAtSync(fd, Math.min(1 << 24, size - pos), pos));
  } finally {
    closeSync(fd);
  }
  return hash.digest("hex");
}

/** The reference implementation's limit on the JSON header. */
const MAX_HEADER_BYTES = 100_000_000;

interface Entry {
  name: string;
  dtype: StDtype;
  shape: number[];
  start: number;
  end: number;
}

/** Checks the parsed header as a whole; returns the tensors in data order and the metadata. */
function validateHeader(
  header: unknown,
  dataBytes: number,
  fail: (why: string) => never,
): { entries: Entry[]; metadata: Record<string, string> } {
  if (typeof header !== "object" || header === null || Array.isArray(header))
    fail("corrupt safetensors header (not a JSON object)");
  const entries: Entry[] = [];
  let metadata: Record<string, string> = {};
  for (const [name, h] of Object.entries(header as Record<string, unknown>)) {
    const shown = JSON.stringify(name.length > 80 ? `${name.slice(0, 80)}...` : name);
    if (name === "__metadata__") {
      if (typeof h !== "object" || h === null || Array.isArray(h))
        fail("corrupt safetensors header (__metadata__ is not an object)");
      if (!Object.values(h).every((v) => typeof v === "string"))
        fail("corrupt safetensors header (__metadata__ values must be strings)");
      metadata = h as Record<string, string>;
      continue;
    }
    if (typeof h !== "object" || h === null) fail(`tensor ${shown}: entry is not an object`);
    const { dtype, shape, data_offsets: offsets } = h as Record<string, unknown>;
    if (typeof dtype !== "string" || !Object.hasOwn(DTYPE_BYTES, dtype))
      fail(`tensor ${shown}: unsupported dtype ${JSON.stringify(dtype)?.slice(0, 20)} (F32, BF16 or I32)`);
    const isIndex = (v: unknown): v is number => Number.isSafeInteger(v) && (v as number) >= 0;
    if (!Array.isArray(shape) || !shape.every(isIndex))
      fail(`tensor ${shown}: shape must be a list of non-negative integers`);
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isIndex))
      fail(`tensor ${shown}: data_offsets must be two non-negative integers`);
    const [start, end] = offsets as [number, number];
    let count = 1;
    for (const d of shape as number[]) {
      count *= d;
      if (!Number.isSafeInteger(count)) fail(`tensor ${shown}: shape [${shape}] is too large`);
    }
    const bytes = count * DTYPE_BYTES[dtype as StDtype];
    if (end < start || end - start !== bytes)
      fail(
        `tensor ${shown}: data_offsets [${start}, ${end}] hold ${end - start} bytes, shape [${shape}] of ${dtype} needs ${bytes}`,
      );
    entries.push({ name, dtype: dtype as StDtype, shape: shape as number[], start, end });
  }
  entries.sort((a, b) => a.start - b.start || a.end - b.end);
  let at = 0;
  for (const e of entries) {
    if (e.start !== at)
      fail(
        `tensor ${JSON.stringify(e.name.slice(0, 80))}: data_offsets start at ${e.start}, expected ${at} (${e.start < at ? "overlapping" : "a gap before"} another tensor)`,
      );
    at = e.end;
  }
  if (at !== dataBytes)
    fail(
      `the tensors cover ${at} bytes of data but the file holds ${dataBytes} (${at < dataBytes ? "trailing bytes" : "truncated"})`,
    );
  return { entries, metadata };
}

export function readSafetensors(path: string): {
  tensors: Map<string, StTensor>;
  metadata: Record<string, string>;
} {
  const fail = (why: string): never => {
    throw new UsageError(`${path}: ${why}`);
  };
  const { fd, size } = openRegularSync(path, "safetensors file");
  try {
    if (size < 8) fail("truncated safetensors file (no header)");
    const n = Number(new DataView(readAtSync(fd, 8, 0).buffer).getBigUint64(0, true));
    if (n > MAX_HEADER_BYTES) fail(`safetensors header of ${n} bytes is larger than the 100 MB allowed`);
    if (n > size - 8) fail(`truncated safetensors file (header of ${n} bytes in a ${size}-byte file)`);
    let header: unknown;
    try {
      const text = new TextDecoder("utf-8", { fatal: true }).decode(readAtSync(fd, n, 8));
      if (!text.startsWith("{")) throw new Error("not an object");
      header = JSON.parse(text);
    } catch {
      fail("corrupt safetensors header (not a JSON object)");
    }
    const base = 8 + n;
    const { entries, metadata } = validateHeader(header, size - base, fail);
    const tensors = new Map<string, StTensor>();
    for (const { name, dtype, shape, start, end } of entries) {
      const bytes = readAtSync(fd, end - start, base + start);
      if (bytes.length !== end - start) fail(`truncated safetensors file (tensor ${name} ends past the end)`);
      const data =
        dtype === "F32"
          ? new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4)
          : dtype === "BF16"
            ? new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.length / 2)
            : new Int32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
      tensors.set(name, { dtype, shape, data });
    }
    return { tensors, metadata };
  } finally {
    closeSync(fd);
  }
}
