// Data-parallel ranks on one machine (issue 22): `moe8 train --ranks N` runs the run itself in the
// process the user started (rank 0, the leader: data, schedule, logs, evaluation, checkpoints) and
// N - 1 worker processes (./worker.ts) that only compute. They meet over TCP (tcp-collectives.ts):
// at the start the leader broadcasts every weight, correction bias and optimiser moment, so a worker
// needs no checkpoint or data of its own, and then, every step, a header (the step, its learning
// rate and router noise, or "stop") and each rank's slice of the batch. Each rank runs the step on
// its slice with the group's collectives (trainStep sums gradients, losses and expert loads over the
// ranks), so every rank makes the same update and the replicas stay the same bits.
//
// A worker that dies ends the run: the leader's next collective fails naming the rank, and its exit
// code and signal are added to the message; the last checkpoint resumes with any --ranks. A leader
// that ends (normally, by a signal or an error) stops its workers.
import { type ChildProcess, spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type CudaBackend, requireNative } from "@moe8/kernels";
import type { Collectives, Param, Tensor } from "@moe8/tensor";
import type { TrainConfig } from "../run/config.ts";
import type { Session } from "../run/session.ts";
import { type TcpGroup, tcpHub } from "./tcp-collectives.ts";

/** What the leader tells every rank before a step (or that the run is over). */
export interface StepHeader {
  step: number;
  lr: number;
  noise: { scale: number; seed: number } | null;
  /** After the step, every rank compares its weights with rank 0's (checkReplicas). */
  check: boolean;
  /** A step with FP8 range counts (--fp8-stats-every): every rank counts its own, the step sums them. */
  fp8Stats: boolean;
}

const HEADER_WORDS = 10;

/**
 * What rank 0 announces: a step, "gather" (every rank joins AdamW.gatherState, and under expert
 * parallelism the model's stateDict: the leader is writing a checkpoint), "model" (every rank joins
 * the model's stateDict: the leader evaluates the whole model) or "stop" (the run is over).
 */
export type Announcement = StepHeader | "gather" | "model" | "stop";

/** The announcement as i32 words (doubles by their bits). */
function encodeHeader(h: Announcement | null): Int32Array {
  const w = new Int32Array(HEADER_WORDS);
  if (h === null || h === "stop") return w;
  if (h === "gather" || h === "model") {
    w[0] = h === "gather" ? 2 : 3;
    return w;
  }
  const d = new Float64Array([h.lr, h.noise?.scale ?? 0]);
  const bits = new Int32Array(d.buffer);
  w.set([
    1,
    h.step,
    bits[0],
    bits[1],
    bits[2],
    bits[3],
    h.noise?.seed ?? 0,
    h.noise ? 1 : 0,
    h.check ? 1 : 0,
    h.fp8Stats ? 1 : 0,
  ]);
  return w;
}

function decodeHeader(w: Int32Array): Announcement {
  if (w[0] === 0) return "stop";
  if (w[0] === 2) return "gather";
  if (w[0] === 3) return "model";
  const d = new Float64Array(Int32Array.of(w[2], w[3], w[4], w[5]).buffer);
  return {
    step: w[1],
    lr: d[0],
    noise: w[7] ? { scale: d[1], seed: w[6] } : null,
    check: w[8] === 1,
    fp8Stats: w[9] === 1,
  };
}

/**
 * Rank `c.rank`'s part of an announcement: what rank 0 announced (`h` on rank 0, null elsewhere),
 * and for a step this rank's rows of the batch.
 */
export async function exchangeStep(
  s: Session,
  c: Collectives,
  h: Announcement | null,
  batch: { ids: Int32Array; targets: Int32Array } | null,
  seqLen: number,
): Promise<{ header: Announcement; ids: Int32Array; targets: Int32Array }> {
  const b = s.backend;
  return b.scope(async () => {
    const head = b.upload(encodeHeader(h), [HEADER_WORDS], "i32");
    await c.broadcast([head], [0]);
    const header = decodeHeader((await head.read()) as Int32Array);
    if (typeof header === "string") return { header, ids: new Int32Array(0), targets: new Int32Array(0) };
    const piece = (all: Int32Array | undefined, q: number) => {
      if (!all) return b.upload(new Int32Array(0), [0, seqLen], "i32");
      const rows = all.length / seqLen / c.size;
      return b.upload(all.subarray(q * rows * seqLen, (q + 1) * rows * seqLen), [rows, seqLen], "i32");
    };
    const parts = async (all: Int32Array | undefined) => {
      const got = await c.allToAll(Array.from({ length: c.size }, (_, q) => piece(all, q)));
      return (await got[0].read()) as Int32Array;
    };
    return { header, ids: await parts(batch?.ids), targets: await parts(batch?.targets) };
  });
}

