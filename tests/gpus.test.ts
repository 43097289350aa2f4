// `moe8 train --gpus N` (apps/trainer/src/dist, NCCL through packages/kernels/src/cuda/nccl.rs) on
// the GPUs of one machine. With one GPU the whole path runs as a group of one: the TCP rendezvous,
// the NCCL unique id handed out, the communicator, every step's announcement, rows and gradient sums
// through NCCL, ZeRO-1's broadcasts and the checkpoint's gather; the run must equal the single-process
// run step for step (a group of one sums nothing), both uncaptured. Runs where a GPU and NCCL are
// present (skipped elsewhere, unless MOE8_REQUIRE_NCCL=1 makes their absence a failure): the GPU
// session script's step `nccl-test`. Two or more GPUs (`--gpus 2`): the second test, on a machine
// that has them (`bash scripts/gpu-session.sh multi` runs this file there).
import { join } from "node:path";
import { loadNative } from "@moe8/kernels";
import { describe, expect, it } from "vitest";
import { cli, metricsOf, QUICK, tmp } from "./helpers.ts";

/** CUDA devices on this machine (0 without the addon's CUDA). */
function gpuCount(): number {
  const a = loadNative().addon;
  return a && typeof a.cudaInfo === "function" ? (a.cudaInfo().deviceCount ?? 0) : 0;
}

function missing(): string | null {
  const a = loadNative().addon;
  if (!a || typeof a.ncclInfo !== "function") return "addon without CUDA";
  const c = a.cudaInfo();
  if (!c.available) return c.reason ?? "no GPU";
  const n = a.ncclInfo();
  return n.available ? null : (n.reason ?? "no NCCL");
}
const why = missing();
if (why && process.env.MOE8_REQUIRE_NCCL === "1") throw new Error(`MOE8_REQUIRE_NCCL=1: ${why}`);

describe.skipIf(why !== null)("--gpus on this machine's GPUs", () => {
  it("--gpus 1 (a group of one through NCCL) trains as the single process does, and resumes", () => {
    const flags = ["--backend", "cuda", ...QUICK, "--save-every", "3", "--steps", "6"];
    const env = { MOE8_CUDA_GRAPH: "0" };
    const one = join(tmp("gpus"), "one");
    const nccl = join(tmp("gpus"), "nccl");
    const a = cli(["train", ...flags, "--out", one], env);
    expect(a.status, a.stderr).toBe(0);
    const b = cli(["train", ...flags, "--gpus", "1", "--out", nccl], env);
    expect(b.status, b.stderr).toBe(0);
    expect(b.stdout).toMatch(/on cuda x 1 GPU \(NCCL \d+\.\d+\.\d+\)/);
    const pick = (m: ReturnType<typeof metricsOf>) => m.map((r) => [r.step, r.loss, r.grad_norm]);
    expect(pick(metricsOf(nccl))).toEqual(pick(metricsOf(one)));
    // Its checkpoint (the optimiser state gathered through NCCL) resumes in one process.
    const c = cli(["train", "--resume", nccl, "--steps", "8"], env);
    expect(c.status, c.stderr).toBe(0);
  }, 300_000);

  // Two GPUs (a kind with two or more; skipped on one): data parallel over NCCL, with and without
  // the experts split, against one process: the first step's loss equal to f32 re-association
  // (each rank's half of the batch, summed), later ones within 1e-3 of one process's (FP8's
  // per-rank gradient tiles differ), the loads of the first step the same, the checkpoint resumable.
  it.skipIf(gpuCount() < 2)(
    "--gpus 2, data and expert parallel, train as one process",
    () => {
      const a = oneProcess("gpus2");
      for (const extra of [[], ["--expert-parallel"]]) {
        const { r, b, out } = trainsAsOne("gpus2", extra.length ? "ep" : "dp", ["--gpus", "2", ...extra], a);
        expect(r.stdout).toMatch(/on cuda x 2 GPUs/);
        if (extra.length) expect(b[0].expert_exchange_ms).toBeGreaterThan(0);
        const c = cli(["train", "--resume", out, "--steps", "6"], MULTI_ENV);
        expect(c.status, c.stderr).toBe(0);
      }
    },
    600_000,
  );

  // Four GPUs (skipped on fewer): two expert groups of 2 GPUs (the world's NCCL communicator split
  // twice: the groups' token exchanges, the replicas' expert-gradient sums), against one process as
  // above, the checkpoint resumable with the experts over all four.
  it.skipIf(gpuCount() < 4)(
    "--gpus 4 --expert-parallel 2 trains as one process",
    () => {
      const a = oneProcess("gpus4");
      const { r, b, out } = trainsAsOne("gpus4", "epdp", ["--gpus", "4", "--expert-parallel", "2"], a);
      expect(r.stdout).toMatch(/on cuda x 4 GPUs .*experts split over 2 expert groups of 2 ranks/);
      expect(b[0].expert_exchange_ms).toBeGreaterThan(0);
      const c = cli(
        ["train", "--resume", out, "--steps", "6", "--gpus", "4", "--expert-parallel"],
        MULTI_ENV,
      );
      expect(c.status, c.stderr).toBe(0);
    },
    600_000,
  );
});

// The several-GPU runs: 4 steps of QUICK's shape on cuda, every step logged.
const MULTI = ["--backend", "cuda", ...QUICK, "--steps", "4", "--log-every", "1"];
const MULTI_ENV = { MOE8_CUDA_GRAPH: "0", NCCL_NVLS_ENABLE: "0" };

/** One process's metrics of the several-GPU runs' training (in tmp(dir)/one). */
function oneProcess(dir: string): ReturnType<typeof metricsOf> {
  const one = join(tmp(dir), "one");
  expect(cli(["train", ...MULTI, "--out", one], MULTI_ENV).status).toBe(0);
  return metricsOf(one);
}

/**
 * The same training with `flags` (several GPUs) into tmp(dir)/name, against one process's metrics
 * `a`: the first step's loss within 1e-5 and its loads the same, later losses within 1e-3.
 */
function trainsAsOne(dir: string, name: string, flags: string[], a: ReturnType<typeof metricsOf>) {
  const out = join(tmp(dir), name);
  const r = cli(["train", ...MULTI, ...flags, "--out", out], MULTI_ENV);
  expect(r.status, r.stderr).toBe(0);
  const b = metricsOf(out);
  expect(Math.abs(b[0].loss - a[0].loss)).toBeLessThan(1e-5);
  expect(b[0].load_max_over_mean_by_layer).toEqual(a[0].load_max_over_mean_by_layer);
  for (let i = 1; i < 4; i++) expect(Math.abs(b[i].loss - a[i].loss)).toBeLessThan(1e-3);
  return { r, b, out };
}
