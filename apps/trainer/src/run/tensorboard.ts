// TensorBoard event files: the scalars of metrics.jsonl, one Event per step, so `tensorboard
// --logdir runs/` shows every run's curves. An event file is a sequence of TFRecords (a little-endian
// u64 length, the masked CRC32C of those 8 bytes, the data, the masked CRC32C of the data), each
// holding an `Event` message (tensorflow/core/util/event.proto); the first says the file's version.
// Records are appended with one write each and never rewritten, so a crash loses at most the record
// being written (TensorBoard stops at a torn one). Every process starts a new file, named to sort
// after the earlier ones, with a SessionLog START at its first step: TensorBoard reads the files in
// order and, at a START, drops what earlier files logged from that step on (the steps an interrupted
// run did past its last checkpoint, which the resumed run does again), as metrics.jsonl is cut back.
import { closeSync, mkdirSync, openSync, readdirSync, statSync } from "node:fs";
import { hostname } from "node:os";
import { join } from "node:path";
import { crc32c } from "@aws-crypto/crc32c";
import { create, createFileRegistry, type DescMessage, toBinary } from "@bufbuild/protobuf";
import {
  FileDescriptorProtoSchema,
  FieldDescriptorProto_Label as Label,
  FieldDescriptorProto_Type as Type,
} from "@bufbuild/protobuf/wkt";
import { clip, ioError, ioReason } from "@moe8/data";
import { UsageError } from "@moe8/fp8-core";
import { writeAllSync } from "./io.ts";
import type { StepMetrics } from "./metrics.ts";

/** The metrics.jsonl fields written as scalars, under the same names. */
export const SCALARS = [
  "loss",
  "mtp_loss",
  "val_loss",
  "lr",
  "grad_norm",
  "tokens_per_s",
  "load_max_over_mean",
  "load_idle_experts",
] as const;

// The part of TensorBoard's event.proto and summary.proto that scalars use, with their field numbers:
//   message Event { double wall_time = 1; int64 step = 2;
//                   oneof what { string file_version = 3; Summary summary = 5; SessionLog session_log = 7; } }
//   message SessionLog { enum SessionStatus { STATUS_UNSPECIFIED = 0; START = 1; } SessionStatus status = 1; }
//   message Summary { message Value { string tag = 1; oneof value { float simple_value = 2; } }
//                     repeated Value value = 1; }
const field = (name: string, number: number, type: Type, more: object = {}) => ({
  name,
  number,
  type,
  label: Label.OPTIONAL,
  ...more,
});
const registry = createFileRegistry(
  create(FileDescriptorProtoSchema, {
    name: "moe8/tensorboard_event.proto",
    package: "tensorboard",
    syntax: "proto3",
    messageType: [
      {
        name: "Event",
        field: [
          field("wall_time", 1, Type.DOUBLE),
          field("step", 2, Type.INT64),
          field("file_version", 3, Type.STRING, { oneofIndex: 0 }),
          field("summary", 5, Type.MESSAGE, { typeName: ".tensorboard.Summary", oneofIndex: 0 }),
          field("session_log", 7, Type.MESSAGE, { typeName: ".tensorboard.SessionLog", oneofIndex: 0 }),
        ],
        oneofDecl: [{ name: "what" }],
      },
      {
        name: "SessionLog",
        field: [field("status", 1, Type.ENUM, { typeName: ".tensorboard.SessionLog.SessionStatus" })],
        enumType: [
          {
            name: "SessionStatus",
            value: [
              { name: "STATUS_UNSPECIFIED", number: 0 },
              { name: "START", number: 1 },
            ],
          },
        ],
      },
      {
        name: "Summary",
        field: [
          field("value", 1, Type.MESSAGE, { typeName: ".tensorboard.Summary.Value", label: Label.REPEATED }),
        ],
        nestedType: [
          {
            name: "Value",
            field: [field("tag", 1, Type.STRING), field("simple_value", 2, Type.FLOAT, { oneofIndex: 0 })],
            oneofDecl: [{ name: "value" }],
          },
        ],
      },
    ],
  }),
  () => undefined,
);
export const EVENT: DescMessage = registry.getMessage("tensorboard.Event")!;
const SESSION_START = 1;