/**
 * The parameters every rank holds the same: all of them, but under expert parallelism the experts
 * (each rank holds its own).
 */
function replicated(s: Session): Param[] {
  const split = s.model.expertSplit;
  return split ? s.model.params.filter((p) => !split.params.has(p)) : s.model.params;
}

/**
 * Every rank takes rank 0's weights (under expert parallelism its own experts stay), correction
 * biases and optimiser step count (a new run's are the
 * same on every rank already; a resumed run's each rank read from the same checkpoint, and its own
 * shard of the moments with them).
 */
export async function syncState(s: Session, c: Collectives): Promise<void> {
  const b = s.backend;
  await b.scope(async () => {
    const step = b.upload(Int32Array.of(s.opt.step), [1], "i32");
    const all: Tensor[] = [
      ...replicated(s).map((p) => p.value),
      ...s.model.moeLayers.map((m) => m.bias),
      step,
    ];
    await c.broadcast(
      all,
      all.map(() => 0),
    );
    s.opt.step = ((await step.read()) as Int32Array)[0];
  });
}

/**
 * Every rank compares a digest (SHA-256) of its weights and correction biases with rank 0's (its
 * experts, under expert groups of part of the ranks, with its first replica's); all ranks fail,
 * naming the ranks that differ, if any does. The replicas should hold the same bits
 * (trainStep's sums are in rank order): a difference means a rank computed something else, which
 * would otherwise go unnoticed until the losses drift.
 */
export async function checkReplicas(s: Session, c: Collectives, step: number): Promise<void> {
  const b = s.backend;
  const digestOf = async (tensors: Tensor[]) => {
    const hash = createHash("sha256");
    for (const t of tensors) {
      const v = await t.read();
      hash.update(new Uint8Array(v.buffer, v.byteOffset, v.byteLength));
    }
    return new Int32Array(new Uint8Array(hash.digest()).buffer);
  };
  /** Whether this rank's digest differs from the group's first rank's. */
  const differsIn = async (g: Collectives, digest: Int32Array) => {
    const theirs = b.upload(digest, [digest.length], "i32");
    await g.broadcast([theirs], [0]);
    const first = (await theirs.read()) as Int32Array;
    return !first.every((x, i) => x === digest[i]);
  };
  const digest = await digestOf([
    ...replicated(s).map((p) => p.value),
    ...s.model.moeLayers.map((m) => m.bias),
  ]);
  // With expert groups of part of the ranks, the experts against their first replica's too.
  const reps = s.model.expertReplicas;
  const split = s.model.expertSplit;
  const experts =
    reps && split
      ? await digestOf(s.model.params.filter((p) => split.params.has(p)).map((p) => p.value))
      : null;
  await b.scope(async () => {
    const differs = new Int32Array(c.size);
    const dense = await differsIn(c, digest);
    const own = reps && experts ? await differsIn(reps, experts) : false;
    differs[c.rank] = (dense ? 1 : 0) + (own ? 2 : 0);
    const all = b.upload(differs, [c.size], "i32");
    await c.allReduceSum([all]);
    const got = [...((await all.read()) as Int32Array)];
    const which = (bit: number) => got.flatMap((x, r) => (x & bit ? [r] : []));
    const P = split?.size ?? 1;
    const lines = [
      ...(which(1).length ? [`the weights of rank ${which(1).join(", ")} differ from rank 0's`] : []),
      ...which(2).map((r) => `the experts of rank ${r} differ from rank ${r % P}'s`),
    ];
    if (lines.length) throw new Error(`replica check at step ${step}: ${lines.join("; ")}`);
  });
}

/** Every rank's part of a "gather": the optimiser's moments, and under expert parallelism the model. */
export async function joinGather(s: Session, c: Collectives): Promise<GatheredState> {
  const optimizer = await s.opt.gatherState(c);
  return { optimizer, model: s.model.expertGroup ? await s.model.stateDict() : null };
}

/**
 * The ranks' NCCL communicator (`--gpus`): rank 0 makes the unique id and hands it to the others over
 * the TCP group they met on; every rank then joins the communicator on its own GPU, and the group's
 * collectives from then on are NCCL's, on the device (cuda-backend/nccl.ts).
 */
