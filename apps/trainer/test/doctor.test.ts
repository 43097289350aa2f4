import { execFileSync, spawnSync } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";

const cli = join(dirname(fileURLToPath(import.meta.url)), "../src/cli.ts");

function doctorJson(env: Record<string, string> = {}) {
  const out = execFileSync(process.execPath, ["--import", "tsx", cli, "doctor", "--json"], {
    env: { ...process.env, ...env },
    encoding: "utf8",
  });
  return JSON.parse(out);
}

describe("moe8 doctor", () => {
  it("reports the native addon loaded and the cpu backend available", () => {
    const r = doctorJson();
    expect(r.native).toMatchObject({ loaded: true, reason: null });
    expect(r.backends).toEqual(expect.arrayContaining(["ts", "cpu"]));
    expect(r.runtime.name).toBe("node");
    expect(r.arrow).toMatch(/^\d+\.\d+\.\d+$/);
    expect(r.cpu.cores).toBeGreaterThan(0);
  });

  it("falls back to the ts backend and says why when the addon is absent", () => {
    const r = doctorJson({ MOE8_NO_NATIVE: "1" });
    expect(r.native.loaded).toBe(false);
    expect(r.native.reason).toMatch(/MOE8_NO_NATIVE=1/);
    expect(r.backends).toEqual(["ts"]);
  });

  it("rejects an unknown command and an unknown flag with exit code 2 and one line", () => {
    for (const args of [["frobnicate"], ["doctor", "--jsn"]]) {
      const r = spawnSync(process.execPath, ["--import", "tsx", cli, ...args], { encoding: "utf8" });
      expect(r.status).toBe(2);
      expect(r.stderr.trim().split("\n")).toHaveLength(1);
      expect(r.stderr).toMatch(/^error: unknown (command|flag)/);
    }
  });
});
