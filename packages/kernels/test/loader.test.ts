import { execFileSync } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { loadNative } from "../src/index.ts";

const here = dirname(fileURLToPath(import.meta.url));

// Runs the loader in a fresh process so the environment variable is seen at load time.
function statusIn(env: Record<string, string>) {
  const script = `import { loadNative } from ${JSON.stringify(join(here, "../src/index.ts"))};
const s = loadNative(); console.log(JSON.stringify({ loaded: s.loaded, reason: s.reason, info: s.addon?.info() ?? null }));`;
  const out = execFileSync(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
    env: { ...process.env, ...env },
    encoding: "utf8",
  });
  return JSON.parse(out.trim().split("\n").at(-1)!);
}

describe("native addon loader", () => {
  it("loads the addon built by `bun install` and reports info()", () => {
    const s = loadNative();
    expect(s.reason).toBeNull();
    expect(s.loaded).toBe(true);
    const info = s.addon!.info();
    expect(info.version).toMatch(/^\d+\.\d+\.\d+/);
    expect(info.target).toContain(process.arch === "x64" ? "x86_64" : "aarch64");
    expect(["scalar", "neon", "avx2+fma", "avx512f"]).toContain(info.simd);
    expect(info.threads).toBeGreaterThan(0);
    expect(typeof info.cudaCompiled).toBe("boolean");
  });

  it("MOE8_SIMD=scalar forces the scalar fallback", () => {
    expect(statusIn({ MOE8_SIMD: "scalar" }).info.simd).toBe("scalar");
  });

  it("MOE8_NO_NATIVE=1 reports the addon absent, with the reason", () => {
    const s = statusIn({ MOE8_NO_NATIVE: "1" });
    expect(s.loaded).toBe(false);
    expect(s.reason).toMatch(/MOE8_NO_NATIVE/);
    expect(s.info).toBeNull();
  });
});
