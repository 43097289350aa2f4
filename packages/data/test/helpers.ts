// Shared test helpers: temporary folders and small synthetic datasets.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { UsageError } from "@moe8/fp8-core";
import { afterAll } from "vitest";

/** A fresh temporary folder, removed when the test file finishes. */
export function tempDir(prefix = "moe8-data-"): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Document i has length 1 + (i * 37) % maxLen and tokens (i * 7 + j) % vocab: easy to check anywhere. */
export function syntheticDocs(count: number, maxLen = 200, vocab = 256): Int32Array[] {
  return Array.from({ length: count }, (_, i) =>
    Int32Array.from({ length: 1 + ((i * 37) % maxLen) }, (_, j) => (i * 7 + j) % vocab),
  );
}

export async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}

/** Runs fn and returns the UsageError it throws (failing the test if it throws nothing or another kind). */
export async function usageError(fn: () => unknown): Promise<Error> {
  try {
    await fn();
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    return err;
  }
  throw new Error("expected a UsageError, nothing was thrown");
}
