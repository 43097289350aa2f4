// Multi-head Latent Attention (DeepSeek-V2/V3), as docs/model.md writes it, with explicit backward.
//   q   = a Wq^T (or q_b(RMSNorm(q_a(a))) with q_lora_rank > 0)   per head [q_nope | q_pe]
//   kv  = a Wkva^T = [c | k_pe];  c = RMSNorm(c);  kvb = c Wkvb^T   per head [k_nope | v]
//   RoPE on q_pe and the shared k_pe; k = [k_nope | k_pe] (k_pe broadcast to every head)
//   o   = causal softmax(q k^T / sqrt(dn + dr)) v;  out = o Wo^T
import type { QuantizeOptions } from "@moe8/fp8-core";
import {
  type AttentionOptions,
  type Backend,
  Linear,
  type LinearPrecision,
  Param,
  type PrecisionTrace,
  QuantMemo,
  type Tensor,
} from "@moe8/tensor";

export interface MlaConfig {
  hidden_size: number;
  num_attention_heads: number;
  q_lora_rank: number;
  kv_lora_rank: number;
  qk_nope_head_dim: number;
  qk_rope_head_dim: number;
  v_head_dim: number;
  rms_norm_eps: number;
  rope_theta: number;
}

export interface AttentionPrecision {
  linear: LinearPrecision;
  /** The attention core: BF16 inputs with f32 accumulation, or f32. */
  core: AttentionOptions["precision"];
}

export type InitFn = (n: number) => Float32Array;

export interface MlaOptions {
  cfg: MlaConfig;
  /** Checkpoint name prefix, e.g. `model.layers.0.self_attn`. */
  prefix: string;
  precision: AttentionPrecision;
  init: InitFn;
  trace?: PrecisionTrace;
}

export interface StepShape {
  batch: number;
  seq: number;
}

interface Saved {
  a: Tensor;
  qa: Tensor | null;
  qaRstd: Tensor | null;
  c: Tensor;
  cRstd: Tensor;
  q: Tensor;
  k: Tensor;
  v: Tensor;
  o: Tensor;
  lse: Tensor;
  shape: StepShape;
}

export class MLA {
  readonly params: Param[] = [];
  readonly q: Linear | null = null;
  readonly qA: Linear | null = null;
  readonly qB: Linear | null = null;
  readonly qNorm: Param | null = null;
  readonly kvA: Linear;
  readonly kvNorm: Param;
  readonly kvB: Linear;
  readonly out: Linear;
  private saved: Saved[] = [];
  readonly cfg: MlaConfig;
  /** Checkpoint name prefix, e.g. `model.layers.0.self_attn`. */
  readonly prefix: string;
  precision: AttentionPrecision;

  constructor(
    readonly b: Backend,
    opts: MlaOptions,
  ) {
    const { cfg, prefix, precision, init, trace } = opts;
    this.cfg = cfg;
    this.prefix = prefix;
    this.precision = precision;
    const {
      hidden_size: d,
      num_attention_heads: H,
      kv_lora_rank: r,
      qk_nope_head_dim: dn,
      qk_rope_head_dim: dr,
      v_head_dim: dv,
    } = cfg;
    const lin = (name: string, out: number, inp: number) => {
      const p = Param.create(b, {
        name: `${prefix}.${name}.weight`,
        init: init(out * inp),
        shape: [out, inp],
        decay: true,
      });
      this.params.push(p);
      return new Linear(p, {
        precision: precision.linear,
        pkg: "attention",
        layer: `${prefix}.${name}`,
        trace,
      });
    };
    const norm = (name: string, n: number) => {
      const p = Param.create(b, {
        name: `${prefix}.${name}.weight`,
        init: new Float32Array(n).fill(1),
        shape: [n],
        decay: false,
      });
      this.params.push(p);
      return p;
    };
    if (cfg.q_lora_rank > 0) {
      this.qA = lin("q_a_proj", cfg.q_lora_rank, d);
      this.qNorm = norm("q_a_layernorm", cfg.q_lora_rank);
      this.qB = lin("q_b_proj", H * (dn + dr), cfg.q_lora_rank);
    } else this.q = lin("q_proj", H * (dn + dr), d);
    this.kvA = lin("kv_a_proj_with_mqa", r + dr, d);
    this.kvNorm = norm("kv_a_layernorm", r);
    this.kvB = lin("kv_b_proj", H * (dn + dv), r);
    this.out = lin("o_proj", d, H * dv);
  }

