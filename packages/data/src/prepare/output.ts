// Where prepareData may write: `out` replaces what is there, so it must be new, an empty folder, or
// (asked for with overwrite) a previous dataset holding nothing but a dataset's files. An output
// inside an input (or the input itself) would be read while it is replaced: refused too.
import { lstat, readdir, realpath } from "node:fs/promises";
import { basename, dirname, isAbsolute, join, relative, resolve } from "node:path";
import { UsageError } from "@moe8/fp8-core";
import { brief, clip } from "../errors.ts";
import { errnoCode, ioReason } from "../files.ts";
import { MANIFEST_FILE, readManifest } from "../manifest.ts";

/** A dataset folder's own files: the manifest, the tokenizer and the shards. */
const DATASET_FILE = /^(manifest\.json|tokenizer\.json|shard-\d+\.arrows)$/;

/** The absolute path with symbolic links resolved, for the part of it that exists. */
async function realish(path: string): Promise<string> {
  const abs = resolve(path);
  try {
    return await realpath(abs);
  } catch {
    const parent = dirname(abs);
    return parent === abs ? abs : join(await realish(parent), basename(abs));
  }
}

const inside = (child: string, parent: string) => {
  const r = relative(parent, child);
  return r === "" || (!r.startsWith("..") && !isAbsolute(r));
};

export async function checkOutput(out: string, inputs: string[], overwrite: boolean): Promise<void> {
  if (out.trim() === "") throw new UsageError("--out: the output folder name is empty");
  const realOut = await realish(out);
  for (const input of inputs) {
    const realIn = await realish(input);
    if (inside(realOut, realIn))
      throw new UsageError(`--out ${clip(out)}: inside the input ${clip(input)} (it would be replaced)`);
    if (inside(realIn, realOut))
      throw new UsageError(
        `--out ${clip(out)}: the input ${clip(input)} is inside it (it would be replaced)`,
      );
  }
  let st: Awaited<ReturnType<typeof lstat>>;
  try {
    st = await lstat(out);
  } catch (err) {
    if (errnoCode(err) === "ENOENT") return;
    throw new UsageError(`--out ${clip(out)}: ${ioReason(err)}`);
  }
  if (st.isSymbolicLink())
    throw new UsageError(`--out ${clip(out)}: a symbolic link; name the folder itself`);
  if (!st.isDirectory()) throw new UsageError(`--out ${clip(out)}: exists and is not a folder`);
  const entries = await readdir(out);
  if (entries.length === 0) return;
  const foreign = entries.filter((n) => !DATASET_FILE.test(n));
  const isDataset =
    entries.includes(MANIFEST_FILE) &&
    (await readManifest(out).then(
      () => true,
      () => false,
    ));
  if (!isDataset || foreign.length > 0)
    throw new UsageError(
      `--out ${clip(out)}: exists and is not a dataset folder (${foreign.length ? `it holds ${brief(foreign[0])}` : "no valid manifest.json"}); refusing to replace it`,
    );
  if (!overwrite)
    throw new UsageError(`--out ${clip(out)}: already holds a dataset; pass --overwrite to replace it`);
}
