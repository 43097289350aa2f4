#!/usr/bin/env node
// Builds the @moe8/kernels napi-rs addon when a Rust toolchain is present.
// Run by `bun install` (root postinstall) and by `turbo run build`. Without cargo the project still
// installs and runs on the pure-TypeScript backend; `bun run doctor` then says why native is missing.
// --required (turbo build): a missing toolchain is still fine, but a failed build is an error.
//
// An addon that is current is not built again: after a build, target/moe8-native-build.json records
// a sha256 of everything it was built from (the crate's manifests, build.rs, every non-TypeScript
// file under src/: Rust, CUDA and the files they include) with the napi arguments and the cargo
// version, and a run that finds the same digest and the outputs present does nothing. So the turbo
// build `bun run test` starts with costs a fraction of a second after `bun install` built the addon
// (napi's build re-links and rewrites native.cjs even when cargo has nothing to compile: about two
// minutes on two cores). A changed source, argument (MOE8_CUDA) or toolchain builds again.
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
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

/** The files the addon is built from, in a fixed order. */
function sources(dir = join(crate, "src")) {
  const out = [];
  for (const e of readdirSync(dir, { withFileTypes: true }).sort((a, b) => (a.name < b.name ? -1 : 1))) {
    const path = join(dir, e.name);
    if (e.isDirectory()) out.push(...sources(path));
    else if (!e.name.endsWith(".ts")) out.push(path);
  }
  return out;
}
const hash = createHash("sha256").update(JSON.stringify([args, cargo.stdout.trim()]));
for (const path of ["Cargo.toml", "Cargo.lock", "build.rs", "package.json"]
  .map((n) => join(crate, n))
  .concat(sources()))
  hash
    .update(`${relative(crate, path)}\0`)
    .update(readFileSync(path))
    .update("\0");
const digest = hash.digest("hex");
const stampPath = join(crate, "target", "moe8-native-build.json");
/** The addon as the stamp records it: its name, size and modification time. */
const addonId = (name) => {
  const st = statSync(join(crate, name), { throwIfNoEntry: false });
  return st ? { addon: name, size: st.size, mtimeMs: st.mtimeMs } : null;
};
let stamp = null;
try {
  stamp = JSON.parse(readFileSync(stampPath, "utf8"));
} catch {} // none yet, or unreadable: build
const now = stamp?.addon ? addonId(stamp.addon) : null;
if (
  stamp?.digest === digest &&
  now?.size === stamp.size &&
  now?.mtimeMs === stamp.mtimeMs &&
  existsSync(join(crate, "native.cjs")) &&
  existsSync(join(crate, "native.d.cts"))
) {
  console.log(
    `[moe8] the native addon ${stamp.addon} is current (built from these sources): not building it`,
  );
  process.exit(0);
}
// A build that fails or is killed half-way must not leave a stamp vouching for what it replaced.
rmSync(stampPath, { force: true });

console.log(`[moe8] building the native addon: napi ${args.join(" ")} (${cargo.stdout.trim()})`);
const r = spawnSync(napi, args, { cwd: crate, stdio: "inherit" });
if (r.status !== 0) {
  console.error(`[moe8] native addon build failed (exit ${r.status}); the ts backend still works.`);
  process.exit(required ? 1 : 0);
}
// The addon napi just wrote: the newest .node in the crate.
const addon = readdirSync(crate)
  .filter((n) => n.endsWith(".node"))
  .sort((a, b) => statSync(join(crate, b)).mtimeMs - statSync(join(crate, a)).mtimeMs)[0];
writeFileSync(stampPath, `${JSON.stringify({ digest, ...addonId(addon) }, null, 2)}\n`);
