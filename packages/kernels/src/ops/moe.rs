//! Routing, dispatch/combine, load balancing and the fused cross-entropy, following
//! packages/tensor/src/ts/moe.ts (f64 arithmetic where the reference uses JS numbers).

use super::nn::R;
use super::util::{dot_f64, exp_f32, multiversion, rows_per_task, sum_f64_by};
use rayon::prelude::*;

#[inline]
fn sigmoid64(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn check_idx(op: &str, idx: &[i32], n: usize) -> R<()> {
    match idx.iter().find(|&&e| e < 0 || e as usize >= n) {
        Some(e) => Err(format!("{op}: index {e} outside [0, {n})")),
        None => Ok(()),
    }
}

/// Routing of `n` tokens to the top `k` of `e` experts, weights scaled by `scaling`.
#[derive(Clone, Copy, Debug)]
pub struct Routing {
    pub n: usize,
    pub e: usize,
    pub k: usize,
    pub scaling: f64,
}

/// Sigmoid scores, top-k over f32(score + bias) with ties to the lower expert index, and
/// weights = scaling * s / sum(selected s).
pub fn router(
    logits: &[f32],
    bias: &[f32],
    r: &Routing,
    scores: &mut [f32],
    top: &mut [i32],
    weights: &mut [f32],
) -> R<()> {
    let Routing { n, e, k, scaling } = *r;
    if logits.len() != n * e
        || bias.len() != e
        || scores.len() != n * e
        || top.len() != n * k
        || weights.len() != n * k
    {
        return Err(format!("router: sizes do not match N {n}, E {e}, k {k}"));
    }
    if k > e {
        return Err(format!("router: top-{k} of {e} experts"));
    }
    if n == 0 || e == 0 {
        return Ok(());
    }
    let rt = rows_per_task(e * 8);
    scores
        .par_chunks_mut(rt * e)
        .zip(logits.par_chunks(rt * e))
        .zip(
            top.par_chunks_mut((rt * k).max(1))
                .zip(weights.par_chunks_mut((rt * k).max(1))),
        )
        .for_each(|((sc, lg), (tp, wt))| {
            let mut chosen = vec![false; e];
            for (row, (s, l)) in sc.chunks_exact_mut(e).zip(lg.chunks_exact(e)).enumerate() {
                for (s, &l) in s.iter_mut().zip(l) {
                    *s = sigmoid64(l as f64) as f32;
                }
                chosen.fill(false);
                let mut sum = 0f64;
                let tr = &mut tp[row * k..][..k];
                for t in tr.iter_mut() {
                    let mut best = usize::MAX;
                    let mut best_v = f32::NEG_INFINITY;
                    for x in 0..e {
                        let v = s[x] + bias[x];
                        if !chosen[x] && (best == usize::MAX || v > best_v) {
                            best = x;
                            best_v = v;
                        }
                    }
                    chosen[best] = true;
                    *t = best as i32;
                    sum += s[best] as f64;
                }
                for (w, &t) in wt[row * k..][..k].iter_mut().zip(tr.iter()) {
                    *w = ((scaling * s[t as usize] as f64) / sum) as f32;
                }
            }
        });
    Ok(())
}

/// d(logits) from d(weights) (and an optional d(scores): empty when absent).
pub fn router_backward(
    dweights: &[f32],
    scores: &[f32],
    top: &[i32],
    r: &Routing,
    dscores: &[f32],
    dlogits: &mut [f32],
) -> R<()> {
    let Routing { n, e, k, scaling } = *r;
    let has_ds = !dscores.is_empty();
    if dweights.len() != n * k
        || scores.len() != n * e
        || top.len() != n * k
        || dlogits.len() != n * e
        || (has_ds && dscores.len() != n * e)
    {
        return Err(format!(
            "routerBackward: sizes do not match N {n}, E {e}, k {k}"
        ));
    }
    check_idx("routerBackward", top, e)?;
    if n == 0 || e == 0 {
        return Ok(());
    }
    let rt = rows_per_task(e * 8);
    dlogits
        .par_chunks_mut(rt * e)
        .enumerate()
        .for_each(|(tk, dl)| {
            let mut ds = vec![0f64; e];
            for (i, dlr) in dl.chunks_exact_mut(e).enumerate() {
                let row = tk * rt + i;
                let s = &scores[row * e..][..e];
                if has_ds {
                    for (d, &v) in ds.iter_mut().zip(&dscores[row * e..][..e]) {
                        *d = v as f64;
                    }
                } else {
                    ds.fill(0.0);
                }
                let (tr, dw) = (&top[row * k..][..k], &dweights[row * k..][..k]);
                let mut ss = 0f64;
                let mut dot = 0f64;
                for j in 0..k {
                    let sv = s[tr[j] as usize] as f64;
                    ss += sv;
                    dot += dw[j] as f64 * sv;
                }
                for j in 0..k {
                    ds[tr[j] as usize] += scaling * (dw[j] as f64 / ss - dot / (ss * ss));
                }
                for x in 0..e {
                    let sv = s[x] as f64;
                    dlr[x] = (ds[x] * sv * (1.0 - sv)) as f32;
                }
            }
        });
    Ok(())
}

/// The balance loss's inputs: `batch` sequences of `seq` tokens, each routed to `k` of `e`
/// experts, and the loss weight.
#[derive(Clone, Copy, Debug)]
pub struct Balance {
    pub batch: usize,
    pub seq: usize,
    pub e: usize,
    pub k: usize,
    pub alpha: f64,
}

/// Sequence-wise balance loss alpha * sum_i f_i P_i averaged over the B sequences, and
/// d(loss)/d(scores). Returns the loss (f64).
pub fn balance_loss(scores: &[f32], top: &[i32], p: &Balance, dscores: &mut [f32]) -> R<f64> {
    let Balance {
        batch: b,
        seq: t,
        e,
        k,
        alpha,
    } = *p;
    if scores.len() != b * t * e || top.len() != b * t * k || dscores.len() != scores.len() {
        return Err(format!(
            "balanceLoss: sizes do not match batch {b}, seq {t}, E {e}, k {k}"
        ));
    }
    check_idx("balanceLoss", top, e)?;
    if b * t * e == 0 {
        return Ok(0.0);
    }
    let (bf, tf, ef, kf) = (b as f64, t as f64, e as f64, k as f64);
    // Per sequence: the loss terms alpha f_e P_e / B in expert order, added in sequence order below.
    let terms: Vec<Vec<f64>> = dscores
        .par_chunks_mut(t * e)
        .enumerate()
        .map(|(bi, dsb)| {
            let mut f = vec![0f64; e];
            let mut p = vec![0f64; e];
            for ti in 0..t {
                let nn = bi * t + ti;
                for j in 0..k {
                    f[top[nn * k + j] as usize] += ef / (kf * tf);
                }
                let s = &scores[nn * e..][..e];
                let mut z = 0f64;
                for &v in s {
                    z += v as f64;
                }
                for (pe, &v) in p.iter_mut().zip(s) {
                    *pe += v as f64 / z / tf;
                }
            }
            let terms: Vec<f64> = (0..e).map(|x| (alpha * f[x] * p[x]) / bf).collect();
            for ti in 0..t {
                let nn = bi * t + ti;
                let s = &scores[nn * e..][..e];
                let mut z = 0f64;
                for &v in s {
                    z += v as f64;
                }
                let mut fp = 0f64;
                for x in 0..e {
                    fp += (f[x] * s[x] as f64) / z;
                }
                let c = alpha / (bf * tf * z);
                for (x, d) in dsb[ti * e..][..e].iter_mut().enumerate() {
                    *d = (c * (f[x] - fp)) as f32;
                }
            }
            terms
        })
        .collect();
    let mut loss = 0f64;
    for tb in &terms {
        for &v in tb {
            loss += v;
        }
    }
    Ok(loss)
}

/// The dispatch of `n` token rows of width `d`, each to `k` of `experts` experts.
#[derive(Clone, Copy, Debug)]
pub struct Dispatch {
    pub n: usize,
    pub d: usize,
    pub k: usize,
    pub experts: usize,
}

/// Rows grouped by expert, then by token, then by rank: offsets [E+1], slot [N*k], xs = x[slot/k].
pub fn permute(
    x: &[f32],
    top: &[i32],
    p: &Dispatch,
    xs: &mut [f32],
    slot: &mut [i32],
    offsets: &mut [i32],
) -> R<()> {
    let Dispatch {
        n,
        d,
        k,
        experts: e,
    } = *p;
    if x.len() != n * d
        || top.len() != n * k
        || xs.len() != n * k * d
        || slot.len() != n * k
        || offsets.len() != e + 1
    {
        return Err(format!(
            "moePermute: sizes do not match N {n}, k {k}, d {d}, E {e}"
        ));
    }
    check_idx("moePermute", top, e)?;
    offsets.fill(0);
    for &t in top {
        offsets[t as usize + 1] += 1;
    }
    for x in 0..e {
        offsets[x + 1] += offsets[x];
    }
    let mut fill: Vec<i32> = offsets[..e].to_vec();
    for (i, &t) in top.iter().enumerate() {
        slot[fill[t as usize] as usize] = i as i32;
        fill[t as usize] += 1;
    }
    if d == 0 || k == 0 {
        return Ok(());
    }
    let rt = rows_per_task(d);
    let slot: &[i32] = slot;
    xs.par_chunks_mut(rt * d).enumerate().for_each(|(tk, xb)| {
        for (i, row) in xb.chunks_exact_mut(d).enumerate() {
            let src = slot[tk * rt + i] as usize / k;
            row.copy_from_slice(&x[src * d..][..d]);
        }
    });
    Ok(())
}

/// pos[slot[r]] = r, checking that slot is a permutation of 0..len.
fn inverse(slot: &[i32]) -> R<Vec<u32>> {
    let mut pos = vec![u32::MAX; slot.len()];
    for (r, &s) in slot.iter().enumerate() {
        if s < 0 || s as usize >= slot.len() || pos[s as usize] != u32::MAX {
            return Err(format!(
                "moe: slot is not a permutation (entry {s} at row {r})"
            ));
        }
        pos[s as usize] = r as u32;
    }
    Ok(pos)
}

/// dx[n] = sum over j of dxs[pos[n*k+j]] (f32 adds in rank order).
pub fn permute_backward(dxs: &[f32], slot: &[i32], t: Tokens, dx: &mut [f32]) -> R<()> {
    let Tokens { n, d } = t;
    if n == 0 || !slot.len().is_multiple_of(n) || dxs.len() != slot.len() * d || dx.len() != n * d {
        if n == 0 && slot.is_empty() && dx.is_empty() {
            return Ok(());
        }
        return Err(format!(
            "moePermuteBackward: sizes do not match ({} slots for {n} tokens, d {d})",
            slot.len()
        ));
    }
    let k = slot.len() / n;
    let pos = inverse(slot)?;
    if d == 0 {
        return Ok(());
    }
    let rt = rows_per_task(d);
    dx.par_chunks_mut(rt * d).enumerate().for_each(|(tk, db)| {
        for (i, row) in db.chunks_exact_mut(d).enumerate() {
            let tok = tk * rt + i;
            row.fill(0.0);
            for j in 0..k {
                let r = pos[tok * k + j] as usize;
                for (o, &v) in row.iter_mut().zip(&dxs[r * d..][..d]) {
                    *o += v;
                }
            }
        }
    });
    Ok(())
}

multiversion! {
    fn combine_row(ys: &[f32], pos: &[u32], w: &[f32], d: usize, acc: &mut [f64], out: &mut [f32]) {
        acc.fill(0.0);
        for (&r, &wj) in pos.iter().zip(w) {
            let wj = wj as f64;
            for (a, &y) in acc.iter_mut().zip(&ys[r as usize * d..][..d]) { *a += wj * y as f64; }
        }
        for (o, &a) in out.iter_mut().zip(acc.iter()) { *o = a as f32; }
    }
}

/// `n` tokens of width `d` (the rows of the combine's output; k, the rows per token, follows from
/// the slot count).
#[derive(Clone, Copy, Debug)]
pub struct Tokens {
    pub n: usize,
    pub d: usize,
}

/// y[n] = sum_j w[n, j] * ys[pos[n*k+j]], in f64.
pub fn combine(ys: &[f32], slot: &[i32], w: &[f32], t: Tokens, y: &mut [f32]) -> R<()> {
    let Tokens { n, d } = t;
    if n == 0
        || !slot.len().is_multiple_of(n)
        || w.len() != slot.len()
        || ys.len() != slot.len() * d
        || y.len() != n * d
    {
        if n == 0 && slot.is_empty() && y.is_empty() {
            return Ok(());
        }
        return Err(format!(
            "moeCombine: sizes do not match ({} slots for {n} tokens, d {d})",
            slot.len()
        ));
    }
    let k = slot.len() / n;
    let pos = inverse(slot)?;
    if d == 0 {
        return Ok(());
    }
    let rt = rows_per_task(d);
    y.par_chunks_mut(rt * d).enumerate().for_each(|(tk, yb)| {
        let mut acc = vec![0f64; d];
        for (i, row) in yb.chunks_exact_mut(d).enumerate() {
            let tok = tk * rt + i;
            combine_row(
                ys,
                &pos[tok * k..][..k],
                &w[tok * k..][..k],
                d,
                &mut acc,
                row,
            );
        }
    });
    Ok(())
}

/// dys[r] = w[slot[r]] * dy[slot[r]/k]; dweights[slot[r]] = dy[slot[r]/k] . ys[r] (f64).
pub fn combine_backward(
    dy: &[f32],
    ys: &[f32],
    slot: &[i32],
    w: &[f32],
    t: Tokens,
    dys: &mut [f32],
    dweights: &mut [f32],
) -> R<()> {
    let Tokens { n, d } = t;
    if n == 0
        || !slot.len().is_multiple_of(n)
        || w.len() != slot.len()
        || ys.len() != slot.len() * d
        || dys.len() != ys.len()
        || dy.len() != n * d
        || dweights.len() != slot.len()
    {
        if n == 0 && slot.is_empty() {
            return Ok(());
        }
        return Err(format!(
            "moeCombineBackward: sizes do not match ({} slots for {n} tokens, d {d})",
            slot.len()
        ));
    }
    let k = slot.len() / n;
    inverse(slot)?;
    if d == 0 {
        dweights.fill(0.0);
        return Ok(());
    }
    let rt = rows_per_task(d);
    let dots: Vec<f32> = dys
        .par_chunks_mut(rt * d)
        .enumerate()
        .flat_map_iter(|(tk, db)| {
            let mut out = Vec::with_capacity(db.len() / d);
            for (i, row) in db.chunks_exact_mut(d).enumerate() {
                let r = tk * rt + i;
                let si = slot[r] as usize;
                let tok = si / k;
                let dyr = &dy[tok * d..][..d];
                let wi = w[si];
                for (o, &g) in row.iter_mut().zip(dyr) {
                    *o = wi * g;
                }
                out.push(dot_f64(dyr, &ys[r * d..][..d]) as f32);
            }
            out
        })
        .collect();
    for (r, &v) in dots.iter().enumerate() {
        dweights[slot[r] as usize] = v;
    }
    Ok(())
}

/// How the correction bias follows the loads (docs/model.md, "Balancing").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BiasRule {
    /// bias_e += gamma * sign(mean - load_e) (DeepSeek-V3).
    Sign,
    /// bias_e += gamma * (mean - load_e) / mean: the step scaled by the relative load error.
    Error,
    /// Error's step with the relative error clipped to [-1, 1].
    Clipped,
}