export async function ncclGroup(
  s: Session,
  tcp: Collectives,
): Promise<{ collectives: Collectives; dispose(): void }> {
  const native = requireNative();
  const b = s.backend as unknown as CudaBackend;
  const id = tcp.rank === 0 ? native.ncclUniqueId() : Buffer.alloc(128);
  const words = s.backend.upload(new Int32Array(new Uint8Array(id).buffer), [32], "i32");
  await tcp.broadcast([words], [0]);
  const got = Buffer.from(((await words.read()) as Int32Array).buffer);
  words.dispose();
  const comm = new native.NcclComm(got, tcp.size, tcp.rank);
  // (The subgroups' communicators, --expert-parallel N below the world, end with it.)
  const made: InstanceType<typeof native.NcclComm>[] = [];
  return {
    collectives: b.ncclCollectives(comm, made),
    dispose: () => {
      for (const c of made.reverse()) c.dispose();
      comm.dispose();
    },
  };
}

/**
 * Ends this process (exit code 3, `note` on stderr with {pid} and {rank} filled in) once one of the
 * watched processes has been gone for 2 s: a rank waiting in NCCL for a dead peer is blocked in the
 * device read, where the run's own error path cannot run (src/watchdog.rs). False where it cannot
 * watch (no /proc).
 */
export function watchRanks(pids: number[], ranks: number[], note: string): boolean {
  return requireNative().watchProcesses(pids, ranks, note, 2000);
}

/** What a worker is started with (MOE8_RANKS_CONFIG): the run's config and the checkpoint it resumes. */
export interface WorkerStart {
  cfg: TrainConfig;
  from: string | null;
  /**
   * --expert-parallel: the ranks of an expert group (each MoE layer's routed experts split over
   * them; every rank when it is the rank count); 1 or absent: none.
   */
  expertParallel?: number;
}

/** What the leader's checkpoint writes, gathered from the ranks. */
export interface GatheredState {
  /** Every parameter's moments, named as one process names them. */
  optimizer: Map<string, Float32Array>;
  /** Under expert parallelism the whole model (every rank's experts); else null (the leader's own). */
  model: Map<string, { shape: number[]; data: Float32Array }> | null;
}

/** The leader's view of its workers. */
export interface Ranks {
  group: TcpGroup;
  /** The group's collectives: NCCL's with --gpus, else the TCP group's. */
  collectives: Collectives;
  /**
   * With --gpus: the step reached and (when given) what resumes the run, for the note the watchdog
   * prints if a worker dies while this process waits on NCCL.
   */
  progress(step: number, resume?: string | null): void;
  /** Steps between replica checks (0: never). */
  checkEvery: number;
  /**
   * Every rank's optimiser moments by name, as one process names them (AdamW.gatherState, with the
   * workers joining it): what the leader's checkpoint writes.
   */
  gatherOptimizer(): Promise<GatheredState>;
  /** The whole model, every rank joining (expert parallelism: for the leader's evaluation). */
  gatherModel(): Promise<Map<string, { shape: number[]; data: Float32Array }>>;
  /**
   * Why a worker stopped (its rank, exit code or signal), else null; waits up to `ms` for a worker's
   * exit to be reported (a collective sees the socket close before the process's exit arrives).
   */
  failure(ms?: number): Promise<string | null>;
  /** Tells the workers the run is over and waits for them (kills what has not exited in 10 s). */
  close(): Promise<void>;
}

/** Where `moe8 train` runs from, for the workers' command line. */
function cliPath(): string {
  return join(import.meta.dirname, "..", "cli.ts");
}

/**
 * Starts ranks 1 .. n - 1 as child processes of this one (the same runtime, `cli.ts train` with
 * MOE8_RANK, MOE8_RANKS, MOE8_RANKS_PORT and MOE8_RANKS_CONFIG: the run's resolved config) and
 * returns once all have joined.
 */
/**
 * The environment of worker rank r of n: this process's, with the rendezvous (port, the run's
 * config file), the rank's GPU under --gpus (the r-th after `device`), and NVLink multicast off for
 * NCCL whatever the caller's environment says (issue 22).
 */
export function workerEnv(
  base: NodeJS.ProcessEnv,
  r: number,
  n: number,
  rendezvous: { port: number; config: string },
  gpu: { device: number } | null,
): NodeJS.ProcessEnv {
  return {
    ...base,
    MOE8_RANK: String(r),
    MOE8_RANKS: String(n),
    MOE8_RANKS_PORT: String(rendezvous.port),
    MOE8_RANKS_CONFIG: rendezvous.config,
    NCCL_NVLS_ENABLE: "0",
    ...(gpu ? { MOE8_CUDA_DEVICE: String(gpu.device + r), MOE8_RANKS_NCCL: "1" } : {}),
  };
}

