// Compiles every CUDA kernel source with NVRTC for sm_90a, without a GPU, and checks every entry
// point's parameters in the PTX against the signature table launches are typed from
// (scripts/nvrtc-check.py).
// Needs python3 and the `nvidia-cuda-nvrtc` wheel (CI installs them: see .ci/run); elsewhere the
// test is skipped when they are missing, but in CI (CI=true) a missing NVRTC is a failure.
import { spawnSync } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const script = join(root, "scripts", "nvrtc-check.py");

function run() {
  return spawnSync("python3", [script], { encoding: "utf8", timeout: 300_000 });
}

const probe = spawnSync(
  "python3",
  [
    "-c",
    "import nvidia, glob, os, sys; sys.exit(0 if any(glob.glob(os.path.join(p, '*', 'lib', 'libnvrtc.so*')) for p in nvidia.__path__) else 1)",
  ],
  {
    encoding: "utf8",
  },
);
const available = probe.status === 0;
const inCi = process.env.CI === "true";

describe("CUDA kernel sources", () => {
  it.skipIf(!available && !inCi)(
    "compile with NVRTC for sm_90a, with the parameters of the signature table",
    () => {
      const r = run();
      const out = `${r.stdout ?? ""}${r.stderr ?? ""}`;
      expect(r.status, out).toBe(0);
      expect(out).toMatch(/kernel modules compiled/);
      expect(out).not.toMatch(/^FAIL/m);
      expect(out).toMatch(/entry points checked against .*: all match/);
    },
    300_000,
  );
});
