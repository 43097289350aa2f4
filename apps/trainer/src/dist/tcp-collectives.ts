// Collectives between processes on one machine over TCP (issue 22): the host-side exchange that
// data-parallel ranks without NCCL use (the cpu backend), and the channel a launcher's ranks meet
// on. Rank 0 is the hub: every rank sends it its values for the k-th collective call of a group, and
// once all the group's members have sent theirs it sends each member all of them; each rank then
// reduces as collectivesOver does (rank order), so all ranks get the same bits, the same as the
// in-process double (localGroup). The hub routes every group's calls, its own or not: a subgroup
// (`split`) may leave rank 0 out, as the replicas of rank 1's experts do.
//
// A frame is [u32 header bytes][u32 payload bytes][header JSON][payload]: the header names the call
// and each part's dtype and length, the payload holds the parts' bytes back to back. A rank that
// disconnects fails every pending and later call of the others with an error naming it.
import { connect, createServer, type Server, type Socket } from "node:net";
import { type Collectives, type CollectiveValues, collectivesOver, type OpenExchange } from "@moe8/tensor";

interface Header {
  /**
   * hello: a rank introducing itself; values: its parts for call k of group `group`; all: every
   * member's for that call.
   */
  kind: "hello" | "values" | "all";
  rank: number;
  k: number;
  /** The group's id and its members (ranks of the whole group, in group-rank order). */
  group?: string;
  members?: number[];
  /** Per part: "f32" | "i32" and element count; for "all", per rank. */
  parts: [string, number][][];
}

/** A call of a group at the hub: what each member sent so far, and rank 0's wait if a member. */
interface Call {
  members: readonly number[];
  parts: CollectiveValues[][];
  arrived: number;
  local?: { ok: (all: CollectiveValues[][]) => void; fail: (e: Error) => void };
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
          // Every group's calls in progress, by group id and call number: what each member sent,
          // and rank 0's own wait when it is a member.
          const pending = new Map<string, Call>();
          let gone: Error | null = null;
          const callOf = (key: string, members: readonly number[]) => {
            let c = pending.get(key);
            if (!c) {
              c = { members, parts: [], arrived: 0 };
              pending.set(key, c);
            }
            return c;
          };
          const post = (
            id: string,
            k: number,
            members: readonly number[],
            q: number,
            values: CollectiveValues[],
          ) => {
            const key = `${id}#${k}`;
            const c = callOf(key, members);
            const at = c.members.indexOf(q);
            if (at < 0 || c.parts[at] || c.members.join() !== members.join())
              throw new Error(`collectives: rank ${q} sent call ${k} of group ${id} out of turn`);
            c.parts[at] = values;
            if (++c.arrived < members.length) return;
            pending.delete(key);
            const frame = encode({ kind: "all", rank: 0, k, group: id }, c.parts);
            for (const m of members) if (m !== 0) peers.get(m)!.socket.write(frame);
            c.local?.ok(c.parts);
          };
          const fail = (e: Error) => {
            gone ??= e;
            for (const c of pending.values()) c.local?.fail(gone);
          };
          for (const [q, { reader }] of peers)
            (async () => {
              for (;;) {
                const f = await reader.next();
                const h = f.header;
                if (h.kind !== "values" || h.group === undefined || !h.members)
                  throw new Error(`collectives: rank ${q} sent ${h.kind} ${h.k}`);
                post(h.group, h.k, h.members, q, f.values[0]);
              }
            })().catch(fail);
          const open: OpenExchange = (id, members) => {
            let calls = 0;
            return (mine) => {
              const k = calls++;
              return new Promise<CollectiveValues[][]>((ok, no) => {
                if (gone) return no(gone);
                callOf(`${id}#${k}`, members).local = { ok, fail: no };
                try {
                  post(id, k, members, 0, mine);
                } catch (e) {
                  no(e as Error);
                }
              });
            };
          };
          const world = Array.from({ length: size }, (_, q) => q);
          ok({
            collectives: collectivesOver(0, size, open("world", world), open),
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
      // One call at a time: each rank awaits its collectives in order, so the hub's next frame to
      // this rank answers the call made last.
      const open: OpenExchange = (id, members) => {
        let calls = 0;
        return async (mine) => {
          const k = calls++;
          socket.write(encode({ kind: "values", rank, k, group: id, members: [...members] }, [mine]));
          const f = await reader.next();
          if (f.header.kind !== "all" || f.header.k !== k || f.header.group !== id)
            throw new Error(
              `collectives: rank 0 sent ${f.header.kind} ${f.header.k} of group ${f.header.group} for call ${k} of ${id}`,
            );
          return f.values;
        };
      };
      const world = Array.from({ length: size }, (_, q) => q);
      ok({ collectives: collectivesOver(rank, size, open("world", world), open), close: () => socket.end() });
    });
    socket.once("error", fail);
  });
}
