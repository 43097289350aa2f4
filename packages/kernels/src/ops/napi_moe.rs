//! JavaScript bindings of the MoE routing and dispatch kernels, the losses and the optimiser (the
//! conventions of napi.rs: outputs preallocated and written in place, sizes checked).

use super::napi::js;
use super::{moe, optim};
use napi::bindgen_prelude::*;
use napi_derive::napi;

/// Routing of `n` tokens to the top `k` of `e` experts, the weights scaled by `scaling`.
#[napi(object)]
pub struct RoutingParams {
    pub n: u32,
    pub e: u32,
    pub k: u32,
    pub scaling: f64,
}

impl RoutingParams {
    fn routing(&self) -> moe::Routing {
        moe::Routing {
            n: self.n as usize,
            e: self.e as usize,
            k: self.k as usize,
            scaling: self.scaling,
        }
    }
}

/// Router: scores [N, E], topIdx [N, k], weights [N, k].
#[napi]
pub fn router(
    logits: &[f32],
    bias: &[f32],
    p: RoutingParams,
    mut scores: Float32ArraySlice,
    mut top_idx: Int32ArraySlice,
    mut weights: Float32ArraySlice,
) -> Result<()> {
    let scores = unsafe { scores.as_mut() };
    let top_idx = unsafe { top_idx.as_mut() };
    let weights = unsafe { weights.as_mut() };
    if p.k == 0 {
        return Err(Error::new(
            Status::InvalidArg,
            "router: k must be at least 1".to_string(),
        ));
    }
    js(moe::router(
        logits,
        bias,
        &p.routing(),
        scores,
        top_idx,
        weights,
    ))
}

/// d(logits) [N, E]; `dscores` empty when absent.
#[napi]
pub fn router_backward(
    dweights: &[f32],
    scores: &[f32],
    top_idx: &[i32],
    p: RoutingParams,
    dscores: &[f32],
    mut dlogits: Float32ArraySlice,
) -> Result<()> {
    let dlogits = unsafe { dlogits.as_mut() };
    let r = p.routing();
    js(moe::router_backward(
        dweights, scores, top_idx, &r, dscores, dlogits,
    ))
}

/// The balance loss's sizes (`batch` sequences of `seq` tokens routed to `k` of `e` experts) and
/// its weight alpha.
#[napi(object)]
pub struct BalanceParams {
    pub batch: u32,
    pub seq: u32,
    pub e: u32,
    pub k: u32,
    pub alpha: f64,
}

/// Balance loss (returned) and d(loss)/d(scores) written into `dscores`.
#[napi]
pub fn balance_loss(
    scores: &[f32],
    top_idx: &[i32],
    p: BalanceParams,
    mut dscores: Float32ArraySlice,
) -> Result<f64> {
    let dscores = unsafe { dscores.as_mut() };
    let b = moe::Balance {
        batch: p.batch as usize,
        seq: p.seq as usize,
        e: p.e as usize,
        k: p.k as usize,
        alpha: p.alpha,
    };
    js(moe::balance_loss(scores, top_idx, &b, dscores))
}

/// The dispatch of `n` token rows of width `d`, each to `k` of `experts` experts.
#[napi(object)]
pub struct DispatchParams {
    pub n: u32,
    pub d: u32,
    pub k: u32,
    pub experts: u32,
}

/// Permute token rows by expert: xs [N*k, d], slot [N*k], offsets [E+1].
#[napi]
pub fn moe_permute(
    x: &[f32],
    top_idx: &[i32],
    p: DispatchParams,
    mut xs: Float32ArraySlice,
    mut slot: Int32ArraySlice,
    mut offsets: Int32ArraySlice,
) -> Result<()> {
    let xs = unsafe { xs.as_mut() };
    let slot = unsafe { slot.as_mut() };
    let offsets = unsafe { offsets.as_mut() };
    let d = moe::Dispatch {
        n: p.n as usize,
        d: p.d as usize,
        k: p.k as usize,
        experts: p.experts as usize,
    };
    js(moe::permute(x, top_idx, &d, xs, slot, offsets))
}

/// `n` token rows of width `d`.
#[napi(object)]
pub struct TokenShape {
    pub n: u32,
    pub d: u32,
}

impl TokenShape {
    fn tokens(&self) -> moe::Tokens {
        moe::Tokens {
            n: self.n as usize,
            d: self.d as usize,
        }
    }
}

/// dx [N, d] from d(xs).
#[napi]
pub fn moe_permute_backward(
    dxs: &[f32],
    slot: &[i32],
    tokens: TokenShape,
    mut dx: Float32ArraySlice,
) -> Result<()> {
    let dx = unsafe { dx.as_mut() };
    js(moe::permute_backward(dxs, slot, tokens.tokens(), dx))
}

/// y [N, d] = weighted sum of each token's expert outputs.
#[napi]
pub fn moe_combine(
    ys: &[f32],
    slot: &[i32],
    weights: &[f32],
    tokens: TokenShape,
    mut y: Float32ArraySlice,
) -> Result<()> {
    let y = unsafe { y.as_mut() };
    js(moe::combine(ys, slot, weights, tokens.tokens(), y))
}

/// d(ys) and d(weights) of moeCombine.
#[napi]
pub fn moe_combine_backward(
    dy: &[f32],
    ys: &[f32],
    slot: &[i32],
    weights: &[f32],
    tokens: TokenShape,
    mut dys: Float32ArraySlice,
    mut dweights: Float32ArraySlice,
) -> Result<()> {
    let dys = unsafe { dys.as_mut() };
    let dweights = unsafe { dweights.as_mut() };
    let t = tokens.tokens();
    js(moe::combine_backward(
        dy, ys, slot, weights, t, dys, dweights,
    ))
}

