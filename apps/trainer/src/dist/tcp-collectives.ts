// Collectives between processes on one machine over TCP (issue 22): the host-side exchange that
// data-parallel ranks without NCCL use (the cpu backend), and the channel a launcher's ranks meet
// on. Rank 0 is the hub: every rank sends it its values for the k-th collective call, and once all
// have arrived it sends every rank all of them; each rank then reduces as collectivesOver does (rank
// order), so all ranks get the same bits, the same as the in-process double (localGroup).
//
// A frame is [u32 header bytes][u32 payload bytes][header JSON][payload]: the header names the call
// and each part's dtype and length, the payload holds the parts' bytes back to back. A rank that
// disconnects fails every pending and later call of the others with an error naming it.
import { connect, createServer, type Server, type Socket } from "node:net";
import { type Collectives, type CollectiveValues, collectivesOver } from "@moe8/tensor";

interface Header {
  /** hello: a rank introducing itself; values: its parts for call k; all: every rank's for call k. */
  kind: "hello" | "values" | "all";
  rank: number;
  k: number;
  /** Per part: "f32" | "i32" and element count; for "all", per rank. */
  parts: [string, number][][];
}

interface Frame {
  header: Header;
  values: CollectiveValues[][];
}

function encode(header: Omit<Header, "parts">, values: CollectiveValues[][]): Buffer {
  const parts = values.map((r) =>
    r.map((v): [string, number] => [v instanceof Int32Array ? "i32" : "f32", v.length]),
  );
  const head = Buffer.from(JSON.stringify({ ...header, parts }));
  const bytes = values.flat().reduce((n, v) => n + v.byteLength, 0);
  const out = Buffer.alloc(8 + head.length + bytes);
  out.writeUInt32LE(head.length, 0);
  out.writeUInt32LE(bytes, 4);
  head.copy(out, 8);
  let at = 8 + head.length;
  for (const v of values.flat()) {
    Buffer.from(v.buffer, v.byteOffset, v.byteLength).copy(out, at);
    at += v.byteLength;
  }
  return out;
}

function decode(head: Buffer, payload: Buffer): Frame {
  const header = JSON.parse(head.toString("utf8")) as Header;
  let at = 0;
  const values = header.parts.map((r) =>
    r.map(([dtype, n]) => {
      const bytes = payload.subarray(at, at + 4 * n);
      at += 4 * n;
      const copy = new Uint8Array(bytes).buffer; // aligned, owned
      return dtype === "i32" ? new Int32Array(copy) : new Float32Array(copy);
    }),
  );
  return { header, values };
}

/** The frames arriving on a socket, in order; `next()` fails once the peer is gone. */
class FrameReader {
  /** Bytes received and not yet decoded, as they came (joined only once a frame is whole). */
  private chunks: Buffer[] = [];
  private have = 0;
  private frames: Frame[] = [];
  private waiting: { ok: (f: Frame) => void; fail: (e: Error) => void }[] = [];
  private gone: Error | null = null;

  /** who: the peer, as errors name it (set again once a rank has said which it is). */
  constructor(
    socket: Socket,
    public who: string,
  ) {
    // A gradient's frame arrives in many chunks: joining each into the rest would copy it over and over.
    let need = 8; // the length prefix, then the whole frame
    socket.on("data", (d: Buffer) => {
      this.chunks.push(d);
      this.have += d.length;
      while (this.have >= need) {
        let buf = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
        this.chunks = [buf];
        const h = buf.readUInt32LE(0);
        const p = buf.readUInt32LE(4);
        need = 8 + h + p;
        if (this.have < need) break;
        const f = decode(buf.subarray(8, 8 + h), buf.subarray(8 + h, need));
        buf = buf.subarray(need);
        this.chunks = buf.length ? [buf] : [];
        this.have = buf.length;
        need = 8;
        const w = this.waiting.shift();
        if (w) w.ok(f);
        else this.frames.push(f);
      }
    });
    const end = (e?: Error) => {
      this.gone ??= new Error(`collectives: ${this.who} disconnected${e ? ` (${e.message})` : ""}`);
      for (const w of this.waiting.splice(0)) w.fail(this.gone);
    };
    socket.on("error", end);
    socket.on("close", () => end());
  }

