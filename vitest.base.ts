// Shared vitest settings for every workspace package: separate processes (forks), never vmThreads,
// because the native addon and typed-array-heavy numerics must run in a real Node process.
import { fileURLToPath } from "node:url";
import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    pool: "forks",
    include: ["test/**/*.test.ts", "*.test.ts"],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Tests' temporary folders live under one folder per run, removed at its end (vitest.tmp-setup.ts).
    globalSetup: [fileURLToPath(new URL("./vitest.tmp-setup.ts", import.meta.url))],
  },
});
