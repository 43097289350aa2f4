// Every byte the trainer writes goes through writeAllSync: a failed write (a full disk, a quota, a
// read-only mount) becomes a UsageError naming the file, and durable files are written to a
// temporary name that is removed on any error, so a failure leaves nothing half-written behind.
//
// MOE8_FAULT_ENOSPC_AFTER=N (tests only, docs/environment.md): this process may write N bytes in all;
// the write that crosses the limit writes what still fits and then fails with the kernel's own ENOSPC
// (a write to /dev/full where it exists), as a disk that fills up mid-file does.
import { closeSync, existsSync, fsyncSync, openSync, renameSync, rmSync, writeSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { ioError } from "@moe8/data";

const faultLimit = (() => {
  const v = process.env.MOE8_FAULT_ENOSPC_AFTER;
  return v !== undefined && /^\d+$/.test(v) ? Number(v) : Number.POSITIVE_INFINITY;
})();
let written = 0;

function failNoSpace(): never {
  if (existsSync("/dev/full")) {
    const fd = openSync("/dev/full", "w");
    try {
      writeSync(fd, Buffer.from([0]));
    } finally {
      closeSync(fd);
    }
  }
  throw Object.assign(new Error("ENOSPC: no space left on device, write"), {
    code: "ENOSPC",
    errno: -28,
    syscall: "write",
  });
}

/** Writes all of buf at the file's current position (fault injection counts every byte). */
export function writeAllSync(fd: number, buf: Uint8Array): void {
  let data = buf;
  const room = faultLimit - written;
  if (data.length > room) data = data.subarray(0, Math.max(0, room));
  let off = 0;
  while (off < data.length) off += writeSync(fd, data, off, data.length - off);
  written += off;
  if (data.length < buf.length) failNoSpace();
}

export function fsyncDir(dir: string): void {
  const fd = openSync(dir, "r");
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/**
 * Writes `path` whole or not at all: into a temporary sibling, fsynced, renamed over `path`. On any
 * error the temporary is removed and a UsageError names `path` (not the temporary).
 */
export function writeFileDurable(path: string, data: Uint8Array | string, o = { fsync: true }): void {
  const tmp = join(dirname(path), `.${basename(path)}.tmp-${process.pid}`);
  try {
    const fd = openSync(tmp, "w");
    try {
      writeAllSync(fd, typeof data === "string" ? Buffer.from(data) : data);
      if (o.fsync) fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, path);
  } catch (err) {
    rmSync(tmp, { force: true });
    throw ioError(err, path, "write");
  }
}

/** Appends text to `path` (a short write leaves a torn last line, which readers drop). */
export function appendText(path: string, text: string): void {
  try {
    const fd = openSync(path, "a");
    try {
      writeAllSync(fd, Buffer.from(text));
    } finally {
      closeSync(fd);
    }
  } catch (err) {
    throw ioError(err, path, "write");
  }
}