/// The correction bias update, loads from the permute offsets (f64, one rounding per bias).
pub fn bias_update(bias: &mut [f32], offsets: &[i32], gamma: f64, rule: BiasRule) -> R<()> {
    let e = bias.len();
    if offsets.len() != e + 1 {
        return Err(format!(
            "biasUpdate: {} offsets for {e} experts",
            offsets.len()
        ));
    }
    if e == 0 {
        return Ok(());
    }
    let mean = (offsets[e] - offsets[0]) as f64 / e as f64;
    if mean <= 0.0 {
        return Ok(()); // no token was routed: no load to balance
    }
    for (x, b) in bias.iter_mut().enumerate() {
        let load = (offsets[x + 1] - offsets[x]) as f64;
        let diff = mean - load;
        let step = match rule {
            BiasRule::Sign => {
                if diff > 0.0 {
                    1.0
                } else if diff < 0.0 {
                    -1.0
                } else {
                    0.0
                }
            }
            BiasRule::Error => diff / mean,
            BiasRule::Clipped => (diff / mean).clamp(-1.0, 1.0),
        };
        *b = (*b as f64 + gamma * step) as f32;
    }
    Ok(())
}

multiversion! {
    /// One row of the cross-entropy: writes exp(l - max) into `dl`, returns (max, sum).
    fn ce_exp_row(l: &[f32], dl: &mut [f32]) -> (f32, f64) {
        let mut mx = [f32::NEG_INFINITY; 16];
        let ch = l.chunks_exact(16);
        let rest = ch.remainder();
        for c in ch {
            let c: &[f32; 16] = c.try_into().unwrap();
            for x in 0..16 { mx[x] = if c[x] > mx[x] { c[x] } else { mx[x] }; }
        }
        let mut m = f32::NEG_INFINITY;
        for &v in mx.iter().chain(rest) { if v > m { m = v; } }
        for (o, &v) in dl.iter_mut().zip(l) { *o = exp_f32(v - m); }
        (m, sum_f64_by(dl, |v| v as f64))
    }
}