  /** Whether a saved forward holds the input `t` itself (see Linear.retains). */
  retains(t: Tensor): boolean {
    return [this.q, this.qA, this.kvA].some((l) => l?.retains(t));
  }

  /**
   * How the input's producer (the block's RMSNorm) may hand it over quantised: when the q (or q_a)
   * and kv_a projections both take the same FP8 copy (Linear.producerQuant), else null.
   */
  producerQuant(): QuantizeOptions | null {
    const a = (this.q ?? this.qA!).producerQuant();
    const b = this.kvA.producerQuant();
    const same = (k: "group" | "format" | "eps" | "unit" | "pow2Scales") =>
      (a?.[k] ?? null) === (b?.[k] ?? null);
    return a && b && same("group") && same("format") && same("eps") && same("unit") && same("pow2Scales")
      ? a
      : null;
  }

  clearSaved(): void {
    this.saved.length = 0;
    for (const l of [this.q, this.qA, this.qB, this.kvA, this.kvB, this.out]) l?.clearSaved();
  }

  setPrecision(p: AttentionPrecision): void {
    this.precision = p;
    for (const l of [this.q, this.qA, this.qB, this.kvA, this.kvB, this.out]) if (l) l.precision = p.linear;
  }

  private ropeOpts(heads: number, width: number, offset: number, seq: number, inverse = false) {
    return {
      heads,
      width,
      offset,
      dim: this.cfg.qk_rope_head_dim,
      seqLen: seq,
      theta: this.cfg.rope_theta,
      inverse,
    };
  }

  private attnOpts(shape: StepShape) {
    const { num_attention_heads: H, qk_nope_head_dim: dn, qk_rope_head_dim: dr } = this.cfg;
    return {
      batch: shape.batch,
      seq: shape.seq,
      heads: H,
      scale: 1 / Math.sqrt(dn + dr),
      precision: this.precision.core,
    };
  }

  /** a: the normalised hidden states [B*T, d]. */
  /**
   * lin(rmsnorm(x)): under FP8 the norm hands lin its input quantised (Backend.rmsnormQuantized, no
   * f32 copy), which lin keeps; otherwise the f32 output, released unless lin keeps it.
   */
  private normInto(lin: Linear, x: Tensor, w: Tensor): { out: Tensor; rstd: Tensor } {
    const b = this.b;
    const eps = this.cfg.rms_norm_eps;
    const q = lin.producerQuant();
    if (q) {
      const n = b.rmsnormQuantized(x, w, eps, q);
      return { out: lin.forward(n.y, null, QuantMemo.holding(q, n.y)), rstd: n.rstd };
    }
    const n = b.rmsnorm(x, w, eps);
    const out = lin.forward(n.y);
    if (!lin.retains(n.y)) b.release(n.y);
    return { out, rstd: n.rstd };
  }

