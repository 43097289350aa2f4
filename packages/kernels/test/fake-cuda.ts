// A fake cuda addon for tests without a GPU (cuda-dry-run.test.ts, tests/launch-count.test.ts): the
// cuda backend runs every op against it; it records launches instead of running them and checks
// each against the signature table: a kernel of the table, within its __launch_bounds__ and the
// grid limits, one 8-byte slot per parameter (tensor maps: 128 bytes at a 64-byte boundary), shared
// memory within the H200's 227 KB, tensor maps the driver would accept. What it finds wrong goes to
// `problems`. `config` is read at every call, so a test changes the GPU it pretends to be between
// runs (compute capability, misaligned buffers, cuBLASLt refusing).
import { DEFINES, KERNELS } from "../src/cuda/kernels.generated.ts";
import type { KernelSignature } from "../src/cuda-backend/launch.ts";

export interface FakeCudaConfig {
  /** The fake GPU's compute capability (the backend picks the sm90 kernels on "9.0"). */
  computeCapability: string;
  /** Every 7th buffer misaligned by 4 bytes, so that the aligned-only fast paths get skipped too. */
  misalign: boolean;
  /** cuBLASLt's answer to every call. */
  lt: "ok" | "refuse";
}

export function createFakeCuda(config: FakeCudaConfig) {
  const table = new Map<string, KernelSignature>();
  for (const mod of Object.values(KERNELS))
    for (const k of Object.values(mod)) table.set(`${k.module}.${k.name}`, k);
  const state = {
    table,
    /** Every kernel launched so far. */
    launched: new Set<string>(),
    /** The kernels launched since the caller last cleared it. */
    launchedNow: new Set<string>(),
    problems: [] as string[],
    /** Each launch since the caller last cleared it: the kernel, the grid's x and the argument bytes. */
    log: [] as { kernel: string; gx: number; args: DataView }[],
    /** The bytes last copied to each device address. */
    uploads: new Map<number, DataView>(),
    /** Each cuBLASLt call's output type and whether it adds into its output (beta 1). */
    ltCalls: [] as { cType: string; accumulate: boolean }[],
    /** Kernel launches and cuBLASLt calls (the caller resets it); those recorded into a graph not. */
    launches: 0,
    /** Graph replays (the caller resets it). */
    graphLaunches: 0,
    /** Makes cudaCaptureEnd fail, as a recording an op broke does on a GPU. */
    failCaptureEnd: false,
    /** Kernel timing: off, on (uncaptured launches) or in graph mode (timer.rs). */
    timing: "off" as "off" | "on" | "graph",
  };
  // Timed launches (the kernel of each, in order): those a graph-mode capture recorded stay until
  // timing stops, and each replay of that graph times them again; 1 us a launch.
  let timed: string[] = [];
  let timingGeneration = 0;
  // The launches of the capture recording now (null: none), as a CUDA graph's nodes.
  let recording: number | null = null;
  const issue = (name: string) => {
    if (recording === null) state.launches++;
    else recording++;
    if (state.timing !== "off") timed.push(name);
  };
  const { problems, log, uploads } = state;
  let nextPtr = 0;
  let allocs = 0;
  class FakeBuffer {
    readonly ptr: number;
    constructor(readonly bytes: number) {
      if (!(Number.isInteger(bytes) && bytes >= 0)) problems.push(`DeviceBuffer of ${bytes} bytes`);
      this.ptr = nextPtr + (config.misalign && ++allocs % 7 === 0 ? 4 : 0);
      nextPtr += Math.ceil(bytes / 256) * 256 + 256;
    }
    free() {}
  }
  const ids: string[] = [];
  const addon = {
    DeviceBuffer: FakeBuffer,
    cudaInfo: () => ({
      available: true,
      reason: null,
      computeCapability: config.computeCapability,
      multiprocessors: 132,
    }),
    cudaTensorMap2D: (
      ptr: number,
      elem: string,
      inner: number,
      rows: number,
      boxInner: number,
      boxRows: number,
      swizzle = 128,
    ) => {
      const esz = elem === "f32" ? 4 : elem === "bf16" ? 2 : 1;
      if (!["u8", "bf16", "f32"].includes(elem)) problems.push(`tensor map of ${elem}`);
      if (ptr % 16 !== 0 || (inner * esz) % 16 !== 0)
        problems.push(`tensor map at ${ptr}, pitch ${inner * esz}`);
      if (
        !(
          rows >= 1 &&
          boxInner * esz === swizzle &&
          [64, 128].includes(swizzle) &&
          boxRows >= 1 &&
          boxRows <= 256
        )
      )
        problems.push(`tensor map ${rows} rows, box ${boxInner}x${boxRows}, swizzle ${swizzle}`);
      return new Uint8Array(128);
    },
    cudaKernel: (module: string, name: string) => {
      if (!table.has(`${module}.${name}`)) problems.push(`unknown kernel ${module}.${name}`);
      return ids.push(`${module}.${name}`) - 1;
    },
    cudaLaunch: (
      id: number,
      gx: number,
      gy: number,
      gz: number,
      bx: number,
      by: number,
      bz: number,
      sh: number,
      args: Uint8Array,
      offsets?: number[],
    ) => {
      issue(ids[id]);
      const k = table.get(ids[id])!;
      log.push({ kernel: ids[id], gx, args: new DataView(args.slice().buffer) });
      state.launched.add(ids[id]);
      state.launchedNow.add(ids[id]);
      const yz = DEFINES.common.GRID_YZ_MAX;
      // Scalars take 8-byte slots; with a tensor map, each parameter sits at its offset.
      let at = 0;
      const want = k.params.map(([, kind]) => {
        at = kind === "tmap" ? Math.ceil(at / 64) * 64 : at;
        const o = at;
        at += kind === "tmap" ? 128 : 8;
        return o;
      });
      const maps = k.params.some(([, kind]) => kind === "tmap");
      if (args.byteLength !== at || (maps ? offsets?.join() !== want.join() : offsets !== undefined))
        problems.push(`${ids[id]}: ${args.byteLength} argument bytes at ${offsets ?? "8-byte slots"}`);
      if (!(gx >= 1 && gx < 2 ** 31 && gy >= 1 && gy <= yz && gz >= 1 && gz <= yz))
        problems.push(`${ids[id]}: grid ${[gx, gy, gz]}`);
      if (!(bx >= 32 && bx <= (k.maxThreads ?? 1024) && by === 1 && bz === 1))
        problems.push(`${ids[id]}: block ${bx}`);
      if (!(sh >= 0 && sh <= 227 * 1024)) problems.push(`${ids[id]}: ${sh} bytes of shared memory`);
    },
    cudaGemmLt: (...args: unknown[]) => {
      issue("cublasLt.gemm");
      if (config.lt === "refuse") throw new Error("CUBLAS_STATUS_NOT_SUPPORTED");
      state.ltCalls.push({ cType: args[11] as string, accumulate: args[15] as boolean });
    },
    cudaHtod: (buf: FakeBuffer, offset: number, data: Uint8Array) => {
      if (recording !== null) problems.push("an upload while a graph records");
      uploads.set(buf.ptr + offset, new DataView(data.slice().buffer));
    },
    cudaDtoh: () => {
      if (recording !== null) problems.push("a read while a graph records");
    },
    cudaCaptureBegin: () => {
      if (recording !== null) problems.push("a capture inside a capture");
      if (state.timing === "on") throw new Error("CUDA graph capture while kernel timing is on (fake)");
      recording = 0;
    },
    cudaCaptureEnd: () => {
      const nodes = recording ?? 0;
      recording = null;
      if (state.failCaptureEnd)
        throw new Error("cuStreamEndCapture: CUDA_ERROR_STREAM_CAPTURE_INVALIDATED (fake)");
      let freed = false;
      const timedIn = state.timing === "graph" ? timingGeneration : null;
      return {
        nodes,
        borrowed: 0,
        launch: () => {
          if (freed) problems.push("a graph replayed after free()");
          if (timedIn !== null && timedIn !== timingGeneration)
            throw new Error("a graph recorded with kernel timing replayed after the timing ended (fake)");
          state.graphLaunches++;
        },
        free: () => {
          freed = true;
        },
      };
    },
    cudaCaptureAbort: () => {
      recording = null;
    },
    cudaSynchronize: () => {},
    cudaKernelTiming: (on: boolean, graph?: boolean) => {
      timingGeneration++;
      timed = [];
      state.timing = on ? (graph ? "graph" : "on") : "off";
    },
    cudaKernelTimes: (keep?: boolean) => {
      const counts = new Map<string, number>();
      for (const k of timed) counts.set(k, (counts.get(k) ?? 0) + 1);
      const kernels = [...counts].map(([name, launches]) => ({ name, ms: launches / 1000, launches }));
      const spanMs = timed.length / 1000;
      if (!keep) timed = [];
      return { kernels, spanMs };
    },
    cudaDtod: () => {},
    cudaMemset8: () => {},
    cudaMemset32: () => {},
  };
  return Object.assign(state, { addon });
}
