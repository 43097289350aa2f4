import { execFileSync } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { UsageError } from "@moe8/fp8-core";
import { describe, expect, it } from "vitest";
import { availableBackends, createBackend, UsageError as KernelsUsageError } from "../src/index.ts";

const here = dirname(fileURLToPath(import.meta.url));

describe("backend registry", () => {
  it("lists ts and cpu, and creates each by name ('auto' = the fastest present)", () => {
    expect(availableBackends()).toEqual(["ts", "cpu"]);
    expect(createBackend("ts").name).toBe("ts");
    expect(createBackend("cpu").name).toBe("cpu");
    expect(createBackend("auto").name).toBe("cpu");
  });

  it("cuda and unknown names are UsageErrors (@moe8/fp8-core's, re-exported) that say why", () => {
    expect(KernelsUsageError).toBe(UsageError);
    expect(() => createBackend("cuda")).toThrow(UsageError);
    expect(() => createBackend("cuda")).toThrow(/cuda.*not available/);
    expect(() => createBackend("gpu" as "ts")).toThrow(UsageError);
  });

  it("without the addon (MOE8_NO_NATIVE=1): only ts, 'auto' falls back to it, 'cpu' explains", () => {
    const script = `import { availableBackends, createBackend } from ${JSON.stringify(join(here, "../src/index.ts"))};
let err = null; try { createBackend("cpu"); } catch (e) { err = { name: e.name, message: e.message }; }
console.log(JSON.stringify({ list: availableBackends(), auto: createBackend("auto").name, err }));`;
    const out = execFileSync(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
      env: { ...process.env, MOE8_NO_NATIVE: "1" },
      encoding: "utf8",
    });
    const r = JSON.parse(out.trim().split("\n").at(-1)!);
    expect(r.list).toEqual(["ts"]);
    expect(r.auto).toBe("ts");
    expect(r.err.name).toBe("UsageError");
    expect(r.err.message).toMatch(/MOE8_NO_NATIVE/);
  });
});
