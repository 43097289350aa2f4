// Compiles every CUDA kernel source with NVRTC for sm_90a, without a GPU, and checks every entry
// point's parameters in the PTX against the signature table launches are typed from
// (scripts/nvrtc-check.py).
// Needs python3 and the `nvidia-cuda-nvrtc` wheel (CI installs them: see .ci/run); elsewhere the
// test is skipped when they are missing, but in CI (CI=true) a missing NVRTC is a failure.
import { spawnSync } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
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

// The addon gives NVRTC no include path: src/cuda/nvrtc.rs replaces each `#include "<header>"` of
// a module with the text of a header in its HEADERS table (nvrtc-check.py takes any file of the
// kernels folder), so a header missing from that table would compile here and fail on the GPU.
describe("CUDA kernel headers", () => {
  it("every header a module includes is one the addon inlines", () => {
    const kdir = join(root, "packages", "kernels", "src", "cuda", "kernels");
    const nvrtcRs = readFileSync(join(root, "packages", "kernels", "src", "cuda", "nvrtc.rs"), "utf8");
    const table = nvrtcRs.slice(
      nvrtcRs.indexOf("pub const HEADERS"),
      nvrtcRs.indexOf("];", nvrtcRs.indexOf("pub const HEADERS")),
    );
    const inlined = new Set(
      [...table.matchAll(/\(\s*"([\w.]+)",\s*include_str!\("kernels\/([\w.]+)"\),?\s*\)/g)].map((m) => {
        expect(m[2]).toBe(m[1]);
        return m[1];
      }),
    );
    expect(inlined.has("sm90.cuh")).toBe(true);
    const included = readdirSync(kdir)
      .filter((f) => f.endsWith(".cu"))
      .flatMap((f) =>
        [...readFileSync(join(kdir, f), "utf8").matchAll(/^\s*#include "([\w.]+)"\s*$/gm)].map(
          (m) => `${f}: ${m[1]}`,
        ),
      );
    expect(included.length).toBeGreaterThan(0);
    expect(included.filter((i) => !inlined.has(i.split(": ")[1]))).toEqual([]);
  });
});
