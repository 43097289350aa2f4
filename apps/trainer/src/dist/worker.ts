// A worker rank of `moe8 train --ranks N` or `--gpus N` (ranks.ts): started by the leader with
// MOE8_RANK, MOE8_RANKS, MOE8_RANKS_PORT and MOE8_RANKS_CONFIG (for --gpus also MOE8_CUDA_DEVICE and
// MOE8_RANKS_NCCL), it builds the run's model and optimiser, joins the group, takes the leader's
// state, and then runs each step the leader announces on the rows it is sent, until the leader says
// stop. It writes nothing: logs, evaluation and checkpoints are the leader's. MOE8_FAULT_RANK_EXIT=R:S
// makes rank R exit with code 3 at step S (the tests' stand-in for a crashed worker),
// MOE8_FAULT_RANK_CORRUPT=R:S changes one of its correction biases after step S (for the replica
// check), MOE8_FAULT_RANK_CORRUPT_EXPERT=R:S one of its experts' weights (the experts' replica check
// under expert groups of part of the ranks).
import { readFileSync } from "node:fs";
import { requireNative } from "@moe8/kernels";
import type { Tensor } from "@moe8/tensor";
import { readCheckpoint } from "../run/checkpoint.ts";
import { parseConfig, resolveModel } from "../run/config.ts";
import { buildSession } from "../run/session.ts";
import {
  checkReplicas,
  exchangeStep,
  joinGather,
  ncclGroup,
  syncState,
  type WorkerStart,
  watchRanks,
} from "./ranks.ts";
import { tcpJoin } from "./tcp-collectives.ts";

/** The step at which this rank should fail (MOE8_FAULT_RANK_EXIT or _CORRUPT=rank:step), if any. */
function faultStep(rank: number, name: string): number | null {
  const m = /^(\d+):(\d+)$/.exec(process.env[name] ?? "");
  return m && Number(m[1]) === rank ? Number(m[2]) : null;
}

/** Adds 1e-3 to a tensor's first value (the fault injections' change). */
async function nudge(w: Tensor): Promise<void> {
  const v = (await w.read()) as Float32Array;
  v[0] += 1e-3;
  w.backend.write(w, v);
}

export async function runWorker(): Promise<number> {
  // A terminal's Ctrl-C reaches the whole process group: the leader finishes its step, writes a
  // checkpoint and tells the workers to stop, so they must outlive the signal (SIGKILL still ends one).
  process.on("SIGINT", () => {});
  process.on("SIGTERM", () => {});
  const rank = Number(process.env.MOE8_RANK);
  const size = Number(process.env.MOE8_RANKS);
  const port = Number(process.env.MOE8_RANKS_PORT);
  const path = process.env.MOE8_RANKS_CONFIG ?? "";
  const start = JSON.parse(readFileSync(path, "utf8")) as WorkerStart;
  const cfg = parseConfig(start.cfg, path);
  const s = buildSession(cfg, resolveModel(cfg));
  s.becomeRank(rank, size);
  // A resumed run: the leader's checkpoint (it checked it), this rank's shard of the moments.
  if (start.from) {
    const ck = readCheckpoint(start.from);
    s.model.loadStateDict((n) => ck.model.get(n));
    s.opt.loadState(ck.state.optimizer_step, (n) => ck.optimizer.get(n)?.data);
  }
  const group = await tcpJoin(rank, size, port);
  // --gpus: the collectives are NCCL's; a leader that dies while this rank waits in NCCL ends it.
  const gpus = process.env.MOE8_RANKS_NCCL === "1";
  if (gpus) watchRanks([process.ppid], [0], `rank ${rank}: the leader (rank {rank}, process {pid}) is gone`);
  const nccl = gpus ? await ncclGroup(s, group.collectives) : null;
  const c = nccl?.collectives ?? group.collectives;
  if ((start.expertParallel ?? 1) > 1) await s.becomeExpertParallel(c, start.expertParallel!);
  const fault = faultStep(rank, "MOE8_FAULT_RANK_EXIT");
  const corrupt = faultStep(rank, "MOE8_FAULT_RANK_CORRUPT");
  const corruptExpert = faultStep(rank, "MOE8_FAULT_RANK_CORRUPT_EXPERT");
  try {
    await syncState(s, c);
    for (;;) {
      const { header, ids, targets } = await exchangeStep(s, c, null, null, cfg.seqLen);
      if (header === "stop") return 0;
      if (header === "gather") {
        await joinGather(s, c); // the leader writes the checkpoint
        continue;
      }
      if (header === "model") {
        await s.model.stateDict(); // the leader evaluates
        continue;
      }
      if (header.step === fault) process.exit(3);
      await s.runner.step({ ids, targets }, header.lr, {
        fp8Stats: header.fp8Stats,
        accum: cfg.gradAccum,
        routerNoise: header.noise ?? undefined,
        collectives: c,
      });
      // A correction bias: every rank updates its own copy (a weight would be overwritten by its
      // owner's broadcast the next step); or one of this rank's experts.
      if (header.step === corrupt) await nudge(s.model.moeLayers[0]?.bias ?? s.model.params[0].value);
      if (header.step === corruptExpert) {
        const split = s.model.expertSplit;
        const w = s.model.params.find((p) => split?.params.has(p))?.value;
        if (w) await nudge(w);
      }
      if (header.check) await checkReplicas(s, c, header.step);
    }
  } catch (e) {
    // The leader gone (it ended, was stopped, or failed and says why itself), or a replica check
    // the leader reports too: nothing to add.
    if (e instanceof Error && /rank 0 disconnected/.test(e.message)) return 0;
    if (e instanceof Error && /replica check/.test(e.message)) return 1;
    throw e;
  } finally {
    if (gpus) requireNative().unwatch();
    nccl?.dispose();
    group.close();
    s.dispose();
  }
}
