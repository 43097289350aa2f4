// Running vitest from the repository root (one file or a few, while developing): the packages' shared
// settings, with every package's tests in reach. `bun run test` runs each package's own config.
import { defineConfig, mergeConfig } from "vitest/config";
import base from "./vitest.base.ts";

export default mergeConfig(
  base,
  defineConfig({
    test: { include: ["packages/*/test/**/*.test.ts", "apps/*/test/**/*.test.ts", "tests/*.test.ts"] },
  }),
);
