// The design docs stay in step with the code: every MOE8_* variable the code reads is documented in
// docs/environment.md (and nothing else is), and comments cite docs/ that exist, never the spec
// files outside the repository.
import { readdirSync, readFileSync } from "node:fs";
import { extname, join, relative } from "node:path";
import { describe, expect, it } from "vitest";
import { ROOT } from "./helpers.ts";

const SOURCE = new Set([".ts", ".mjs", ".rs", ".cu", ".cuh", ".sh", ".py", ".md"]);
const SKIP = new Set(["node_modules", "target", ".git", "datasets", "runs", ".gpu-bundle"]);

/** Source and documentation files of the repository, as paths relative to its root. */
function files(dir = ROOT): string[] {
  const out: string[] = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    if (SKIP.has(e.name)) continue;
    const path = join(dir, e.name);
    if (e.isDirectory()) out.push(...files(path));
    else if (SOURCE.has(extname(e.name)) || e.name === "run") out.push(relative(ROOT, path));
  }
  return out;
}

const all = files();
const text = (path: string) => readFileSync(join(ROOT, path), "utf8");
const names = (s: string) => new Set(s.match(/\bMOE8_[A-Z0-9_]+/g) ?? []);

describe("docs", () => {
  it("docs/environment.md lists every MOE8_* variable the code reads, and only those", () => {
    const read = new Set<string>();
    for (const f of all) if (!f.endsWith(".md")) for (const n of names(text(f))) read.add(n);
    const documented = names(text("docs/environment.md"));
    expect([...read].filter((n) => !documented.has(n)).sort()).toEqual([]);
    expect([...documented].filter((n) => !read.has(n)).sort()).toEqual([]);
  });

  it("cites docs/ files that exist, and no spec outside the repository", () => {
    const docs = new Set(readdirSync(join(ROOT, "docs")));
    const bad: string[] = [];
    for (const f of all) {
      const s = text(f);
      for (const m of s.matchAll(/\bdocs\/([\w-]+\.md)/g)) if (!docs.has(m[1])) bad.push(`${f}: ${m[0]}`);
      for (const m of s.matchAll(/\b(?:FP8|MODEL|RUNTIME)\.md\b|shared\/spec/g)) bad.push(`${f}: ${m[0]}`);
    }
    expect(bad).toEqual([]);
  });

  it("runtime rules are cited by the numbers docs/runtime.md gives them", () => {
    const rules = [...text("docs/runtime.md").matchAll(/^## (\d)\. /gm)].map((m) => Number(m[1]));
    expect(rules).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    const bad: string[] = [];
    for (const f of all)
      for (const m of text(f).matchAll(/docs\/runtime\.md rules? (\d+)(?:-(\d+))?/g))
        for (const n of [m[1], m[2]])
          if (n !== undefined && !rules.includes(Number(n))) bad.push(`${f}: ${m[0]}`);
    expect(bad).toEqual([]);
  });
});
