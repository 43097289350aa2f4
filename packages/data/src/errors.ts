// Bad input (a missing file, a corrupt shard, a wrong column type...) is the user's to fix, not a
// bug: it is thrown as @moe8/fp8-core's UsageError, which the CLI prints on one line with exit 2.

/** The message of anything thrown, for quoting inside a UsageError. */
export function reason(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/**
 * A value quoted for an error message, cut to `max` characters: a message must stay one readable line
 * even when the value is a 50 MB string from a hostile file.
 */
export function brief(value: unknown, max = 80): string {
  let text: string;
  try {
    text = JSON.stringify(value) ?? String(value);
  } catch {
    text = String(value);
  }
  return clip(text, max);
}

/** Text cut to `max` characters, saying how long it was. */
export function clip(text: string, max = 200): string {
  return text.length > max ? `${text.slice(0, max)}... (${text.length} characters)` : text;
}