  next(): Promise<Frame> {
    const f = this.frames.shift();
    if (f) return Promise.resolve(f);
    if (this.gone) return Promise.reject(this.gone);
    return new Promise((ok, fail) => this.waiting.push({ ok, fail }));
  }
}

/** A rank's collectives and how to leave the group. */
export interface TcpGroup {
  collectives: Collectives;
  close(): void;
}

/**
 * Rank 0: listens on 127.0.0.1 (port 0: any free port) for the other size - 1 ranks. `port` is
 * known at once; `group` resolves when every rank has said hello (or fails after `timeoutMs`).
 */
export function tcpHub(
  size: number,
  port = 0,
  timeoutMs = 60_000,
): Promise<{ port: number; group: Promise<TcpGroup> }> {
  const peers = new Map<number, { socket: Socket; reader: FrameReader }>();
  const server: Server = createServer();
  return new Promise((listening, failed) => {
    server.once("error", failed);
    server.listen(port, "127.0.0.1", () => {
      const bound = (server.address() as { port: number }).port;
      const group = new Promise<TcpGroup>((ok, fail) => {
        const timer = setTimeout(() => {
          server.close();
          fail(
            new Error(
              `collectives: ${size - 1 - peers.size} of ${size - 1} ranks did not connect within ${timeoutMs / 1000} s`,
            ),
          );
        }, timeoutMs);
        const ready = () => {
          clearTimeout(timer);
          server.close(); // no more ranks: the connections stay open
          let calls = 0;
          const exchange = async (mine: CollectiveValues[]) => {
            const k = calls++;
            const all: CollectiveValues[][] = [mine];
            for (let q = 1; q < size; q++) {
              const f = await peers.get(q)!.reader.next();
              if (f.header.kind !== "values" || f.header.k !== k)
                throw new Error(`collectives: rank ${q} sent ${f.header.kind} ${f.header.k} for call ${k}`);
              all.push(f.values[0]);
            }
            const frame = encode({ kind: "all", rank: 0, k }, all);
            for (const { socket } of peers.values()) socket.write(frame);
            return all;
          };
          ok({
            collectives: collectivesOver(0, size, exchange),
            close: () => {
              for (const { socket } of peers.values()) socket.end();
            },
          });
        };
        if (size === 1) ready();
        server.on("connection", (socket) => {
          socket.setNoDelay(true);
          const reader = new FrameReader(socket, "a rank");
          reader.next().then(
            (f) => {
              const q = f.header.rank;
              if (f.header.kind !== "hello" || !(q >= 1 && q < size) || peers.has(q)) {
                socket.destroy();
                return;
              }
              reader.who = `rank ${q}`;
              peers.set(q, { socket, reader });
              if (peers.size === size - 1) ready();
            },
            () => socket.destroy(),
          );
        });
      });
      listening({ port: bound, group });
    });
  });
}

/** Rank `rank` (>= 1) of `size`: connects to the hub at 127.0.0.1:`port`. */
export function tcpJoin(rank: number, size: number, port: number, host = "127.0.0.1"): Promise<TcpGroup> {
  return new Promise((ok, fail) => {
    const socket = connect(port, host, () => {
      socket.off("error", fail);
      socket.setNoDelay(true);
      socket.write(encode({ kind: "hello", rank, k: -1 }, []));
      const reader = new FrameReader(socket, "rank 0");
      let calls = 0;
      const exchange = async (mine: CollectiveValues[]) => {
        const k = calls++;
        socket.write(encode({ kind: "values", rank, k }, [mine]));
        const f = await reader.next();
        if (f.header.kind !== "all" || f.header.k !== k)
          throw new Error(`collectives: rank 0 sent ${f.header.kind} ${f.header.k} for call ${k}`);
        return f.values;
      };
      ok({ collectives: collectivesOver(rank, size, exchange), close: () => socket.end() });
    });
    socket.once("error", fail);
  });
}
