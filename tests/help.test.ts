// `moe8 <command> --help` lists the command's flags, exit 0: every flag its parser accepts (the same
// table), and nothing it does not accept.
import { describe, expect, it } from "vitest";
import { BENCH_FLAGS } from "../apps/trainer/src/commands/bench/index.ts";
import { DOCTOR_FLAGS } from "../apps/trainer/src/commands/doctor.ts";
import { EVAL_FLAGS } from "../apps/trainer/src/commands/eval.ts";
import { EXPORT_FLAGS } from "../apps/trainer/src/commands/export.ts";
import { PARITY_FLAGS } from "../apps/trainer/src/commands/parity.ts";
import { PREPARE_DATA_FLAGS } from "../apps/trainer/src/commands/prepare-data.ts";
import { SAMPLE_FLAGS } from "../apps/trainer/src/commands/sample.ts";
import { describe as describeFlag } from "../apps/trainer/src/help.ts";
import { TRAIN_FLAGS } from "../apps/trainer/src/run/flags.ts";
import { cli } from "./helpers.ts";

const TABLES = {
  train: TRAIN_FLAGS,
  eval: EVAL_FLAGS,
  sample: SAMPLE_FLAGS,
  export: EXPORT_FLAGS,
  parity: PARITY_FLAGS,
  bench: BENCH_FLAGS,
  "prepare-data": PREPARE_DATA_FLAGS,
  doctor: DOCTOR_FLAGS,
};

describe("--help", () => {
  it("moe8 --help names every command, and each has its own help", () => {
    const r = cli(["--help"]);
    expect(r.status).toBe(0);
    const listed = [...r.stdout.matchAll(/^ {2}([a-z-]+) /gm)].map((m) => m[1]).sort();
    expect(listed).toEqual(Object.keys(TABLES).sort());
  });

  for (const [command, table] of Object.entries(TABLES))
    it(`${command} --help lists exactly the flags ${command} accepts`, () => {
      const r = cli([command, "--help"]);
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout).toMatch(new RegExp(`^usage: moe8 ${command}`));
      const shown = [...r.stdout.matchAll(/^ {2}--([\w.-]+)(<name>)?/gm)];
      const plain = shown.filter((m) => !m[2]).map((m) => m[1]);
      expect(plain.sort()).toEqual(Object.keys(table).sort());
      // Dotted flags (--precision.<name>=VALUE) are listed by the prefixes the parser was given.
      const dotted = shown.filter((m) => m[2]).map((m) => m[1]);
      if (command === "train" || command === "parity") expect(dotted).toContain("precision.");
      else expect(dotted).toEqual([]);
      // Every flag says what it does.
      const bare = Object.keys(table).filter((f) => describeFlag(f) === "");
      expect(bare, `${command}: flags without a description in apps/trainer/src/help.ts`).toEqual([]);
    });

  it("--help after other flags still prints help, and an unknown flag is still refused", () => {
    const r = cli(["sample", "--checkpoint", "nowhere", "--help"]);
    expect(r.status).toBe(0);
    expect(r.stdout).toContain("--checkpoint");
    expect(cli(["sample", "--nonsense"]).stderr).toMatch(/unknown flag --nonsense/);
  });
});
