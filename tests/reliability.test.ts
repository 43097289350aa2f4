// Faults, as they happen to a run: real signals, a disk that fills up (a fault-injecting write, and
// a real small tmpfs where this machine lets a test mount one), a kill during the first checkpoint,
// two trainers on one folder, checkpoints that verify but are malformed, a torn metrics line.
// Everything goes through the CLI, as users run it. tests/resume.test.ts kills at random points.
import { spawnSync } from "node:child_process";
import {
  chmodSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { hostname } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { editJson, editTensors } from "./checkpoint-tools.ts";
import { CLI, cli, lastStep, ROOT, started, tmp, until } from "./helpers.ts";

/** About 0.3 s a step on two cores: long enough to signal a process inside a known step. */
const SLOW = ["--batch-size", "16", "--seq-len", "64", "--eval-every", "0", "--log-every", "1000"];
/** About 50 ms a step. */
const FAST = ["--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--log-every", "1000"];

const checkpointsOf = (run: string) =>
  existsSync(join(run, "checkpoints")) ? readdirSync(join(run, "checkpoints")).sort() : [];
const stepsIn = (run: string) =>
  readFileSync(join(run, "metrics.jsonl"), "utf8")
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l).step as number);

// Real file systems (a small tmpfs, a read-only one) are mounted in a user and mount namespace of
// the test's own (unshare -rm) where the kernel allows it; runners that forbid it skip those tests.
const canMount =
  spawnSync("unshare", ["-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"]).status === 0;
const isRoot = process.getuid?.() === 0;

describe("signals", () => {
  it("SIGINT after step N stops at N or N+1 with a checkpoint there (exit 0); a second one ends the process at once", async () => {
    const run = join(tmp("sig"), "run");
    const a = started(["train", "--steps", "20", ...SLOW, "--out", run]);
    await until(() => lastStep(run) >= 3 || a.out.done);
    const n = lastStep(run);
    a.child.kill("SIGINT");
    expect(await a.exit, a.out.stderr).toEqual({ code: 0, signal: null });
    const stopped = Number(/stopped at step (\d+)/.exec(a.out.stdout)?.[1]);
    expect([n, n + 1]).toContain(stopped);
    expect(checkpointsOf(run)).toEqual([`step-${stopped}`]);
    expect(stepsIn(run).at(-1)).toBe(stopped);
    expect(existsSync(join(run, ".lock"))).toBe(false);

    // The second SIGINT has the default action: the process dies by it, inside the step it is in.
    const b = started(["train", "--resume", run]);
    await until(() => lastStep(run) >= stopped + 2 || b.out.done);
    b.child.kill("SIGINT");
    await until(() => b.out.stderr.includes("SIGINT: finishing the current step") || b.out.done);
    const t0 = Date.now();
    b.child.kill("SIGINT");
    expect(await b.exit).toEqual({ code: null, signal: "SIGINT" });
    expect(Date.now() - t0).toBeLessThan(2000);
    expect(lastStep(run)).toBeLessThan(20);
    expect(existsSync(join(run, ".lock"))).toBe(true); // left behind by the killed process: stale

    // The next start takes the stale lock over, cleans up, and finishes the run.
    const r = cli(["train", "--resume", run]);
    expect(r.status, r.stderr).toBe(0);
    expect(stepsIn(run)).toEqual(Array.from({ length: 20 }, (_, i) => i + 1));
  }, 120_000);

  it("SIGTERM stops the same way", async () => {
    const run = join(tmp("sigterm"), "run");
    const a = started(["train", "--steps", "40", ...SLOW, "--out", run]);
    await until(() => lastStep(run) >= 2 || a.out.done);
    const n = lastStep(run);
    a.child.kill("SIGTERM");
    expect(await a.exit, a.out.stderr).toEqual({ code: 0, signal: null });
    expect([`step-${n}`, `step-${n + 1}`]).toContain(checkpointsOf(run)[0]);
  }, 60_000);
});

