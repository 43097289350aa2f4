// A framing-level walk over an Arrow IPC stream (continuation marker, metadata length, flatbuffer
// Message, body). It finds the byte range of every record batch, so the loader can later read any one
// batch directly (random access into a stream file) instead of re-reading the shard from the start.
import type { Hash } from "node:crypto";
import { constants } from "node:fs";
import { open } from "node:fs/promises";
import { UsageError } from "@moe8/fp8-core";
import { Message, MessageHeader, RecordBatch, RecordBatchReader } from "apache-arrow";
import { reason } from "./errors.ts";
import { checkRegular } from "./files.ts";

export interface StreamMessage {
  header: MessageHeader;
  message: Message;
  /** Byte offset of the message (its continuation marker) in the file. */
  offset: number;
  /** The whole encapsulated message: prefix, metadata and body. */
  bytes: Uint8Array;
}

const CONTINUATION = -1;
export const END_OF_STREAM = Uint8Array.of(0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0);
/** Writers close a stream with this marker; a file without it was cut short (or never closed). */
export const NO_END = "no end-of-stream marker: the file was cut short or its writer never closed it";
const READ_CHUNK = 1 << 20;
/** Non-blocking open: a FIFO where a shard should be must not block (the stat of the fd refuses it). */
const READ_FLAGS = constants.O_RDONLY | (constants.O_NONBLOCK ?? 0);

/** Walks the messages in order; `hash`, when given, is fed every byte of the file. */
export async function* scanStream(path: string, hash?: Hash): AsyncGenerator<StreamMessage> {
  const fh = await open(path, READ_FLAGS);
  try {
    const st = await fh.stat();
    checkRegular(st, path, "Arrow shard");
    const size = st.size;
    let pos = 0;
    const fail = (what: string) => new UsageError(`${path}: truncated or corrupt Arrow IPC stream (${what})`);
    const read = async (n: number, what: string): Promise<Buffer> => {
      if (pos + n > size) throw fail(`${what} at byte ${pos} needs ${n} bytes but the file ends at ${size}`);
      const buf = Buffer.allocUnsafe(n);
      const { bytesRead } = await fh.read(buf, 0, n, pos);
      if (bytesRead !== n) throw fail(`short read at byte ${pos}`);
      hash?.update(buf);
      pos += n;
      return buf;
    };
    if (size >= 6 && (await fh.read(Buffer.alloc(6), 0, 6, 0)).buffer.toString("latin1") === "ARROW1") {
      throw new UsageError(`${path}: an Arrow IPC file (random-access format); expected the stream format`);
    }
    let first = true;
    let ended = false;
    while (pos < size) {
      const offset = pos;
      let head = await read(4, "message length");
      let metaLength = head.readInt32LE(0);
      if (metaLength === CONTINUATION) {
        head = Buffer.concat([head, await read(4, "message length")]);
        metaLength = head.readInt32LE(4);
      }
      if (metaLength === 0) {
        ended = true; // end-of-stream marker
        break;
      }
      if (metaLength < 0) throw fail(`negative metadata length at byte ${offset}`);
      const meta = await read(metaLength, "message metadata");
      let message: Message;
      try {
        message = Message.decode(meta);
      } catch (err) {
        throw fail(`undecodable message at byte ${offset}: ${reason(err)}`);
      }
      const bodyLength = message.bodyLength;
      if (!Number.isSafeInteger(bodyLength) || bodyLength < 0)
        throw fail(`bad body length at byte ${offset}`);
      if (first && message.headerType !== MessageHeader.Schema) {
        throw fail(`the first message is not a schema`);
      }
      first = false;
      const body = await read(bodyLength, "message body");
      yield { header: message.headerType, message, offset, bytes: Buffer.concat([head, meta, body]) };
    }
    if (first) throw fail("no schema message");
    if (!ended) throw fail(NO_END);
    // Bytes after the end-of-stream marker are not data, but they are part of the file's checksum.
    while (hash && pos < size) await read(Math.min(READ_CHUNK, size - pos), "trailing bytes");
  } finally {
    await fh.close();
  }
}

/** Reads one encapsulated message back by the offset and length found by scanStream. */
export async function readMessageAt(path: string, offset: number, length: number): Promise<Uint8Array> {
  const fh = await open(path, READ_FLAGS);
  try {
    const buf = Buffer.allocUnsafe(length);
    const { bytesRead } = await fh.read(buf, 0, length, offset);
    if (bytesRead !== length) {
      throw new UsageError(
        `${path}: truncated Arrow IPC stream (record batch at byte ${offset} is cut short)`,
      );
    }
    return buf;
  } finally {
    await fh.close();
  }
}

/** Decodes a record batch message with the stream's schema message in front of it. */
export function decodeBatch(path: string, schemaBytes: Uint8Array, batchBytes: Uint8Array): RecordBatch {
  try {
    const reader = RecordBatchReader.from(Buffer.concat([schemaBytes, batchBytes]));
    const next = reader.open().next();
    if (next.done || !(next.value instanceof RecordBatch)) throw new Error("no record batch decoded");
    return next.value;
  } catch (err) {
    if (err instanceof UsageError) throw err;
    throw new UsageError(`${path}: truncated or corrupt Arrow IPC stream (${reason(err)})`);
  }
}
