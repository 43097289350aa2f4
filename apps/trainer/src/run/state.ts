// trainer-state.json: what a checkpoint needs besides its tensors to continue a run exactly. It is
// validated field by field when read, so a damaged or edited file (a null data cursor that would
// silently restart the data, a step that is not a number, a negative learning rate) refuses that
// checkpoint instead of training on it.
import { UsageError } from "@moe8/fp8-core";
import { z } from "zod";
import { TrainConfigSchema, zodMessage } from "./config.ts";

const u32 = z
  .number()
  .int()
  .min(0)
  .max(2 ** 32 - 1);
const count = z.number().int().nonnegative();

const CursorSchema = z
  .object({
    epoch: count,
    docIndex: count,
    tokenOffset: count,
    rngState: z.array(u32).length(4),
    dataset: z.string().max(200),
  })
  .strict();

/** The tokenizer the run's data was made with (null: a bare .arrows file without a manifest). */
export const TokenizerIdSchema = z
  .object({ type: z.enum(["byte", "bpe"]), vocab_size: z.number().int().positive() })
  .strict();
export type TokenizerId = z.infer<typeof TokenizerIdSchema>;

export const TrainerStateSchema = z
  .object({
    version: z.literal(1),
    step: count,
    optimizer_step: count,
    data_cursor: CursorSchema,
    best_val_loss: z.number().nullable(),
    best_step: count.nullable(),
    policy: z.record(z.string(), z.unknown()),
    train_config: TrainConfigSchema,
    /** Absent in checkpoints written before it was recorded. */
    tokenizer: TokenizerIdSchema.nullable().optional(),
    /**
     * Where the run's length was changed by `--resume --steps` (run/schedule.ts): the learning rate
     * continues from this step's. Absent or null: the run has its first length.
     */
    schedule_from: z
      .object({ step: count, lr: z.number().nonnegative().max(10) })
      .strict()
      .nullable()
      .optional(),
  })
  .strict();

export type TrainerState = z.infer<typeof TrainerStateSchema>;

export function parseTrainerState(raw: unknown, source: string): TrainerState {
  const r = TrainerStateSchema.safeParse(raw);
  if (!r.success) throw new UsageError(zodMessage(source, r.error));
  const s = r.data;
  if (s.step > s.train_config.steps)
    throw new UsageError(`${source}: step ${s.step} is past the run's ${s.train_config.steps} steps`);
  if (s.optimizer_step > s.step)
    throw new UsageError(`${source}: optimizer_step ${s.optimizer_step} is past step ${s.step}`);
  if (s.schedule_from && s.schedule_from.step > s.step)
    throw new UsageError(`${source}: schedule_from.step ${s.schedule_from.step} is past step ${s.step}`);
  if (s.best_step !== null && s.best_step > s.step)
    throw new UsageError(`${source}: best_step ${s.best_step} is past step ${s.step}`);
  return s;
}
