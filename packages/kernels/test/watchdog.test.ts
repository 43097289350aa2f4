// The watchdog over other ranks' processes (src/watchdog.rs): a process whose JavaScript thread is
// blocked (as a rank waiting in NCCL for a dead peer is, inside the device read) still ends, with the
// run's note, once a watched process is gone, a zombie not yet reaped included; unwatch() stops it.
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { loadNative } from "../src/index.ts";

const addonPath = fileURLToPath(new URL("../native.cjs", import.meta.url));
const linux = process.platform === "linux";

/**
 * A process that starts a sleeping child (printing its pid), watches it, then blocks its own thread
 * for `blockMs` (Atomics.wait: no event loop, so the child is never reaped once it dies).
 */
function watcher(
  blockMs: number,
  extra: string,
): Promise<{ code: number | null; stderr: string; ms: number }> {
  const js = `const a = require(${JSON.stringify(addonPath)});
    const { spawn } = require("node:child_process");
    const child = spawn(process.execPath, ["-e", "setTimeout(() => {}, 60000)"], { stdio: "ignore" });
    a.watchProcesses([child.pid], [7], "rank {rank} (process {pid}) is gone: the run stopped at step 0", 300);
    ${extra}
    console.log(child.pid);
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ${blockMs});
    child.kill("SIGKILL");`;
  return new Promise((done) => {
    const t0 = performance.now();
    const p = spawn(process.execPath, ["-e", js], { stdio: ["ignore", "pipe", "pipe"] });
    let stderr = "";
    p.stderr.on("data", (d) => {
      stderr += d;
    });
    p.stdout.on("data", (d) => {
      // The grandchild: killed from here while the watcher's thread is blocked.
      const pid = Number(String(d).trim());
      if (pid > 0) setTimeout(() => process.kill(pid, "SIGKILL"), 200);
    });
    p.on("exit", (code) => done({ code, stderr, ms: performance.now() - t0 }));
  });
}

describe.skipIf(!linux || typeof loadNative().addon?.watchProcesses !== "function")("rank watchdog", () => {
  it("ends a blocked process with the note once a watched process is gone (exit 3)", async () => {
    const r = await watcher(
      20_000,
      "a.setWatchNote('rank {rank} (process {pid}) is gone: the run stopped at step 12');",
    );
    expect(r.code, r.stderr).toBe(3);
    expect(r.stderr).toMatch(/^rank 7 \(process \d+\) is gone: the run stopped at step 12\n$/);
    expect(r.ms).toBeLessThan(10_000);
  }, 30_000);

  it("unwatch() leaves the process alone", async () => {
    const r = await watcher(1_500, "a.unwatch();");
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe("");
  }, 30_000);
});
