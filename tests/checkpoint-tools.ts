// Editing a checkpoint as an attacker or a diverged run would leave it: a file replaced and its
// checksum updated to match, so only the reader's own validation stands between it and a run.
import { createHash } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { readSafetensors, type StTensor, writeSafetensors } from "../apps/trainer/src/run/safetensors.ts";

function updateSum(dir: string, name: string, sha: string): void {
  const path = join(dir, "checksums.json");
  const sums = JSON.parse(readFileSync(path, "utf8"));
  sums[name] = sha;
  writeFileSync(path, JSON.stringify(sums));
}

/** Replaces a checkpoint file with these bytes and makes its checksum match. */
export function replaceFile(dir: string, name: string, bytes: Uint8Array | string): void {
  writeFileSync(join(dir, name), bytes);
  updateSum(dir, name, createHash("sha256").update(bytes).digest("hex"));
}

/** Rewrites a JSON file of the checkpoint through `edit` (checksum updated). */
export function editJson(dir: string, name: string, edit: (j: Record<string, unknown>) => void): void {
  const j = JSON.parse(readFileSync(join(dir, name), "utf8"));
  edit(j);
  replaceFile(dir, name, `${JSON.stringify(j, null, 2)}\n`);
}

/** Rewrites a safetensors file's tensors through `edit` (checksum updated). */
export function editTensors(dir: string, name: string, edit: (t: Map<string, StTensor>) => void): void {
  const path = join(dir, name);
  const { tensors, metadata } = readSafetensors(path);
  edit(tensors);
  updateSum(dir, name, writeSafetensors(path, tensors, metadata));
}

/** A safetensors file's parts: the parsed header and the data after it. */
export interface RawSafetensors {
  header: Record<string, unknown>;
  data: Uint8Array;
}

/** Rewrites a safetensors file at the byte level (header and data as given; checksum updated). */
export function editRaw(dir: string, name: string, edit: (raw: RawSafetensors) => string | undefined): void {
  const bytes = readFileSync(join(dir, name));
  const n = Number(bytes.readBigUInt64LE(0));
  const raw = { header: JSON.parse(bytes.subarray(8, 8 + n).toString("utf8")), data: bytes.subarray(8 + n) };
  const text = edit(raw) ?? JSON.stringify(raw.header);
  const head = Buffer.from(text);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(head.length));
  replaceFile(dir, name, Buffer.concat([len, head, raw.data]));
}