export async function startRanks(
  n: number,
  cfg: TrainConfig,
  s: Session,
  checkEvery: number,
  from: string | null,
  gpus = false,
  expertParallel = 1,
): Promise<Ranks> {
  process.env.NCCL_NVLS_ENABLE = "0";
  // --gpus: rank r on the GPU r places after this process's own (MOE8_CUDA_DEVICE, 0 by default).
  const device = Number(process.env.MOE8_CUDA_DEVICE ?? 0);
  const dir = mkdtempSync(join(tmpdir(), "moe8-ranks-"));
  const config = join(dir, "config.json");
  writeFileSync(config, JSON.stringify({ cfg, from, expertParallel } satisfies WorkerStart));
  const { port, group } = await tcpHub(n);
  const children: ChildProcess[] = [];
  let failure: string | null = null;
  let closing = false;
  let failed = () => {};
  const someExit = new Promise<void>((ok) => {
    failed = ok;
  });
  for (let r = 1; r < n; r++) {
    // The same runtime: Bun and Node (tsx's loader is in execArgv) take the script; Deno needs `run`.
    const runtimeArgs = "Deno" in globalThis ? ["run", "--allow-all"] : process.execArgv;
    const child = spawn(process.execPath, [...runtimeArgs, cliPath(), "train"], {
      // (NVLink multicast stays off for NCCL in every rank: the leader's own is set above.)
      env: workerEnv(process.env, r, n, { port, config }, gpus ? { device } : null),
      stdio: ["ignore", "ignore", "inherit"],
    });
    child.on("exit", (code, signal) => {
      if (!closing && (code !== 0 || signal)) {
        failure ??= `rank ${r} (process ${child.pid}) exited ${signal ? `on ${signal}` : `with code ${code}`}`;
        failed();
      }
    });
    children.push(child);
  }
  let joined: TcpGroup;
  try {
    joined = await group;
  } catch (e) {
    for (const c of children) c.kill("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
    throw failure ? new Error(`${failure} before the ranks met`) : e;
  }
  let nccl: { collectives: Collectives; dispose(): void } | null = null;
  let resumeFrom: string | null = null;
  const pids = children.map((c) => c.pid ?? 0);
  const note = (step: number, resume: string | null) =>
    `rank {rank} (process {pid}) is gone: the run stopped at step ${step}${resume ? `; --resume ${resume}` : ""}`;
  if (gpus) {
    // Watched before the communicator is made: its making waits for every rank too.
    watchRanks(
      pids,
      pids.map((_, i) => i + 1),
      note(0, null),
    );
    nccl = await ncclGroup(s, joined.collectives);
  }
  const collectives = nccl?.collectives ?? joined.collectives;
  if (expertParallel > 1) await s.becomeExpertParallel(collectives, expertParallel);
  await syncState(s, collectives);
  return {
    group: joined,
    collectives,
    checkEvery,
    progress(step, resume) {
      if (resume !== undefined) resumeFrom = resume;
      if (gpus) requireNative().setWatchNote(note(step, resumeFrom));
    },
    async gatherOptimizer() {
      await exchangeStep(s, collectives, "gather", null, cfg.seqLen);
      return joinGather(s, collectives);
    },
    async gatherModel() {
      await exchangeStep(s, collectives, "model", null, cfg.seqLen);
      return s.model.stateDict();
    },
    async failure(ms = 0) {
      if (!failure && ms > 0) await Promise.race([someExit, new Promise((ok) => setTimeout(ok, ms))]);
      return failure;
    },
    async close() {
      closing = true;
      const exited = children.map(
        (c) =>
          new Promise<void>((ok) =>
            c.exitCode !== null || c.signalCode ? ok() : c.once("exit", () => ok()),
          ),
      );
      if (gpus) requireNative().unwatch();
      try {
        if (!failure) await exchangeStep(s, collectives, "stop", null, cfg.seqLen);
      } catch {
        // A worker already gone: the others are stopped below.
      }
      nccl?.dispose();
      joined.close();
      const timer = setTimeout(() => {
        for (const c of children) c.kill("SIGKILL");
      }, 10_000);
      await Promise.all(exited);
      clearTimeout(timer);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
