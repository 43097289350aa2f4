// Finding the input files of prepareData: files given directly, or every supported file under a
// folder, in sorted order so the same inputs always give the same dataset. Supported: .txt, .md,
// .jsonl and .parquet, the first three also gzipped (.txt.gz, a bare .gz is text); Arrow IPC streams
// (.arrow) with a text column; a Hugging Face `datasets.save_to_disk` folder (its state.json lists the
// data-*.arrow files, in order); and, given directly, a file without an extension that is UTF-8 text.
import { closeSync, existsSync, openSync, readSync } from "node:fs";
import { readdir } from "node:fs/promises";
import { basename, extname, join, relative } from "node:path";
import { UsageError } from "@moe8/fp8-core";
import { brief, reason } from "../errors.ts";
import { checkRegular, readRegularFile, statOrThrow } from "../files.ts";

export type InputKind = "text" | "jsonl" | "parquet" | "arrow";

export interface InputFile {
  path: string;
  /** Path recorded in the manifest: relative to the folder given, under that folder's name. */
  name: string;
  kind: InputKind;
  /** Read through gunzip (`bytes` counts the compressed file). */
  gzip: boolean;
  bytes: number;
}

const KINDS: Record<string, InputKind> = {
  ".txt": "text",
  ".md": "text",
  ".jsonl": "jsonl",
  ".parquet": "parquet",
  ".arrow": "arrow",
};
const SUPPORTED = ".txt, .md, .jsonl (also .gz), .parquet, .arrow, or a Hugging Face datasets folder";

/** The kind of a file by its name (`x.txt.gz` is gzipped text, `x.gz` too), or null. */
function kindByName(path: string): { kind: InputKind; gzip: boolean } | null {
  const lower = basename(path).toLowerCase();
  const gzip = lower.endsWith(".gz");
  const inner = gzip ? lower.slice(0, -3) : lower;
  const kind = KINDS[extname(inner)] ?? (gzip && extname(inner) === "" ? "text" : undefined);
  if (!kind || (gzip && kind !== "text" && kind !== "jsonl")) return null;
  return { kind, gzip };
}

/** Whether a file's first 64 KiB are UTF-8 text without NUL bytes (for files without an extension). */
function looksLikeText(path: string): boolean {
  const fd = openSync(path, "r");
  try {
    const head = Buffer.alloc(1 << 16);
    const n = readSync(fd, head, 0, head.length, 0);
    if (head.subarray(0, n).includes(0)) return false;
    new TextDecoder("utf-8", { fatal: true }).decode(head.subarray(0, n), { stream: true });
    return true;
  } catch {
    return false;
  } finally {
    closeSync(fd);
  }
}

/**
 * What a raw input that prepareData reads (and a loader cannot) is, by name or content: "text",
 * "jsonl", "parquet" (maybe gzipped); null for anything else, Arrow files included.
 */
export function rawInputKind(path: string): string | null {
  const byName = kindByName(path);
  if (byName) return byName.kind === "arrow" ? null : `${byName.kind}${byName.gzip ? " (gzip)" : ""}`;
  return extname(path) === "" && looksLikeText(path) ? "text" : null;
}

/**
 * Refuses raw input given where a token dataset is expected (train --data, eval --data): a folder
 * without manifest.json, or a text, JSONL or Parquet file; the message says how to make a dataset.
 */
export function refuseRawInput(path: string, isDir: boolean): void {
  const prepare = `make one with \`moe8 prepare-data --input ${path} --out datasets/NAME\` and use that`;
  if (isDir && !existsSync(join(path, "manifest.json")))
    throw new UsageError(`${path}: not a dataset folder (no manifest.json); ${prepare}`);
  const raw = isDir ? null : rawInputKind(path);
  if (raw) throw new UsageError(`${path}: a ${raw} file, not a token dataset; ${prepare}`);
}

/** A `datasets.save_to_disk` folder's Arrow files, in the order its state.json lists them; null if it is not one. */
async function hfDatasetFiles(dir: string): Promise<string[] | null> {
  const statePath = join(dir, "state.json");
  const st = await statOrThrow(statePath, "state.json").catch(() => null);
  if (!st?.isFile()) return null;
  let state: { _data_files?: { filename?: unknown }[] };
  try {
    state = JSON.parse((await readRegularFile(statePath, "state.json", 16 * 2 ** 20)).toString("utf8"));
  } catch (err) {
    throw new UsageError(`${statePath}: not valid JSON (${reason(err)})`);
  }
  const listed = state?._data_files;
  if (!Array.isArray(listed) || listed.length === 0)
    throw new UsageError(`${statePath}: field "_data_files" must list the dataset's .arrow files`);
  return listed.map((f, i) => {
    const name = f?.filename;
    if (typeof name !== "string" || !name.endsWith(".arrow") || name.includes("/") || name.includes("\\"))
      throw new UsageError(
        `${statePath}: _data_files[${i}] must name an .arrow file in its folder, got ${brief(name)}`,
      );
    return join(dir, name);
  });
}

export async function listInputs(inputs: string[]): Promise<InputFile[]> {
  if (inputs.length === 0) throw new UsageError("--input: no input files or folders given");
  const files: InputFile[] = [];
  const add = async (path: string, name: string, kind: InputKind, gzip: boolean) => {
    const st = await statOrThrow(path, "input");
    checkRegular(st, path, "input");
    files.push({ path, name, kind, gzip, bytes: st.size });
  };
  for (const input of inputs) {
    const st = await statOrThrow(input, "input file or folder");
    if (st.isDirectory()) {
      const found = await walk(input);
      if (found.length === 0) throw new UsageError(`${input}: no input files in this folder (${SUPPORTED})`);
      for (const f of found)
        await add(f.path, join(basename(input), relative(input, f.path)), f.kind, f.gzip);
      continue;
    }
    checkRegular(st, input, "input");
    const byName = kindByName(input);
    if (byName) await add(input, basename(input), byName.kind, byName.gzip);
    else if (extname(input) === "" && looksLikeText(input)) await add(input, basename(input), "text", false);
    else
      throw new UsageError(
        `${input}: unsupported input type (expected ${SUPPORTED}; a file without an extension must be UTF-8 text)`,
      );
  }
  return files;
}

async function walk(dir: string): Promise<{ path: string; kind: InputKind; gzip: boolean }[]> {
  const hf = await hfDatasetFiles(dir);
  if (hf) return hf.map((path) => ({ path, kind: "arrow" as const, gzip: false }));
  const entries = (await readdir(dir, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : 1));
  const out: { path: string; kind: InputKind; gzip: boolean }[] = [];
  for (const e of entries) {
    const path = join(dir, e.name);
    if (e.isDirectory()) out.push(...(await walk(path)));
    else if (e.isFile()) {
      const k = kindByName(e.name);
      if (k) out.push({ path, ...k });
    }
  }
  return out;
}
