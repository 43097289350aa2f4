// `moe8 export --checkpoint DIR --out DIR [--dtype bf16|f32]`: a standalone Hugging Face model folder
// made from a checkpoint: model.safetensors (BF16 by default, what people share; f32 keeps the
// checkpoint's weights bit for bit), config.json, generation_config.json, tokenizer.json and
// tokenizer_config.json, without the optimizer state, trainer-state.json and checksums.json that
// only resuming needs. The folder is written beside --out under a temporary name, fsynced and renamed
// into place: it appears complete or not at all.
import { existsSync, mkdirSync, readdirSync, renameSync, rmdirSync, rmSync, statSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { hfTokenizerFiles, ioReason } from "@moe8/data";
import { encodeBf16, UsageError } from "@moe8/fp8-core";
import { checkpointTensorShapes, hfConfigText, hfGenerationConfig } from "@moe8/model";
import { type FlagSpec, parseArgs } from "../args.ts";
import { checkTensorSet, readCheckpoint } from "../run/checkpoint.ts";
import { checkpointTokenizer } from "../run/checkpoint-tokenizer.ts";
import { fsyncDir, writeFileDurable } from "../run/io.ts";
import { checkpointModelConfig } from "../run/load-model.ts";
import { type StTensor, writeSafetensors } from "../run/safetensors.ts";

export const EXPORT_FLAGS: FlagSpec = {
  checkpoint: "string",
  out: "string",
  dtype: "string",
  debug: "boolean",
};

/** --out must be new or an empty folder: an export never replaces files it did not write. */
function checkOut(out: string): void {
  const st = statSync(out, { throwIfNoEntry: false });
  if (!st) return;
  if (!st.isDirectory()) throw new UsageError(`--out ${out}: exists and is not a folder`);
  if (readdirSync(out).length > 0) throw new UsageError(`--out ${out}: folder is not empty`);
}

export async function exportCommand(argv: string[]): Promise<number> {
  const { flags } = parseArgs(argv, EXPORT_FLAGS);
  if (!flags.checkpoint) throw new UsageError("export needs --checkpoint DIR");
  if (!flags.out) throw new UsageError("export needs --out DIR");
  const dtype = String(flags.dtype ?? "bf16");
  if (dtype !== "bf16" && dtype !== "f32") throw new UsageError(`--dtype ${dtype}: use bf16 or f32`);
  const dir = String(flags.checkpoint);
  const out = resolve(String(flags.out));
  checkOut(out);
  const ck = readCheckpoint(dir, false);
  // Held to what eval and sample check (run/load-model.ts), without building the model.
  const cfg = checkpointModelConfig(dir, ck.config);
  checkTensorSet(join(dir, "model.safetensors"), ck.model, checkpointTensorShapes(cfg));
  const tok = await checkpointTokenizer(dir, ck.state, cfg.vocab_size);
  const context = ck.state.train_config.seqLen;
  const tensors = new Map<string, StTensor>();
  for (const [name, t] of ck.model)
    tensors.set(
      name,
      dtype === "bf16"
        ? { dtype: "BF16", shape: t.shape, data: encodeBf16(t.data) }
        : { dtype: "F32", shape: t.shape, data: t.data },
    );
  const text: Record<string, string> = {
    "config.json": hfConfigText({ ...ck.config, torch_dtype: dtype === "bf16" ? "bfloat16" : "float32" }),
    "generation_config.json": `${JSON.stringify(hfGenerationConfig(context, tok.eotId), null, 2)}\n`,
    ...hfTokenizerFiles(tok, context),
  };
  const tmp = join(dirname(out), `.${basename(out)}.tmp-${process.pid}`);
  try {
    mkdirSync(dirname(out), { recursive: true });
    rmSync(tmp, { recursive: true, force: true });
    mkdirSync(tmp);
    writeSafetensors(join(tmp, "model.safetensors"), tensors, { format: "pt" });
    for (const [name, t] of Object.entries(text)) writeFileDurable(join(tmp, name), t);
    fsyncDir(tmp);
    if (existsSync(out)) rmdirSync(out); // the empty folder checkOut allowed
    renameSync(tmp, out);
    fsyncDir(dirname(out));
  } catch (err) {
    rmSync(tmp, { recursive: true, force: true });
    if (err instanceof UsageError) throw err;
    throw new UsageError(`cannot write ${out}: ${ioReason(err)}; nothing of it was kept`);
  }
  console.log(`exported ${dir} to ${out} (${dtype}, ${tensors.size} tensors)`);
  return 0;
}
