// Finding the input files of prepareData: files given directly, or every supported file under a
// folder, in sorted order so the same inputs always give the same dataset.
import { readdir } from "node:fs/promises";
import { basename, extname, join, relative } from "node:path";
import { UsageError } from "@moe8/fp8-core";
import { checkRegular, statOrThrow } from "../files.ts";

export type InputKind = "text" | "jsonl" | "parquet";

export interface InputFile {
  path: string;
  /** Path recorded in the manifest: relative to the folder given, under that folder's name. */
  name: string;
  kind: InputKind;
  bytes: number;
}

const KINDS: Record<string, InputKind> = {
  ".txt": "text",
  ".md": "text",
  ".jsonl": "jsonl",
  ".parquet": "parquet",
};

export async function listInputs(inputs: string[]): Promise<InputFile[]> {
  if (inputs.length === 0) throw new UsageError("--input: no input files or folders given");
  const files: InputFile[] = [];
  for (const input of inputs) {
    const st = await statOrThrow(input, "input file or folder");
    if (st.isDirectory()) {
      const found = await walk(input);
      if (found.length === 0)
        throw new UsageError(`${input}: no .txt, .md, .jsonl or .parquet files in this folder`);
      for (const path of found) {
        const name = join(basename(input), relative(input, path));
        files.push({
          path,
          name,
          kind: KINDS[extname(path)],
          bytes: (await statOrThrow(path, "input")).size,
        });
      }
    } else {
      const kind = KINDS[extname(input).toLowerCase()];
      if (!kind)
        throw new UsageError(`${input}: unsupported input type (expected .txt, .md, .jsonl or .parquet)`);
      checkRegular(st, input, "input");
      files.push({ path: input, name: basename(input), kind, bytes: st.size });
    }
  }
  return files;
}

async function walk(dir: string): Promise<string[]> {
  const entries = (await readdir(dir, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : 1));
  const out: string[] = [];
  for (const e of entries) {
    const path = join(dir, e.name);
    if (e.isDirectory()) out.push(...(await walk(path)));
    else if (e.isFile() && KINDS[extname(e.name).toLowerCase()]) out.push(path);
  }
  return out;
}