describe("a full disk", () => {
  it("ENOSPC in a checkpoint: exit 2 naming it, no temporary left, the last good one kept; resume completes", () => {
    const run = join(tmp("enospc"), "run");
    // Room for the config, the metrics and one 22 MB checkpoint, not for the second.
    const r = cli(["train", "--steps", "6", "--save-every", "2", ...FAST, "--out", run], {
      MOE8_FAULT_ENOSPC_AFTER: "30000000",
    });
    expect(r.status, r.stderr).toBe(2);
    const ck = (s: number) => join(run, "checkpoints", `step-${s}`);
    expect(r.stderr.trim()).toBe(
      `error: cannot write checkpoint ${ck(4)}: no space left on device (ENOSPC); nothing of it was kept; the last good checkpoint is ${ck(2)} (free space, then --resume ${run})`,
    );
    expect(checkpointsOf(run)).toEqual(["step-2"]);
    const again = cli(["train", "--resume", run]);
    expect(again.status, again.stderr).toBe(0);
    expect(stepsIn(run)).toEqual([1, 2, 3, 4, 5, 6]);
  }, 60_000);

  it("ENOSPC in the middle of a metrics line: the torn line is dropped on resume", () => {
    const root = tmp("torn");
    // The bytes written up to the failing line, measured on a run without the fault: config.json,
    // metrics line 1, checkpoint step-1 (deterministic sizes but line 1, whose timings vary by a few
    // characters: 60 bytes of line 2 still fit, well short of its ~250).
    // (No TensorBoard files: their records would come between those writes.)
    const NO_TB = ["--tensorboard", "off"];
    const ref = join(root, "ref");
    expect(cli(["train", "--steps", "2", "--save-every", "1", ...FAST, ...NO_TB, "--out", ref]).status).toBe(
      0,
    );
    const size = (p: string): number =>
      statSync(p).isDirectory() ? readdirSync(p).reduce((a, n) => a + size(join(p, n)), 0) : statSync(p).size;
    const line1 = readFileSync(join(ref, "metrics.jsonl"), "utf8").split("\n")[0].length + 1;
    const budget = size(join(ref, "config.json")) + line1 + size(join(ref, "checkpoints", "step-1")) + 60;
    const run = join(root, "run");
    const r = cli(["train", "--steps", "4", "--save-every", "1", ...FAST, ...NO_TB, "--out", run], {
      MOE8_FAULT_ENOSPC_AFTER: String(budget),
    });
    expect(r.status, r.stderr).toBe(2);
    expect(r.stderr.trim()).toMatch(
      /^error: cannot write .*run\/metrics\.jsonl: no space left on device \(ENOSPC\); the last good checkpoint is .*step-1 /,
    );
    const text = readFileSync(join(run, "metrics.jsonl"), "utf8");
    expect(text.endsWith("\n")).toBe(false); // torn
    const again = cli(["train", "--resume", run]);
    expect(again.status, again.stderr).toBe(0);
    expect(again.stderr).toMatch(
      /note: .*metrics\.jsonl: dropped a torn last line \(\d+ bytes without a newline\)/,
    );
    expect(stepsIn(run)).toEqual([1, 2, 3, 4]);
  }, 60_000);

  // A real file system that fills up: a 56 MiB tmpfs mounted in a user and mount namespace of its
  // own (unshare -rm), where the kernel allows one; CI runners that forbid it skip this.
  const canMount =
    spawnSync("unshare", ["-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"]).status === 0;
  it.skipIf(!canMount)(
    "a real full tmpfs: exit 2 naming the checkpoint; after space is freed, resume completes",
    () => {
      const mnt = tmp("tmpfs");
      const flags = [...FAST, "--steps", "6", "--save-every", "2", "--keep-last", "1"].join(" ");
      const script = [
        "set -u",
        `mount -t tmpfs -o size=56m tmpfs ${mnt}`,
        `head -c 26000000 /dev/zero > ${mnt}/filler`, // 26 MB: one 22 MB checkpoint fits, not two
        `bun ${CLI} train ${flags} --out ${mnt}/run 2>${mnt}/err1; echo "first=$?"`,
        `cat ${mnt}/err1; ls -a ${mnt}/run/checkpoints | tr '\\n' ' '; echo`,
        `rm ${mnt}/filler`,
        `bun ${CLI} train --resume ${mnt}/run >/dev/null 2>&1; echo "second=$?"`,
        `ls ${mnt}/run/checkpoints | tr '\\n' ' '; echo`,
      ].join("\n");
      const r = spawnSync("unshare", ["-rm", "sh", "-c", script], { cwd: ROOT, encoding: "utf8" });
      expect(r.stdout, r.stderr).toMatch(/first=2\n/);
      expect(r.stdout).toMatch(
        /error: cannot write checkpoint .*run\/checkpoints\/step-4: no space left on device \(ENOSPC\); nothing of it was kept; the last good checkpoint is .*step-2/,
      );
      expect(r.stdout).toMatch(/\n\. \.\. step-2 \n/); // no temporary left behind
      expect(r.stdout).toMatch(/second=0\nstep-6 \n/);
    },
    120_000,
  );
});

