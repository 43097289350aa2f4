// The one error class for bad input (flags, config, data, checkpoints, policies, backend choices).
// The CLI prints its message on one line and exits 2 (apps/trainer/src/errors.ts); anything else
// thrown is a bug and exits 1. It lives here, in the bottom package, so every package can throw it
// and the CLI can recognise it with `instanceof` instead of comparing name strings.
export class UsageError extends Error {
  override name = "UsageError";
  constructor(message: string) {
    // Messages often quote other libraries' errors: keep them on one line whatever those contain.
    super(oneLine(message));
  }
}

/** Text folded onto one line (the CLI's error output is one line per error). */
export function oneLine(text: string): string {
  return text.replace(/\s*[\r\n]+\s*/g, " ").trim();
}