/** CRC32C rotated and offset, as TFRecord stores it (so that a CRC of CRCs is not trivially 0). */
function maskedCrc(data: Uint8Array): number {
  const crc = crc32c(data) >>> 0;
  return (((crc >>> 15) | (crc << 17)) + 0xa282ead8) >>> 0;
}

/** One TFRecord: length, its CRC, the data, the data's CRC. */
export function tfRecord(data: Uint8Array): Uint8Array {
  const out = new Uint8Array(16 + data.length);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, BigInt(data.length), true);
  view.setUint32(8, maskedCrc(out.subarray(0, 8)), true);
  out.set(data, 12);
  view.setUint32(12 + data.length, maskedCrc(data), true);
  return out;
}

/** `events.out.tfevents.<seconds>.<host>.<pid>`, TensorBoard's naming; the seconds sort after every earlier file. */
function eventFileName(dir: string): string {
  let seconds = Math.floor(Date.now() / 1000);
  for (const n of readdirSync(dir)) {
    const m = /^events\.out\.tfevents\.(\d+)\./.exec(n);
    if (m) seconds = Math.max(seconds, Number(m[1]) + 1);
  }
  return `events.out.tfevents.${seconds}.${hostname().replace(/[^\w.-]/g, "_")}.${process.pid}`;
}

/** Refuses, before a run writes anything, a TensorBoard folder that is a file. */
export function checkTensorBoardDir(dir: string): void {
  let st: ReturnType<typeof statSync>;
  try {
    st = statSync(dir, { throwIfNoEntry: false });
  } catch (err) {
    throw new UsageError(`--tensorboard ${clip(dir, 200)}: ${ioReason(err)}`);
  }
  if (st && !st.isDirectory())
    throw new UsageError(`--tensorboard ${clip(dir, 200)}: exists and is not a folder`);
}

export class TensorBoardWriter {
  private constructor(
    readonly path: string,
    private readonly fd: number,
  ) {}

  /**
   * Creates the folder if needed and a new event file in it: its version record, then a START at
   * `firstStep`, the first step this process logs.
   */
  static open(dir: string, firstStep: number): TensorBoardWriter {
    checkTensorBoardDir(dir);
    let path = dir;
    let fd: number;
    try {
      mkdirSync(dir, { recursive: true });
      path = join(dir, eventFileName(dir));
      fd = openSync(path, "wx");
    } catch (err) {
      throw new UsageError(`--tensorboard ${clip(path, 200)}: cannot create it: ${ioReason(err)}`);
    }
    const w = new TensorBoardWriter(path, fd);
    const wallTime = Date.now() / 1000;
    w.write({ wallTime, step: 0n, what: { case: "fileVersion", value: "brain.Event:2" } });
    w.write({
      wallTime,
      step: BigInt(firstStep),
      what: { case: "sessionLog", value: { status: SESSION_START } },
    });
    return w;
  }

  /** One Event with a step's scalars (those of SCALARS it has), in one write. */
  append(m: StepMetrics): void {
    const value = SCALARS.filter((k) => typeof m[k] === "number").map((tag) => ({
      tag,
      value: { case: "simpleValue", value: m[tag] as number },
    }));
    this.write({
      wallTime: Date.now() / 1000,
      step: BigInt(m.step),
      what: { case: "summary", value: { value } },
    });
  }

  private write(event: Record<string, unknown>): void {
    try {
      writeAllSync(this.fd, tfRecord(toBinary(EVENT, create(EVENT, event))));
    } catch (err) {
      throw ioError(err, this.path, "write");
    }
  }

  close(): void {
    closeSync(this.fd);
  }
}