describe("the run folder", () => {
  it("a kill during the first checkpoint leaves a folder that --out and --resume both start again", async () => {
    const root = tmp("first-ck");
    /** Runs until the first checkpoint's temporary directory exists, then SIGKILL. */
    const killInFirstCheckpoint = async (run: string) => {
      for (let attempt = 0; attempt < 5; attempt++) {
        const dir = `${run}-${attempt}`;
        const a = started(["train", "--steps", "4", "--save-every", "2", ...SLOW, "--out", dir]);
        const tmpSeen = () => checkpointsOf(dir).some((n) => n.startsWith(".tmp-step-2-"));
        await until(() => tmpSeen() || a.out.done, 60_000, 1);
        if (tmpSeen()) {
          a.child.kill("SIGKILL");
          await a.exit;
          if (!checkpointsOf(dir).includes("step-2")) return dir;
        }
        await a.exit;
      }
      throw new Error("never caught the first checkpoint being written");
    };
    const viaOut = await killInFirstCheckpoint(join(root, "out"));
    const r1 = cli(["train", "--steps", "4", "--save-every", "2", ...SLOW, "--out", viaOut]);
    expect(r1.status, r1.stderr).toBe(0);
    expect(r1.stderr).toMatch(/note: removed .*\.tmp-step-2-\d+ \(left by a killed run\)/);
    expect(r1.stderr).toMatch(/holds a run stopped before its first checkpoint: starting it again/);
    expect(stepsIn(viaOut)).toEqual([1, 2, 3, 4]);

    const viaResume = await killInFirstCheckpoint(join(root, "resume"));
    const r2 = cli(["train", "--resume", viaResume]);
    expect(r2.status, r2.stderr).toBe(0);
    expect(r2.stderr).toMatch(/has no checkpoint yet: starting it again from step 0/);
    expect(stepsIn(viaResume)).toEqual([1, 2, 3, 4]);
    expect(checkpointsOf(viaResume)).toEqual(["step-2", "step-4"]);
  }, 180_000);

  it("two trainers on one folder: the second is refused with exit 2, the first goes on untouched", async () => {
    const run = join(tmp("two"), "run");
    // Many steps, so the first is still running however fast the machine; SIGINT ends it after.
    const a = started(["train", "--steps", "1000", "--save-every", "1", ...SLOW, "--out", run]);
    await until(() => lastStep(run) >= 2 || a.out.done);
    const pid = a.child.pid;
    for (const args of [
      ["train", "--steps", "8", ...FAST, "--out", run],
      ["train", "--resume", run],
    ]) {
      const b = cli(args);
      expect(b.status).toBe(2);
      expect(b.stderr.trim()).toMatch(
        new RegExp(`^error: --(out|resume) .*run: another trainer \\(pid ${pid}\\) is using this run folder`),
      );
    }
    await until(() => lastStep(run) >= 4 || a.out.done); // a few more checkpoints of the first, pruned
    a.child.kill("SIGINT");
    expect(await a.exit, a.out.stderr).toEqual({ code: 0, signal: null });
    const stopped = Number(/stopped at step (\d+)/.exec(a.out.stdout)?.[1]);
    expect(stepsIn(run)).toEqual(Array.from({ length: stopped }, (_, i) => i + 1));
    expect(checkpointsOf(run)).toEqual([stopped - 2, stopped - 1, stopped].map((s) => `step-${s}`).sort());
    const e = cli([
      "eval",
      "--checkpoint",
      join(run, "checkpoints", `step-${stopped}`),
      "--data",
      "datasets/default",
      "--batches",
      "1",
    ]);
    expect(e.status, e.stderr).toBe(0);
  }, 120_000);

  it.skipIf(!canMount)(
    "a read-only file system: exit 2 naming the folder, for train and prepare-data",
    () => {
      const mnt = tmp("ro");
      const script = [
        `mount -t tmpfs -o ro,size=1m tmpfs ${mnt}`,
        `bun ${CLI} train --steps 2 ${FAST.join(" ")} --out ${mnt}/run; echo "train=$?"`,
        `bun ${CLI} prepare-data --input README.md --out ${mnt}/ds; echo "prepare=$?"`,
      ].join("\n");
      const r = spawnSync("unshare", ["-rm", "sh", "-c", script], { cwd: ROOT, encoding: "utf8" });
      expect(r.stdout).toBe("train=2\nprepare=2\n");
      expect(r.stderr).toBe(
        `error: --out ${mnt}/run: cannot create the folder: read-only file system (EROFS)\n` +
          `error: cannot write the dataset ${mnt}/ds: read-only file system (EROFS)\n`,
      );
    },
  );

  it.skipIf(isRoot)("a folder without write permission: exit 2 naming it", () => {
    const dir = tmp("unwritable");
    chmodSync(dir, 0o555);
    const r = cli(["train", "--steps", "2", ...FAST, "--out", join(dir, "run")]);
    expect(r.status).toBe(2);
    expect(r.stderr.trim()).toBe(
      `error: --out ${join(dir, "run")}: cannot create the folder: permission denied (EACCES)`,
    );
  });

  it("a stale lock (its process gone) is taken over", () => {
    const run = join(tmp("stale"), "run");
    mkdirSync(run, { recursive: true });
    const gone = spawnSync("true").pid;
    writeFileSync(join(run, ".lock"), JSON.stringify({ pid: gone, host: hostname(), start: null }));
    const r = cli(["train", "--steps", "2", ...FAST, "--out", run]);
    expect(r.status, r.stderr).toBe(0);
    expect(existsSync(join(run, ".lock"))).toBe(false);
  }, 60_000);
});

