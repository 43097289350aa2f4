// The precision trace: every GEMM records which package, layer and role (fprop/dgrad/wgrad) it ran
// for and in which precision, so tests and users can see which precision ran where.

export type GemmRole = "fprop" | "dgrad" | "wgrad";

export interface TraceEntry {
  pkg: string;
  layer: string;
  role: GemmRole;
  precision: string;
}

export class PrecisionTrace {
  private entries = new Map<string, TraceEntry>();
  enabled = true;

  record(e: TraceEntry): void {
    if (!this.enabled) return;
    this.entries.set(`${e.pkg}|${e.layer}|${e.role}`, e);
  }

  all(): TraceEntry[] {
    return [...this.entries.values()];
  }

  /** package -> role -> the precisions its GEMMs ran in (sorted, joined with "+"). */
  table(): Record<string, Record<GemmRole, string>> {
    const t: Record<string, Record<GemmRole, Set<string>>> = {};
    for (const e of this.entries.values()) {
      t[e.pkg] ??= { fprop: new Set(), dgrad: new Set(), wgrad: new Set() };
      t[e.pkg][e.role].add(e.precision);
    }
    const out: Record<string, Record<GemmRole, string>> = {};
    for (const [pkg, roles] of Object.entries(t))
      out[pkg] = {
        fprop: [...roles.fprop].sort().join("+") || "-",
        dgrad: [...roles.dgrad].sort().join("+") || "-",
        wgrad: [...roles.wgrad].sort().join("+") || "-",
      };
    return out;
  }

  format(): string {
    const rows = Object.entries(this.table());
    const lines = [`${"package".padEnd(12)} ${"fprop".padEnd(16)} ${"dgrad".padEnd(16)} wgrad`];
    for (const [pkg, r] of rows)
      lines.push(`${pkg.padEnd(12)} ${r.fprop.padEnd(16)} ${r.dgrad.padEnd(16)} ${r.wgrad}`);
    return lines.join("\n");
  }

  clear(): void {
    this.entries.clear();
  }
}
