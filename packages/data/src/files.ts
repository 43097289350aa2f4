// Small filesystem helpers shared by the writer, the manifest and prepareData.
import { open, rename, rm, stat, writeFile } from "node:fs/promises";
import { UsageError } from "@moe8/fp8-core";
import { reason } from "./errors.ts";

/** Writes through a temporary file, fsyncs and renames, so readers never see half a file. */
export async function writeFileAtomic(path: string, data: string | Uint8Array): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}`;
  try {
    await writeFile(tmp, data);
    const fh = await open(tmp, "r+");
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, path);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
}

/** stat() that turns "no such file" into a UsageError naming what was expected there. */
export async function statOrThrow(path: string, what: string) {
  try {
    return await stat(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") throw new UsageError(`${path}: ${what} not found`);
    throw new UsageError(`${path}: cannot read ${what} (${reason(err)})`);
  }
}
