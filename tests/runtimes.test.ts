// The CLI and the native addon must work under all three runtimes users run moe8 with.
import { execFileSync, spawnSync } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const cli = join(root, "apps/trainer/src/cli.ts");
const has = (cmd: string) => spawnSync(cmd, ["--version"]).status === 0;
// In CI every runtime is installed by .ci/run, so a missing one is a failure there, not a skip.
const required = process.env.CI === "true";

const runtimes: [string, string, string[]][] = [
  ["bun", "bun", [cli, "doctor", "--json"]],
  ["node (tsx)", process.execPath, ["--import", "tsx", cli, "doctor", "--json"]],
  ["deno", "deno", ["run", "--allow-all", cli, "doctor", "--json"]],
];

describe("doctor under every runtime", () => {
  for (const [name, cmd, args] of runtimes) {
    const present = cmd === process.execPath || has(cmd);
    it.skipIf(!present && !required)(`${name}: native addon loaded, cpu backend available`, () => {
      const out = execFileSync(cmd, args, {
        cwd: root,
        encoding: "utf8",
        env: { ...process.env, NO_COLOR: "1" },
      });
      const r = JSON.parse(out.trim().split("\n").at(-1)!);
      expect(r.native).toMatchObject({ loaded: true, reason: null });
      expect(r.backends).toEqual(expect.arrayContaining(["ts", "cpu"]));
      expect(r.runtime.name).toBe(name.split(" ")[0]);
    });
  }
});