/// The correction bias update in place: rule "sign" (bias += gamma * sign(mean - load)) or
/// "error" (bias += gamma * (mean - load) / mean).
#[napi]
pub fn bias_update(
    mut bias: Float32ArraySlice,
    offsets: &[i32],
    gamma: f64,
    rule: String,
) -> Result<()> {
    let rule = match rule.as_str() {
        "sign" => moe::BiasRule::Sign,
        "error" => moe::BiasRule::Error,
        "clipped" => moe::BiasRule::Clipped,
        r => {
            return Err(Error::new(
                Status::InvalidArg,
                format!("biasUpdate: rule \"{r}\" (allowed: sign, error)"),
            ))
        }
    };
    let bias = unsafe { bias.as_mut() };
    js(moe::bias_update(bias, offsets, gamma, rule))
}

/// Mean cross-entropy (returned) and dlogits (written).
#[napi]
pub fn cross_entropy(
    logits: &[f32],
    targets: &[i32],
    n: u32,
    v: u32,
    grad_scale: f64,
    mut dlogits: Float32ArraySlice,
) -> Result<f64> {
    let dlogits = unsafe { dlogits.as_mut() };
    js(moe::cross_entropy(
        logits, targets, n as usize, v as usize, grad_scale, dlogits,
    ))
}

/// [norm, scale] of global-norm clipping over all `grads`.
#[napi]
pub fn clip_scale(grads: Vec<Float32Array>, max_norm: f64) -> Vec<f64> {
    let slices: Vec<&[f32]> = grads.iter().map(|g| g.as_ref()).collect();
    let (n, s) = optim::clip_scale(&slices, max_norm);
    vec![n, s]
}

/// AdamW's hyperparameters for one step (the Backend's AdamWOptions with the gradient scale
/// read on the host).
#[napi(object)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1-based step for the bias correction.
    pub step: f64,
    /// Multiplies the gradient (global-norm clipping).
    pub grad_scale: f64,
}

/// One tensor of `adamwMulti`. Each moment is given as f32 (`mF32`) or BF16 bits (`mBf16`); pass
/// an empty array for the storage not used.
#[napi(object)]
pub struct AdamWTensor {
    pub p: Float32Array,
    pub g: Float32Array,
    pub m_f32: Float32Array,
    pub m_bf16: Uint16Array,
    pub v_f32: Float32Array,
    pub v_bf16: Uint16Array,
    /// The weight decay applies.
    pub decay: bool,
}

/// The bytes of `x`, and whether the call writes them.
fn span<T>(x: &[T], out: bool) -> (usize, usize, bool) {
    let start = x.as_ptr() as usize;
    (start, start + std::mem::size_of_val(x), out)
}

/// Errors when any array AdamW writes (p, m, v of any tensor) shares bytes with another array of
/// the call (gradients may share with each other): one sort of the byte ranges.
fn no_alias_multi(ranges: &mut Vec<(usize, usize, bool)>) -> Result<()> {
    ranges.retain(|r| r.0 < r.1);
    ranges.sort_unstable();
    let (mut end_any, mut end_out) = (0usize, 0usize);
    for &(start, end, out) in ranges.iter() {
        if start < end_out || (out && start < end_any) {
            return Err(Error::new(
                Status::InvalidArg,
                "adamw: an output shares memory with another array".to_string(),
            ));
        }
        end_any = end_any.max(end);
        if out {
            end_out = end_out.max(end);
        }
    }
    Ok(())
}

/// A moment's storage: the BF16 bits when given, else the f32 values.
fn moment<'a>(f: &'a mut Float32Array, b: &'a mut Uint16Array) -> optim::Moment<'a> {
    if b.is_empty() {
        optim::Moment::F32(unsafe { f.as_mut() })
    } else {
        optim::Moment::Bf16(unsafe { b.as_mut() })
    }
}

/// AdamW in place on every tensor, `o.weightDecay` applying to those marked `decay`.
#[napi]
pub fn adamw_multi(mut tensors: Vec<AdamWTensor>, o: AdamWParams) -> Result<()> {
    let mut ranges = Vec::with_capacity(tensors.len() * 6);
    for t in &tensors {
        ranges.push(span(&t.g[..], false));
        ranges.extend([
            span(&t.p[..], true),
            span(&t.m_f32[..], true),
            span(&t.v_f32[..], true),
        ]);
        ranges.extend([span(&t.m_bf16[..], true), span(&t.v_bf16[..], true)]);
    }
    no_alias_multi(&mut ranges)?;
    let slots = tensors
        .iter_mut()
        .map(|t| {
            let AdamWTensor {
                p,
                g,
                m_f32,
                m_bf16,
                v_f32,
                v_bf16,
                decay,
            } = t;
            optim::Slot {
                p: unsafe { p.as_mut() },
                g,
                m: moment(m_f32, m_bf16),
                v: moment(v_f32, v_bf16),
                decay: *decay,
            }
        })
        .collect();
    let o = optim::AdamW {
        lr: o.lr,
        beta1: o.beta1,
        beta2: o.beta2,
        eps: o.eps,
        weight_decay: o.weight_decay,
        step: o.step,
        grad_scale: o.grad_scale,
    };
    js(optim::adamw_multi(slots, o))
}
