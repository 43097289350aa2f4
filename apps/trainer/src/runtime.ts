// Which JavaScript runtime we are in: the CLI runs under Bun, Node (through tsx) and Deno.

declare const Bun: { version: string } | undefined;
declare const Deno: { version: { deno: string } } | undefined;

export interface RuntimeInfo {
  name: "bun" | "deno" | "node";
  version: string;
}

export function currentRuntime(): RuntimeInfo {
  if (typeof Bun !== "undefined") return { name: "bun", version: Bun.version };
  if (typeof Deno !== "undefined") return { name: "deno", version: Deno.version.deno };
  return { name: "node", version: process.versions.node };
}
