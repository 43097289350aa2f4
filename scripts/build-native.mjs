#!/usr/bin/env node
// Builds the @moe8/kernels napi-rs addon when a Rust toolchain is present.
// Run by `bun install` (root postinstall) and by `turbo run build`. Without cargo the project still
// installs and runs on the pure-TypeScript backend; `bun run doctor` then says why native is missing.
// --required (turbo build): a missing toolchain is still fine, but a failed build is an error.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const crate = join(root, "packages", "kernels");
const required = process.argv.includes("--required") || process.env.CI === "true";

if (process.env.MOE8_SKIP_NATIVE_BUILD === "1") {
  console.log("[moe8] MOE8_SKIP_NATIVE_BUILD=1: not building the native addon");
  process.exit(0);
}
const cargo = spawnSync("cargo", ["--version"], { encoding: "utf8" });
if (cargo.status !== 0) {
  console.log(
    "[moe8] cargo not found: the native cpu/cuda backends are not built; the ts backend will be used.",
  );
  console.log("[moe8] install Rust (https://rustup.rs) and run `bun run build` to build them.");
  process.exit(0);
}
const napi = join(crate, "node_modules", ".bin", "napi");
if (!existsSync(napi)) {
  console.log(`[moe8] ${napi} is missing (run bun install first); not building the native addon`);
  process.exit(required ? 1 : 0);
}
const args = ["build", "--platform", "--release", "--js", "native.cjs", "--dts", "native.d.cts"];
// The cuda feature loads CUDA dynamically: it builds without a toolkit and runs without a GPU.
if (process.env.MOE8_CUDA !== "0") args.push("--features", "cuda");
console.log(`[moe8] building the native addon: napi ${args.join(" ")} (${cargo.stdout.trim()})`);
const r = spawnSync(napi, args, { cwd: crate, stdio: "inherit" });
if (r.status !== 0) {
  console.error(`[moe8] native addon build failed (exit ${r.status}); the ts backend still works.`);
  process.exit(required ? 1 : 0);
}