multiversion! {
    fn ce_scale_row(dl: &mut [f32], c: f64) {
        for v in dl.iter_mut() { *v = (*v as f64 * c) as f32; }
    }
}

/// Mean token cross-entropy (returned, f64) and dlogits = gradScale (softmax - onehot) / N.
pub fn cross_entropy(
    logits: &[f32],
    targets: &[i32],
    n: usize,
    v: usize,
    grad_scale: f64,
    dlogits: &mut [f32],
) -> R<f64> {
    if logits.len() != n * v || targets.len() != n || dlogits.len() != n * v {
        return Err(format!("crossEntropy: sizes do not match N {n}, V {v}"));
    }
    if let Some(&t) = targets.iter().find(|&&t| t < 0 || t as usize >= v) {
        return Err(format!(
            "crossEntropy: target {t} outside the vocabulary of {v}"
        ));
    }
    if n == 0 || v == 0 {
        return Ok(if n == 0 { f64::NAN } else { 0.0 });
    }
    let nf = n as f64;
    let losses: Vec<f64> = dlogits
        .par_chunks_mut(v)
        .zip(logits.par_chunks(v))
        .zip(targets.par_iter())
        .map(|((dl, l), &t)| {
            let (m, z) = ce_exp_row(l, dl);
            let t = t as usize;
            let loss = m as f64 + z.ln() - l[t] as f64;
            ce_scale_row(dl, grad_scale / z / nf);
            dl[t] = (dl[t] as f64 - grad_scale / nf) as f32;
            loss
        })
        .collect();
    let mut loss = 0f64;
    for l in losses {
        loss += l;
    }
    Ok(loss / nf)
}
