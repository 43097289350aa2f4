// Small filesystem helpers shared by the writer, the manifest, prepareData and the trainer: every read
// of a user-supplied path goes through a check that it is a regular file (a FIFO would block forever,
// /dev/zero never ends) and reads at most the size fstat reported; every failed write or read of a
// path is a UsageError naming the path and the reason in words (a full disk is the user's to fix).
import { createHash } from "node:crypto";
import { closeSync, constants, fstatSync, openSync, readSync, type Stats } from "node:fs";
import { open, rename, rm, stat, writeFile } from "node:fs/promises";
import { UsageError } from "@moe8/fp8-core";
import { reason } from "./errors.ts";

const ERRNO_WORDS: Record<string, string> = {
  ENOSPC: "no space left on device",
  EDQUOT: "disk quota exceeded",
  EFBIG: "file too large for the file system",
  EROFS: "read-only file system",
  EACCES: "permission denied",
  EPERM: "operation not permitted",
  ENOTDIR: "a component of the path is not a folder",
  EISDIR: "is a folder",
  ENOENT: "no such file or folder",
  EEXIST: "already exists",
  ENAMETOOLONG: "name too long",
  ELOOP: "too many levels of symbolic links",
  EIO: "input/output error",
  EMFILE: "too many open files",
  ENXIO: "no such device",
};

/** The errno code of a failed system call (ENOSPC, EACCES...), or undefined for any other error. */
export function errnoCode(err: unknown): string | undefined {
  const code = (err as NodeJS.ErrnoException | null)?.code;
  return typeof code === "string" && /^E[A-Z0-9]+$/.test(code) ? code : undefined;
}

/** "no space left on device (ENOSPC)" for a failed system call; the message of anything else. */
export function ioReason(err: unknown): string {
  const code = errnoCode(err);
  if (code) return `${ERRNO_WORDS[code] ?? "system error"} (${code})`;
  return reason(err);
}

/**
 * A failed system call on `path` while `doing` something, as the UsageError users see ("cannot write
 * runs/x/metrics.jsonl: no space left on device (ENOSPC)"); any other error is returned unchanged.
 */
export function ioError(err: unknown, path: string, doing: string): unknown {
  if (err instanceof UsageError || !errnoCode(err)) return err;
  return new UsageError(`cannot ${doing} ${path}: ${ioReason(err)}`);
}

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
    throw ioError(err, path, "write");
  }
}

/** stat() that turns "no such file" into a UsageError naming what was expected there. */
export async function statOrThrow(path: string, what: string) {
  try {
    return await stat(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT") throw new UsageError(`${path}: ${what} not found`);
    throw new UsageError(`${path}: cannot read ${what} (${ioReason(err)})`);
  }
}

function kindOf(st: Stats): string {
  if (st.isDirectory()) return "a folder";
  if (st.isFIFO()) return "a FIFO (named pipe)";
  if (st.isCharacterDevice() || st.isBlockDevice()) return "a device";
  if (st.isSocket()) return "a socket";
  return "not a regular file";
}

/** Refuses anything but a regular file no larger than maxBytes (a size limit for the what). */
export function checkRegular(st: Stats, path: string, what: string, maxBytes = Number.POSITIVE_INFINITY) {
  if (!st.isFile()) throw new UsageError(`${path}: ${what} must be a regular file, this is ${kindOf(st)}`);
  if (st.size > maxBytes)
    throw new UsageError(`${path}: ${what} of ${st.size} bytes is larger than the ${maxBytes} bytes allowed`);
}

/** statOrThrow for something that must be a regular file (of at most maxBytes). */
export async function statRegularFile(path: string, what: string, maxBytes?: number): Promise<Stats> {
  const st = await statOrThrow(path, what);
  checkRegular(st, path, what, maxBytes);
  return st;
}

/**
 * Opens a regular file for reading: O_NONBLOCK so that a FIFO put there after any earlier stat cannot
 * block the open, then fstat on the descriptor itself decides. Returns the descriptor and its size.
 */
export function openRegularSync(path: string, what: string, maxBytes?: number): { fd: number; size: number } {
  let fd: number;
  try {
    fd = openSync(path, constants.O_RDONLY | (constants.O_NONBLOCK ?? 0));
  } catch (err) {
    const code = errnoCode(err);
    if (code === "ENOENT") throw new UsageError(`${path}: ${what} not found`);
    throw new UsageError(`${path}: cannot read ${what} (${ioReason(err)})`);
  }
  try {
    const st = fstatSync(fd);
    checkRegular(st, path, what, maxBytes);
    return { fd, size: st.size };
  } catch (err) {
    closeSync(fd);
    throw err;
  }
}

/** Reads up to `length` bytes at `position`; fewer only where the file ends first. */
export function readAtSync(fd: number, length: number, position: number): Uint8Array {
  const buf = new Uint8Array(length);
  let off = 0;
  while (off < length) {
    const n = readSync(fd, buf, off, length - off, position + off);
    if (n <= 0) break;
    off += n;
  }
  return off === length ? buf : buf.subarray(0, off);
}

/** The whole of a regular file of at most maxBytes: never more than the size fstat gave. */
export function readRegularFileSync(path: string, what: string, maxBytes: number): Buffer {
  const { fd, size } = openRegularSync(path, what, maxBytes);
  try {
    return Buffer.from(readAtSync(fd, size, 0));
  } catch (err) {
    throw ioError(err, path, "read");
  } finally {
    closeSync(fd);
  }
}

/** The async form of readRegularFileSync (for the data package's async readers). */
export async function readRegularFile(path: string, what: string, maxBytes: number): Promise<Buffer> {
  let fh: import("node:fs/promises").FileHandle;
  try {
    fh = await open(path, constants.O_RDONLY | (constants.O_NONBLOCK ?? 0));
  } catch (err) {
    const code = errnoCode(err);
    if (code === "ENOENT") throw new UsageError(`${path}: ${what} not found`);
    throw new UsageError(`${path}: cannot read ${what} (${ioReason(err)})`);
  }
  try {
    const st = await fh.stat();
    checkRegular(st, path, what, maxBytes);
    const buf = Buffer.alloc(st.size);
    let off = 0;
    while (off < st.size) {
      const { bytesRead } = await fh.read(buf, off, st.size - off, off);
      if (bytesRead <= 0) break;
      off += bytesRead;
    }
    return buf.subarray(0, off);
  } catch (err) {
    throw ioError(err, path, "read");
  } finally {
    await fh.close();
  }
}

/** sha256 (hex) of a regular file, read 1 MiB at a time. */
export async function sha256OfFile(path: string, what: string): Promise<string> {
  const fh = await open(path, constants.O_RDONLY | (constants.O_NONBLOCK ?? 0)).catch((err) => {
    throw new UsageError(`${path}: cannot read ${what} (${ioReason(err)})`);
  });
  try {
    checkRegular(await fh.stat(), path, what);
    const hash = createHash("sha256");
    const buf = Buffer.allocUnsafe(1 << 20);
    for (;;) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, null);
      if (bytesRead <= 0) break;
      hash.update(buf.subarray(0, bytesRead));
    }
    return hash.digest("hex");
  } catch (err) {
    throw ioError(err, path, "read");
  } finally {
    await fh.close();
  }
}