  /**
   * a: the input, or its FP8 copy with `given` holding it (producerQuant: the RMSNorm before this
   * block quantised it; the projections keep it as their saved input).
   */
  forward(a: Tensor, shape: StepShape, given: QuantMemo | null = null): Tensor {
    const b = this.b;
    const {
      num_attention_heads: H,
      kv_lora_rank: r,
      qk_nope_head_dim: dn,
      qk_rope_head_dim: dr,
      v_head_dim: dv,
    } = this.cfg;
    // Intermediates nothing saves are released as soon as they are consumed: otherwise every
    // layer's projections would live until the end of the step (the peak is after the forward).
    const drop = (...ts: Tensor[]) => {
      for (const t of ts) b.release(t);
    };
    let q: Tensor;
    let qa: Tensor | null = null;
    let qaRstd: Tensor | null = null;
    const memo = given ?? new QuantMemo(); // the q and kv_a projections read the same a: one FP8 copy of it
    if (this.q) q = this.q.forward(a, null, memo);
    else {
      qa = this.qA!.forward(a, null, memo);
      const n = this.normInto(this.qB!, qa, this.qNorm!.value);
      qaRstd = n.rstd;
      q = n.out;
    }
    // The attention core rounds q, k and v to BF16 anyway (core precision bf16): their producers
    // store them so, at half the bytes, kept for backward too.
    const bf16 = this.precision.core === "bf16";
    const qLin = q;
    q = b.rope(qLin, { ...this.ropeOpts(H, dn + dr, dn, shape.seq), storeBf16: bf16 });
    const kvLin = this.kvA.forward(a, null, memo);
    const kv = b.rope(kvLin, this.ropeOpts(1, r + dr, r, shape.seq));
    const c = b.headSlice(kv, { heads: 1, width: r + dr, start: 0, len: r });
    const kpe = b.headSlice(kv, { heads: 1, width: r + dr, start: r, len: dr });
    drop(qLin, kvLin, kv);
    const cn = this.normInto(this.kvB, c, this.kvNorm.value);
    const kvb = cn.out;
    // k = [k_nope | k_pe] with k_nope read in place from kv_b's [k_nope | v] heads.
    const v = b.headSlice(kvb, { heads: H, width: dn + dv, start: dn, len: dv, storeBf16: bf16 });
    const k = b.headConcat(kvb, kpe, H, 1, bf16, { width: dn + dv, start: 0, len: dn });
    drop(kvb, kpe);
    const { o, lse } = b.attention(q, k, v, this.attnOpts(shape));
    this.saved.push({ a, qa, qaRstd, c, cRstd: cn.rstd, q, k, v, o, lse, shape });
    return this.out.forward(o);
  }

  /** Accumulates parameter gradients and returns d(a). */
  backward(dOut: Tensor): Tensor {
    const b = this.b;
    const s = this.saved.pop();
    if (!s) throw new Error(`${this.prefix}: backward without forward`);
    const { num_attention_heads: H, kv_lora_rank: r, qk_nope_head_dim: dn, qk_rope_head_dim: dr } = this.cfg;
    const dO = this.out.backward(dOut);
    const g = b.attentionBackward(dO, s.q, s.k, s.v, s.o, s.lse, this.attnOpts(s.shape));
    // k = [k_nope | k_pe]: k_nope goes back to kv_b's rows, k_pe is summed over the heads it was shared by.
    const dkpe = b.headSlice(g.dk, { heads: H, width: dn + dr, start: dn, len: dr, sumHeads: true });
    // kv_b's output rows are [k_nope | v] per head: its gradient is the same concatenation (one
    // pass, no zeroed tensor added into), d(k_nope) read in place from dk's heads.
    // Under FP8 the gradients that go on into a Linear's backward are handed to it quantised by
    // their producer (the concatenation, the inverse rotation): no f32 copy made only to be quantised.
    const part = { width: dn + dr, start: 0, len: dn };
    const kvbQ = this.kvB.gradQuant();
    const dkvb = kvbQ
      ? b.headConcatQuantized(g.dk, g.dv, H, H, part, kvbQ)
      : b.headConcat(g.dk, g.dv, H, H, false, part);
    const dcn = this.kvB.backward(dkvb);
    const cn = b.rmsnormBackward(dcn, s.c, this.kvNorm.value, s.cRstd, { dw: this.kvNorm.grad });
    const dkv = b.headConcat(cn.dx, dkpe, 1, 1);
    const unrotate = (lin: Linear, x: Tensor, heads: number, width: number, offset: number) => {
      const o = this.ropeOpts(heads, width, offset, s.shape.seq, true);
      const q = lin.gradQuant();
      return q ? b.ropeQuantized(x, o, q) : b.rope(x, o);
    };
    const da = this.kvA.backward(unrotate(this.kvA, dkv, 1, r + dr, r));
    const qIn = this.q ?? this.qB!;
    const dq = unrotate(qIn, g.dq, H, dn + dr, dn);
    if (this.q) this.q.backward(dq, da);
    else {
      const dqa = this.qB!.backward(dq);
      const qn = b.rmsnormBackward(dqa, s.qa!, this.qNorm!.value, s.qaRstd!, { dw: this.qNorm!.grad });
      this.qA!.backward(qn.dx, da);
    }
    return da;
  }
}