describe("checkpoints that verify but are malformed", () => {
  it("--resume skips them for the one before (a missing optimizer tensor, bad trainer-state fields)", () => {
    const run = join(tmp("malformed"), "run");
    expect(cli(["train", "--steps", "4", "--save-every", "2", ...FAST, "--out", run]).status).toBe(0);
    const last = join(run, "checkpoints", "step-4");
    const tampers: [(dir: string) => void, RegExp][] = [
      [
        (d) => editTensors(d, "optimizer.safetensors", (t) => t.delete([...t.keys()][0])),
        /optimizer\.safetensors: tensor .*exp_avg.* is missing/,
      ],
      [(d) => editJson(d, "trainer-state.json", (s) => (s.data_cursor = null)), /data_cursor: Invalid input/],
      [(d) => editJson(d, "trainer-state.json", (s) => (s.step = "abc")), /step: Invalid input/],
      [
        (d) => editJson(d, "trainer-state.json", (s) => ((s.train_config as { lr: number }).lr = -1)),
        /train_config\.lr: Too small/,
      ],
    ];
    for (const [tamper, why] of tampers) {
      tamper(last);
      const r = cli(["train", "--resume", run]);
      expect(r.status, r.stderr).toBe(0);
      expect(r.stderr).toMatch(new RegExp(`note: skipping .*step-4: .*${why.source}`));
      expect(r.stdout).toMatch(/resuming .* from .*step-2 \(step 2\/4\)/);
      expect(stepsIn(run)).toEqual([1, 2, 3, 4]);
    }
  }, 120_000);

  it("a torn last metrics line is dropped; a damaged line before it is refused, naming it", () => {
    const run = join(tmp("metrics"), "run");
    expect(cli(["train", "--steps", "4", "--save-every", "2", ...FAST, "--out", run]).status).toBe(0);
    const path = join(run, "metrics.jsonl");
    const lines = readFileSync(path, "utf8").split("\n");
    // Steps 1-2 kept by the checkpoint, a torn step 3: the run was cut while writing it.
    writeFileSync(path, `${lines.slice(0, 2).join("\n")}\n{"step":3,"loss":4.`);
    editJson(join(run, "checkpoints", "step-4"), "trainer-state.json", (s) => (s.step = "bad"));
    const r = cli(["train", "--resume", run]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/dropped a torn last line/);
    expect(stepsIn(run)).toEqual([1, 2, 3, 4]);
    writeFileSync(path, `${lines[0]}\n{"step": 2, "lo\n${lines.slice(2).join("\n")}`);
    editJson(join(run, "checkpoints", "step-4"), "trainer-state.json", (s) => (s.step = "bad"));
    const bad = cli(["train", "--resume", run]);
    expect(bad.status).toBe(2);
    expect(bad.stderr.trim().split("\n").at(-1)).toMatch(
      /^error: .*metrics\.jsonl: line 2 is damaged \(not a metrics object\)/,
    );
  }, 60_000);
});
