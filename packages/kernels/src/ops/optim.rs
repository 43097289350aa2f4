//! Global-norm clipping and AdamW, following packages/tensor/src/ts/backend.ts.

use super::nn::R;
use super::util::{bf16_bits, bf16_to_f32, multiversion, par_sumsq, REDUCE_BLOCK};
use rayon::prelude::*;

/// (norm, scale): the L2 norm of all tensors (f64, fixed blocks in order) and
/// min(1, maxNorm / (norm + 1e-6)), or 1 when the norm is not finite.
pub fn clip_scale(grads: &[&[f32]], max_norm: f64) -> (f64, f64) {
    let mut ss = 0f64;
    for g in grads {
        ss += par_sumsq(g);
    }
    let norm = ss.sqrt();
    let scale = if norm.is_finite() {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    };
    (norm, scale)
}

#[derive(Clone, Copy)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: f64,
    pub grad_scale: f64,
}

/// Moment storage: f32, or BF16 bits.
pub enum Moment<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [u16]),
}

impl Moment<'_> {
    fn len(&self) -> usize {
        match self {
            Moment::F32(x) => x.len(),
            Moment::Bf16(x) => x.len(),
        }
    }
}

/// The step's bias corrections 1 - beta^step and a tensor's weight-decay factor
/// 1 - lr * weightDecay (weightDecay 0 where it does not apply), computed once per tensor.
#[derive(Clone, Copy)]
struct Factors {
    bc1: f64,
    bc2: f64,
    decay: f64,
}

/// One element of the reference update: the moment computed in f64, stored to f32 (and then to
/// BF16 for BF16 moments), and the update using the stored values.
#[inline(always)]
fn moment_f32(prev: f32, beta: f64, x: f64) -> f32 {
    (beta * prev as f64 + (1.0 - beta) * x) as f32
}

multiversion! {
    fn adamw_block_ff(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], o: &AdamW, f: Factors) {
        let Factors { bc1, bc2, decay } = f;
        for i in 0..p.len().min(g.len()).min(m.len()).min(v.len()) {
            let gi = g[i] as f64 * o.grad_scale;
            let ms = moment_f32(m[i], o.beta1, gi);
            let vs = (o.beta2 * v[i] as f64 + (1.0 - o.beta2) * gi * gi) as f32;
            m[i] = ms;
            v[i] = vs;
            p[i] = (p[i] as f64 * decay - (o.lr * (ms as f64 / bc1)) / ((vs as f64 / bc2).sqrt() + o.eps)) as f32;
        }
    }
}

multiversion! {
    fn adamw_block_bb(p: &mut [f32], g: &[f32], m: &mut [u16], v: &mut [u16], o: &AdamW, f: Factors) {
        let Factors { bc1, bc2, decay } = f;
        for i in 0..p.len().min(g.len()).min(m.len()).min(v.len()) {
            let gi = g[i] as f64 * o.grad_scale;
            let mb = bf16_bits(moment_f32(bf16_to_f32(m[i]), o.beta1, gi));
            let vb = bf16_bits((o.beta2 * bf16_to_f32(v[i]) as f64 + (1.0 - o.beta2) * gi * gi) as f32);
            m[i] = mb;
            v[i] = vb;
            let (ms, vs) = (bf16_to_f32(mb) as f64, bf16_to_f32(vb) as f64);
            p[i] = (p[i] as f64 * decay - (o.lr * (ms / bc1)) / ((vs / bc2).sqrt() + o.eps)) as f32;
        }
    }
}

/// Mixed storage (one moment f32, the other BF16): a plain loop.
fn adamw_block_mixed(
    p: &mut [f32],
    g: &[f32],
    m: &mut Moment,
    v: &mut Moment,
    o: &AdamW,
    f: Factors,
) {
    let Factors { bc1, bc2, decay } = f;
    for i in 0..p.len() {
        let gi = g[i] as f64 * o.grad_scale;
        let ms = match m {
            Moment::F32(x) => {
                x[i] = moment_f32(x[i], o.beta1, gi);
                x[i]
            }
            Moment::Bf16(x) => {
                x[i] = bf16_bits(moment_f32(bf16_to_f32(x[i]), o.beta1, gi));
                bf16_to_f32(x[i])
            }
        } as f64;
        let vnew = |prev: f32| (o.beta2 * prev as f64 + (1.0 - o.beta2) * gi * gi) as f32;
        let vs = match v {
            Moment::F32(x) => {
                x[i] = vnew(x[i]);
                x[i]
            }
            Moment::Bf16(x) => {
                x[i] = bf16_bits(vnew(bf16_to_f32(x[i])));
                bf16_to_f32(x[i])
            }
        } as f64;
        p[i] = (p[i] as f64 * decay - (o.lr * (ms / bc1)) / ((vs / bc2).sqrt() + o.eps)) as f32;
    }
}

/// One tensor of a multi-tensor AdamW step: the f32 master weight p, its gradient g, the moments,
/// and whether the weight decay applies.
pub struct Slot<'a> {
    pub p: &'a mut [f32],
    pub g: &'a [f32],
    pub m: Moment<'a>,
    pub v: Moment<'a>,
    pub decay: bool,
}

/// `x` cut into blocks of `c` elements.
fn moment_blocks(x: Moment<'_>, c: usize) -> Vec<Moment<'_>> {
    match x {
        Moment::F32(x) => x.chunks_mut(c).map(Moment::F32).collect(),
        Moment::Bf16(x) => x.chunks_mut(c).map(Moment::Bf16).collect(),
    }
}

/// In-place AdamW on every slot (p with gradient g * gradScale), `o.weight_decay` applying to the
/// slots marked `decay`: the blocks of all the tensors are one parallel loop. Each element's update
/// is the single-tensor one, so the result does not depend on how the tensors are grouped.
pub fn adamw_multi(slots: Vec<Slot>, o: AdamW) -> R<()> {
    for s in &slots {
        let n = s.p.len();
        if s.g.len() != n || s.m.len() != n || s.v.len() != n {
            return Err(format!(
                "adamw: p {n}, g {}, m {}, v {} elements",
                s.g.len(),
                s.m.len(),
                s.v.len()
            ));
        }
    }
    let (bc1, bc2) = (1.0 - o.beta1.powf(o.step), 1.0 - o.beta2.powf(o.step));
    let c = REDUCE_BLOCK;
    let mut blocks = Vec::new();
    for Slot { p, g, m, v, decay } in slots {
        let f = Factors {
            bc1,
            bc2,
            decay: 1.0 - o.lr * if decay { o.weight_decay } else { 0.0 },
        };
        let parts = p.chunks_mut(c).zip(g.chunks(c));
        let moments = moment_blocks(m, c).into_iter().zip(moment_blocks(v, c));
        blocks.extend(parts.zip(moments).map(|((p, g), (m, v))| (p, g, m, v, f)));
    }
    blocks
        .into_par_iter()
        .for_each(|(p, g, mut m, mut v, f)| match (&mut m, &mut v) {
            (Moment::F32(m), Moment::F32(v)) => adamw_block_ff(p, g, m, v, &o, f),
            (Moment::Bf16(m), Moment::Bf16(v)) => adamw_block_bb(p, g, m, v, &o, f),
            _ => adamw_block_mixed(p, g, &mut m, &mut v, &o, f),
        });
    Ok(())
}
