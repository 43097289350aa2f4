// Bad input (a missing file, a corrupt shard, a wrong column type...) is the user's to fix, not a bug:
// the CLI prints `name: message` of a UsageError on one line and exits 2, without a stack trace.
export class DataError extends Error {
  override name = "UsageError";
  constructor(message: string) {
    // Messages quote other libraries' errors; keep them on one line whatever those contain.
    super(oneLine(message));
  }
}

export function oneLine(text: string): string {
  return text.replace(/\s*[\r\n]+\s*/g, " ").trim();
}

/** The message of anything thrown, for quoting inside a DataError. */
export function reason(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
