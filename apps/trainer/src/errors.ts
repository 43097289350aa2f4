// Bad input (flags, config, data, checkpoints, policies, backend choices) is a UsageError from
// @moe8/fp8-core, whichever package threw it: reported as one line naming the thing and the
// problem, with exit code 2 and no stack trace unless --debug. Everything else is a bug: exit 1.
// Messages are cut at 1,000 characters: a value quoted from a hostile file never floods the terminal.
import { clip } from "@moe8/data/errors";
import { UsageError } from "@moe8/fp8-core";

/** Runs a command, turning errors into the CLI's exit codes. */
export async function runCli(main: () => Promise<number | undefined>, debug: boolean): Promise<never> {
  try {
    const code = (await main()) ?? 0;
    process.exit(code);
  } catch (err) {
    if (err instanceof UsageError) {
      console.error(`error: ${clip(err.message.replace(/\n/g, " "), 1000)}`);
      if (debug) console.error(err.stack);
      process.exit(2);
    }
    console.error(
      debug || !(err instanceof Error)
        ? err
        : `internal error: ${clip(err.message, 1000)} (rerun with --debug)`,
    );
    process.exit(1);
  }
}
