// A kernel launch that disagrees with its kernel's .cu declaration does not compile: tsc rejects
// each deliberately wrong launch of fixtures/launch-wrong.ts at its line, with the message its
// marker names, and accepts fixtures/launch-right.ts (the same launches done right), so the check
// cannot pass by failing for another reason.
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";

const fixtures = join(dirname(fileURLToPath(import.meta.url)), "fixtures");
const root = join(fixtures, "..", "..", "..", "..");
const tsc = createRequire(join(root, "package.json")).resolve("typescript/bin/tsc");
const tmp = mkdtempSync(join(tmpdir(), "moe8-launch-types-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** tsc --noEmit over one fixture with the repository's compiler options: exit status and errors by line. */
function typecheck(file: string) {
  const config = join(tmp, `${file}.json`);
  writeFileSync(
    config,
    JSON.stringify({
      extends: join(root, "tsconfig.base.json"),
      compilerOptions: { typeRoots: [join(root, "node_modules", "@types")] },
      files: [join(fixtures, file)],
    }),
  );
  const r = spawnSync(process.execPath, [tsc, "--noEmit", "--pretty", "false", "-p", config], {
    encoding: "utf8",
    timeout: 120_000,
  });
  const errors = new Map<string, string>(); // "file:line" -> the messages reported there
  let at = "";
  for (const line of (r.stdout ?? "").split("\n")) {
    const m = /^(.+?)\((\d+),\d+\): error (TS\d+: .*)$/.exec(line);
    if (m) at = `${m[1].split(/[\\/]/).pop()}:${m[2]}`;
    if (at) errors.set(at, `${errors.get(at) ?? ""}${m ? m[3] : line}\n`);
  }
  return { status: r.status, output: `${r.stdout}${r.stderr}`, errors };
}

/** The fixtures' lines with errors ("launch-wrong.ts:10"). */
const inFixture = (errors: Map<string, string>) => [...errors.keys()].filter((k) => k.startsWith("launch-"));

describe("typed kernel launches", () => {
  it("accept launches whose arguments match the kernel", () => {
    const r = typecheck("launch-right.ts");
    // tsc ran; a type error elsewhere in the repository is the repository typecheck's to report.
    expect(r.status === 0 || r.errors.size > 0, r.output).toBe(true);
    expect(inFixture(r.errors), r.output).toEqual([]);
  }, 120_000);

  it("reject a missing, extra or misspelt argument, a wrong kernel name and a wrong value type", () => {
    const lines = readFileSync(join(fixtures, "launch-wrong.ts"), "utf8").split("\n");
    const want = new Map<string, string>();
    lines.forEach((l, i) => {
      const m = /\/\/ error: (.*)$/.exec(l);
      if (m) want.set(`launch-wrong.ts:${i + 1}`, m[1]);
    });
    expect(want.size).toBeGreaterThanOrEqual(5);
    const r = typecheck("launch-wrong.ts");
    expect(r.status).not.toBe(0);
    expect(inFixture(r.errors).sort(), r.output).toEqual([...want.keys()].sort());
    for (const [at, text] of want) expect(r.errors.get(at), at).toContain(text);
  }, 120_000);
});
