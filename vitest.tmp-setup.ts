// vitest global setup: one temporary folder per test run, MOE8_TEST_TMP, under which tempDir
// (@moe8/tensor/testing) makes the tests' folders; the test processes and the CLI runs they start
// inherit it, and it is removed with everything in it when the run ends (MOE8_KEEP_TMP=1 keeps it).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export function setup(): () => void {
  const root = mkdtempSync(join(tmpdir(), "moe8-vitest-"));
  process.env.MOE8_TEST_TMP = root;
  return () => {
    if (process.env.MOE8_KEEP_TMP === "1") console.log(`test folders kept in ${root}`);
    else rmSync(root, { recursive: true, force: true });
  };
}
