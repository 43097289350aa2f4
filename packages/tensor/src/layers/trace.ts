// The precision trace: every GEMM records which package, layer and role (fprop/dgrad/wgrad) it ran
// for, in which precision and, under FP8, how its operands were quantised (the plan fp8-core's
// gemmPlan made and the GEMM ran with), so tests and users can see which precision ran where.

import { GEMM_ROLES, type GemmRole } from "@moe8/fp8-core";
import type { Backend } from "../backend.ts";
import type { Collectives } from "../collectives.ts";
import type { Tensor } from "../tensor.ts";

/**
 * FP8 range events of the activations and gradients quantised in a step (Backend.fp8Flow), summed
 * on the device while `enabled` (one extra pass per quantisation, so only on logged steps).
 */
export class Fp8FlowCounter {
  enabled = false;
  private counts: Tensor | null = null;

  add(b: Backend, x: Tensor, q: Tensor): void {
    // (An input that came quantised has no f32 values here: whoever quantised it counted them.)
    if (!this.enabled || x.quant) return;
    this.counts ??= b.keep(b.zeros([2]));
    b.addInto(this.counts, b.fp8Flow(x, q));
  }

  /**
   * Sums the counts over the ranks of `group` (each rank counts its own quantisations; every rank
   * calls this on the same steps).
   */
  async sumOver(group: Collectives, b: Backend): Promise<void> {
    this.counts ??= b.keep(b.zeros([2]));
    await group.allReduceSum([this.counts]);
  }

  /** Reads and resets the counts: [overflow, underflow] since the last call. */
  async take(): Promise<{ overflow: number; underflow: number }> {
    if (!this.counts) return { overflow: 0, underflow: 0 };
    const c = (await this.counts.read()) as Float32Array;
    this.counts.backend.fill(this.counts, 0);
    return { overflow: c[0], underflow: c[1] };
  }

  dispose(): void {
    this.counts?.dispose();
    this.counts = null;
  }
}

export interface TraceEntry {
  pkg: string;
  layer: string;
  role: GemmRole;
  precision: string;
  /** The FP8 operands as fp8-core's describeOperands gives them (`x tile/e4m3, w block/e4m3`). */
  operands?: string;
}

export class PrecisionTrace {
  private entries = new Map<string, TraceEntry>();
  enabled = true;
  /** FP8 overflow/underflow counting, shared by every Linear that records into this trace. */
  readonly flow = new Fp8FlowCounter();

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

  /** "package role" -> the distinct FP8 operand quantisations its GEMMs ran with, by package and role. */
  operands(): Map<string, string[]> {
    const seen = new Map<string, string[]>();
    for (const e of this.entries.values()) {
      if (!e.operands) continue;
      const key = `${e.pkg} ${e.role}`;
      const list = seen.get(key) ?? [];
      if (!list.includes(e.operands)) list.push(e.operands);
      seen.set(key, list);
    }
    const out = new Map<string, string[]>();
    for (const pkg of Object.keys(this.table()))
      for (const role of GEMM_ROLES) {
        const list = seen.get(`${pkg} ${role}`);
        if (list) out.set(`${pkg} ${role}`, list);
      }
    return out;
  }

  /** The precision table, then the FP8 operands of each package and role that ran any. */
  format(): string {
    const rows = Object.entries(this.table());
    const lines = [`${"package".padEnd(12)} ${"fprop".padEnd(16)} ${"dgrad".padEnd(16)} wgrad`];
    for (const [pkg, r] of rows)
      lines.push(`${pkg.padEnd(12)} ${r.fprop.padEnd(16)} ${r.dgrad.padEnd(16)} ${r.wgrad}`);
    const operands = this.operands();
    if (operands.size > 0) {
      lines.push("fp8 operands (group/format):");
      for (const [key, list] of operands) lines.push(`${key.padEnd(18)} ${list.join(" | ")}`);
    }
    return lines.join("\n");
  }

  clear(): void {
    this.entries.clear();
  }
}
