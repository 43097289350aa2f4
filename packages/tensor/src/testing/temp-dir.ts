// Temporary folders for tests. Under vitest they go in the run's folder (MOE8_TEST_TMP, made and
// removed by vitest.tmp-setup.ts at the repository root): tests that made their own folders with
// mkdtempSync and left them behind had filled 67 GB of a developer machine's /tmp after a few hundred
// runs (a tiny run's checkpoints are about 5 MB each, a hostile-input folder 484 MB).
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** A new empty folder `moe8-<prefix>-XXXXXX` in the test run's folder (or the system's when run alone). */
export function tempDir(prefix: string): string {
  return mkdtempSync(join(process.env.MOE8_TEST_TMP ?? tmpdir(), `moe8-${prefix}-`));
}
