// `bench step --profile`: where one training step's time and memory go, per Backend op class.
import { type Backend, BYTES_PER_ELEMENT, Tensor, TsBackend } from "@moe8/tensor";

/** One op class of a step profile: time, calls. */
interface OpTime {
  op: string;
  ms: number;
  calls: number;
}

/** Tensor bytes live at the step's peak, grouped by the op class that created them. */
interface LiveAtPeak {
  made_by: string;
  mb: number;
  tensors: number;
}

/**
 * Time per op class over one training step: every backend method is timed (and a device backend
 * synchronised after each op, which slows the step but attributes the time), then restored. Also
 * the memory at the step's peak: which op classes made the tensors that were live then.
 */
export async function profileStep(
  b: Backend,
  run: () => Promise<unknown>,
): Promise<{ ops: OpTime[]; peakMb: number; liveAtPeak: LiveAtPeak[] }> {
  const rec = b as unknown as Record<string, unknown>;
  const sync = (b as { synchronize?: () => void }).synchronize?.bind(b);
  const liveTensors = (b as { liveTensors?: () => Tensor[] }).liveTensors?.bind(b);
  const stats = b.stats.bind(b);
  // The Backend interface's ops (the reference backend implements exactly those, plus two private
  // helpers); a backend's own helpers would be counted twice inside the ops that call them.
  const bookkeeping = [
    "constructor",
    "gemmInto",
    "finish",
    "stats",
    "peakBytes",
    "resetPeakBytes",
    "liveTensors",
  ];
  const ops = Object.getOwnPropertyNames(TsBackend.prototype).filter((k) => !bookkeeping.includes(k));
  const names = ops.filter((k) => typeof rec[k] === "function");
  const lifetimes = new Set(["scope", "keep", "release", "reshape", "read", "write"]);

  const acc = new Map<string, { ms: number; calls: number }>();
  const madeBy = new WeakMap<Tensor, string>();
  const tag = (x: unknown, key: string) => {
    const one = (t: unknown) => {
      if (!(t instanceof Tensor)) return;
      if (!madeBy.has(t)) madeBy.set(t, key);
      if (t.quant && !madeBy.has(t.quant.scales)) madeBy.set(t.quant.scales, key);
    };
    one(x);
    if (x && typeof x === "object" && !(x instanceof Tensor)) for (const v of Object.values(x)) one(v);
  };
  // What exists before the step (parameters, gradients, optimiser state, inputs) keeps that name,
  // also when an op returns it again (a GEMM accumulating into a gradient).
  const before = "(before the step: parameters, gradients, optimiser state, inputs)";
  for (const t of liveTensors?.() ?? []) madeBy.set(t, before);
  let peak = stats().bytes;
  let liveAtPeak = new Map<string, { bytes: number; tensors: number }>();
  const snapshot = () => {
    const bytes = stats().bytes;
    if (bytes <= peak || !liveTensors) return;
    peak = bytes;
    liveAtPeak = new Map();
    for (const t of liveTensors()) {
      const k = madeBy.get(t) ?? "(made outside any op)";
      const e = liveAtPeak.get(k) ?? { bytes: 0, tensors: 0 };
      e.bytes += t.size * BYTES_PER_ELEMENT[t.dtype];
      e.tensors++;
      liveAtPeak.set(k, e);
    }
  };
  for (const k of names) {
    const f = (rec[k] as (...a: unknown[]) => unknown).bind(b);
    rec[k] = (...a: unknown[]) => {
      const t = performance.now();
      const r = f(...a);
      sync?.();
      // The options object names the variant: precision for GEMMs, group (and segments) for quantize.
      const o = a.find(
        (x) => x && typeof x === "object" && ("precision" in (x as object) || "group" in (x as object)),
      ) as { precision?: string; group?: string; segments?: unknown } | undefined;
      const variant = o?.precision ?? (o?.group ? `${o.group}${o.segments ? "+segments" : ""}` : "");
      const key = variant ? `${k}:${variant}` : k;
      const e = acc.get(key) ?? { ms: 0, calls: 0 };
      e.ms += performance.now() - t;
      e.calls++;
      acc.set(key, e);
      if (!lifetimes.has(k)) {
        tag(r, key);
        snapshot();
      }
      return r;
    };
  }
  try {
    await run();
  } finally {
    for (const k of names) delete rec[k];
  }
  const mb = (x: number) => +(x / 2 ** 20).toFixed(1);
  return {
    ops: [...acc]
      .map(([op, v]) => ({ op, ms: +v.ms.toFixed(3), calls: v.calls }))
      .sort((x, y) => y.ms - x.ms),
    peakMb: mb(peak),
    liveAtPeak: [...liveAtPeak]
      .map(([made_by, v]) => ({ made_by, mb: mb(v.bytes), tensors: v.tensors }))
      .sort((x, y) => y.mb - x.mb),
  };
}
