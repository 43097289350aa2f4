// Bad input (a missing file, a corrupt shard, a wrong column type...) is the user's to fix, not a
// bug: it is thrown as @moe8/fp8-core's UsageError, which the CLI prints on one line with exit 2.

/** The message of anything thrown, for quoting inside a UsageError. */
export function reason(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
