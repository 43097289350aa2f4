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

/// The step's bias corrections 1 - beta^step and weight-decay factor 1 - lr * weightDecay,
/// computed once per call.
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
    off: usize,
    o: &AdamW,
    f: Factors,
) {
    let Factors { bc1, bc2, decay } = f;
    for i in 0..p.len() {
        let gi = g[i] as f64 * o.grad_scale;
        let ms = match m {
            Moment::F32(x) => {
                x[off + i] = moment_f32(x[off + i], o.beta1, gi);
                x[off + i]
            }
            Moment::Bf16(x) => {
                x[off + i] = bf16_bits(moment_f32(bf16_to_f32(x[off + i]), o.beta1, gi));
                bf16_to_f32(x[off + i])
            }
        } as f64;
        let vnew = |prev: f32| (o.beta2 * prev as f64 + (1.0 - o.beta2) * gi * gi) as f32;
        let vs = match v {
            Moment::F32(x) => {
                x[off + i] = vnew(x[off + i]);
                x[off + i]
            }
            Moment::Bf16(x) => {
                x[off + i] = bf16_bits(vnew(bf16_to_f32(x[off + i])));
                bf16_to_f32(x[off + i])
            }
        } as f64;
        p[i] = (p[i] as f64 * decay - (o.lr * (ms / bc1)) / ((vs / bc2).sqrt() + o.eps)) as f32;
    }
}

/// In-place AdamW on f32 master weights p with gradient g * gradScale.
pub fn adamw(p: &mut [f32], g: &[f32], mut m: Moment, mut v: Moment, o: AdamW) -> R<()> {
    let n = p.len();
    if g.len() != n || m.len() != n || v.len() != n {
        return Err(format!(
            "adamw: p {n}, g {}, m {}, v {} elements",
            g.len(),
            m.len(),
            v.len()
        ));
    }
    let f = Factors {
        bc1: 1.0 - o.beta1.powf(o.step),
        bc2: 1.0 - o.beta2.powf(o.step),
        decay: 1.0 - o.lr * o.weight_decay,
    };
    let c = REDUCE_BLOCK;
    match (&mut m, &mut v) {
        (Moment::F32(mm), Moment::F32(vv)) => {
            p.par_chunks_mut(c)
                .zip(g.par_chunks(c))
                .zip(mm.par_chunks_mut(c).zip(vv.par_chunks_mut(c)))
                .for_each(|((p, g), (m, v))| adamw_block_ff(p, g, m, v, &o, f));
        }
        (Moment::Bf16(mm), Moment::Bf16(vv)) => {
            p.par_chunks_mut(c)
                .zip(g.par_chunks(c))
                .zip(mm.par_chunks_mut(c).zip(vv.par_chunks_mut(c)))
                .for_each(|((p, g), (m, v))| adamw_block_bb(p, g, m, v, &o, f));
        }
        _ => adamw_block_mixed(p, g, &mut m, &mut v, 0, &o, f),
    }
    Ok(())
}
