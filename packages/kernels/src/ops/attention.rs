//! Causal attention, forward and backward, as packages/tensor/src/ts/nn.ts defines it, computed
//! flash-attention style in 64x64 tiles with f32 accumulation.
//!
//! Layouts: q [B*T, H*dqk], o [B*T, H*dv] (row b*T+i, head h at column h*d); k [B*Tk, H*dqk], v
//! [B*Tk, H*dv]; lse [B*H*T]. Tk = T but in the forward of a KV-cache decode step, which has fewer
//! queries than keys, the queries at the last positions: query i sees keys 0..Tk-T+i (decode_task).
//! Forward: one task per (batch, head, 64-query block); an online softmax over the key tiles up to
//! the diagonal. In `bf16` precision q, k, v are rounded to BF16 and the *normalised*
//! probabilities are rounded before the P.V product (the reference's rounding point), which needs
//! the row's max and normaliser first: a first pass over the key tiles finds them, a second
//! accumulates P.V. Backward: one task per (batch, head); P is recomputed from lse tile by tile
//! (P = exp(s * scale - lse)); dS = P (dP - D) with D = rowsum(dO * o), rounded to BF16 (and P
//! too) in `bf16` precision as the reference does. Every reduction runs in a fixed order, so the
//! results are bit-for-bit repeatable and identical at every SIMD level.

use super::nn::R;
use super::util::{exp_f32, multiversion, round_bf16, SendPtr};
use rayon::prelude::*;

const BQ: usize = 64;
const BK: usize = 64;

#[derive(Clone, Copy)]
pub struct Dims {
    pub b: usize,
    /// Queries per batch.
    pub t: usize,
    /// Keys (and values) per batch, at least `t`.
    pub tk: usize,
    pub h: usize,
    pub dqk: usize,
    pub dv: usize,
    pub scale: f32,
    pub lowp: bool,
}

impl Dims {
    /// Keys padded to whole tiles.
    fn tpad(&self) -> usize {
        self.tk.div_ceil(BK) * BK
    }
    /// Head widths padded to a multiple of 16 (zeros), so that row updates run on whole vectors.
    fn dqkp(&self) -> usize {
        self.dqk.div_ceil(16) * 16
    }
    fn dvp(&self) -> usize {
        self.dv.div_ceil(16) * 16
    }
    fn check(&self, q: usize, k: usize, v: usize) -> R<()> {
        let (n, nk) = (self.b * self.t * self.h, self.b * self.tk * self.h);
        if self.tk < self.t || q != n * self.dqk || k != nk * self.dqk || v != nk * self.dv {
            return Err(format!(
                "attention: q {q}, k {k}, v {v} elements for batch {} x seq {} (kvSeq {}) x heads {} (dqk {}, dv {})",
                self.b, self.t, self.tk, self.h, self.dqk, self.dv
            ));
        }
        Ok(())
    }
}

/// One (batch, head) pair: the slice of the activations a task reads and writes.
#[derive(Clone, Copy)]
struct Head {
    b: usize,
    h: usize,
}

/// A row-major matrix (or a tile of one) with row stride `ld`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    x: &'a [f32],
    ld: usize,
}

/// What the backward pass reads of the forward: its inputs q, k, v and its outputs o and lse.
#[derive(Clone, Copy)]
pub struct Saved<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub o: &'a [f32],
    pub lse: &'a [f32],
}

/// The backward pass's outputs, shaped as q, k and v.
pub struct Grads<'a> {
    pub dq: &'a mut [f32],
    pub dk: &'a mut [f32],
    pub dv: &'a mut [f32],
}

#[inline(always)]
fn rd(x: f32, lowp: bool) -> f32 {
    if lowp {
        round_bf16(x)
    } else {
        x
    }
}

/// Copies head `hd.h` of batch `hd.b` of x [B*n, H*d] into rows [n, dp] (zero-padded to `rows`
/// rows of `dp >= d` columns), BF16-rounded in bf16 precision.
#[allow(clippy::too_many_arguments)]
fn gather_rows(
    x: &[f32],
    dm: &Dims,
    hd: Head,
    n: usize,
    d: usize,
    dp: usize,
    rows: usize,
    out: &mut [f32],
) {
    out[..rows * dp].fill(0.0);
    for i in 0..n {
        let src = &x[((hd.b * n + i) * dm.h + hd.h) * d..][..d];
        for (o, &v) in out[i * dp..][..d].iter_mut().zip(src) {
            *o = rd(v, dm.lowp);
        }
    }
}

/// Head `hd.h` of batch `hd.b` of x [B*n, H*d], transposed to [d, ld] (zero beyond n),
/// BF16-rounded in bf16 precision.
fn gather_transposed(
    x: &[f32],
    dm: &Dims,
    hd: Head,
    n: usize,
    d: usize,
    ld: usize,
    out: &mut [f32],
) {
    out[..d * ld].fill(0.0);
    for i in 0..n {
        let src = &x[((hd.b * n + i) * dm.h + hd.h) * d..][..d];
        for (c, &v) in src.iter().enumerate() {
            out[c * ld + i] = rd(v, dm.lowp);
        }
    }
}

/// s[r, 0..BK] = sum_{c<d} a[r, c] * bt[c, j0..j0+BK] for r < nr (nr a multiple of 4).
#[inline(always)]
fn tile_product(a: Mat, nr: usize, d: usize, bt: Mat, j0: usize, s: &mut [f32]) {
    let (Mat { x: a, ld: lda }, Mat { x: bt, ld }) = (a, bt);
    let mut r = 0;
    while r < nr {
        let mut acc = [[0f32; BK]; 4];
        for c in 0..d {
            let brow: &[f32; BK] = bt[c * ld + j0..][..BK].try_into().unwrap();
            let a0 = a[r * lda + c];
            let a1 = a[(r + 1) * lda + c];
            let a2 = a[(r + 2) * lda + c];
            let a3 = a[(r + 3) * lda + c];
            for j in 0..BK {
                acc[0][j] += a0 * brow[j];
                acc[1][j] += a1 * brow[j];
                acc[2][j] += a2 * brow[j];
                acc[3][j] += a3 * brow[j];
            }
        }
        for (q, row) in acc.iter().enumerate() {
            s[(r + q) * BK..][..BK].copy_from_slice(row);
        }
        r += 4;
    }
}

#[inline(always)]
fn row_max(x: &[f32; BK]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    for c in x.chunks_exact(16) {
        let c: &[f32; 16] = c.try_into().unwrap();
        for l in 0..16 {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    m.iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

#[inline(always)]
fn row_sum(x: &[f32; BK]) -> f32 {
    let mut s = [0f32; 16];
    for c in x.chunks_exact(16) {
        let c: &[f32; 16] = c.try_into().unwrap();
        for l in 0..16 {
            s[l] += c[l];
        }
    }
    let mut t = 0f32;
    for v in s {
        t += v;
    }
    t
}

/// y[0..16] += sum over j < n of a[j * sa] * x[j * ldx ..][..16], with four independent add
/// chains (j mod 4) combined at the end in a fixed order.
#[inline(always)]
fn gemv16(y: &mut [f32], a: &[f32], sa: usize, x: &[f32], ldx: usize, n: usize) {
    // Four separate accumulator rows (not one 2-D array), so that LLVM keeps them in registers
    // instead of spilling them to the stack every iteration.
    let (mut c0, mut c1, mut c2, mut c3) = ([0f32; 16], [0f32; 16], [0f32; 16], [0f32; 16]);
    #[inline(always)]
    fn axpy(c: &mut [f32; 16], a: f32, x: &[f32]) {
        let x: &[f32; 16] = x[..16].try_into().unwrap();
        for l in 0..16 {
            c[l] += a * x[l];
        }
    }
    let mut j = 0;
    while j + 4 <= n {
        axpy(&mut c0, a[j * sa], &x[j * ldx..]);
        axpy(&mut c1, a[(j + 1) * sa], &x[(j + 1) * ldx..]);
        axpy(&mut c2, a[(j + 2) * sa], &x[(j + 2) * ldx..]);
        axpy(&mut c3, a[(j + 3) * sa], &x[(j + 3) * ldx..]);
        j += 4;
    }
    for jj in j..n {
        axpy(&mut c0, a[jj * sa], &x[jj * ldx..]);
    }
    let yr: &mut [f32; 16] = (&mut y[..16]).try_into().unwrap();
    for l in 0..16 {
        yr[l] += (c0[l] + c1[l]) + (c2[l] + c3[l]);
    }
}

/// y += sum over j < n of a[j * sa] * x[j * ldx ..][..y.len()]; y.len() is a multiple of 16.
#[inline(always)]
fn gemv_acc(y: &mut [f32], a: &[f32], sa: usize, x: &[f32], ldx: usize, n: usize) {
    for c0 in (0..y.len()).step_by(16) {
        gemv16(&mut y[c0..], a, sa, &x[c0..], ldx, n);
    }
}

/// Scales the scores of row `r` (query `i`) of a tile starting at key `j0`, masking j > i to -inf.
#[inline(always)]
fn scaled_masked(s: &mut [f32; BK], scale: f32, valid: usize) {
    for (j, v) in s.iter_mut().enumerate() {
        let x = *v * scale;
        *v = if j < valid { x } else { f32::NEG_INFINITY };
    }
}

/// The forward's outputs o and lse, written by disjoint tasks (see forward_task).
#[derive(Clone, Copy)]
struct ForwardOut {
    o: SendPtr<f32>,
    lse: SendPtr<f32>,
}

/// The backward's outputs dq, dk and dv, written by disjoint tasks (see backward_task).
#[derive(Clone, Copy)]
struct GradsOut {
    dq: SendPtr<f32>,
    dk: SendPtr<f32>,
    dv: SendPtr<f32>,
}

multiversion! {
    /// One (batch, head, query block) of the forward pass; writes o rows and lse entries.
    fn forward_task(
        q: &[f32], kt: &[f32], vv: &[f32], dm: &Dims, hd: Head, qb: usize, out: ForwardOut,
    ) {
        let ForwardOut { o, lse } = out;
        let (bb, hh) = (hd.b, hd.h);
        let (t, dqk, dv, dvp, ld) = (dm.t, dm.dqk, dm.dv, dm.dvp(), dm.tpad());
        let i0 = qb * BQ;
        let nq = BQ.min(t - i0);
        let nq4 = nq.div_ceil(4) * 4;
        let mut qt = vec![0f32; nq4 * dqk];
        for r in 0..nq {
            let src = &q[((bb * t + i0 + r) * dm.h + hh) * dqk..][..dqk];
            for (d, &v) in qt[r * dqk..][..dqk].iter_mut().zip(src) { *d = rd(v, dm.lowp); }
        }
        let mut s = vec![0f32; BQ * BK];
        let mut m = [f32::NEG_INFINITY; BQ];
        let mut l = [0f32; BQ];
        let mut acc = vec![0f32; nq * dvp];
        let last = (i0 + nq - 1) / BK;
        // Pass 1 (and, in f32, the only pass): online max and normaliser, with P.V in f32.
        for kb in 0..=last {
            let j0 = kb * BK;
            tile_product(Mat { x: &qt, ld: dqk }, nq4, dqk, Mat { x: kt, ld }, j0, &mut s);
            for r in 0..nq {
                let i = i0 + r;
                if i < j0 { continue; }
                let valid = (i + 1 - j0).min(BK);
                let sr: &mut [f32; BK] = (&mut s[r * BK..][..BK]).try_into().unwrap();
                scaled_masked(sr, dm.scale, valid);
                let mnew = { let mx = row_max(sr); if mx > m[r] { mx } else { m[r] } };
                let alpha = exp_f32(m[r] - mnew);
                for v in sr.iter_mut() { *v = exp_f32(*v - mnew); }
                l[r] = l[r] * alpha + row_sum(sr);
                m[r] = mnew;
                if !dm.lowp {
                    let ar = &mut acc[r * dvp..][..dvp];
                    for a in ar.iter_mut() { *a *= alpha; }
                    gemv_acc(ar, &sr[..], 1, &vv[j0 * dvp..], dvp, valid);
                }
            }
        }
        if dm.lowp {
            // Pass 2: P = bf16(exp(s - m) / l), accumulated against BF16 v in f32.
            for kb in 0..=last {
                let j0 = kb * BK;
                tile_product(Mat { x: &qt, ld: dqk }, nq4, dqk, Mat { x: kt, ld }, j0, &mut s);
                for r in 0..nq {
                    let i = i0 + r;
                    if i < j0 { continue; }
                    let valid = (i + 1 - j0).min(BK);
                    let sr: &mut [f32; BK] = (&mut s[r * BK..][..BK]).try_into().unwrap();
                    scaled_masked(sr, dm.scale, valid);
                    let (mr, lr) = (m[r], l[r]);
                    for v in sr.iter_mut() { *v = round_bf16(exp_f32(*v - mr) / lr); }
                    gemv_acc(&mut acc[r * dvp..][..dvp], &sr[..], 1, &vv[j0 * dvp..], dvp, valid);
                }
            }
        }
        for r in 0..nq {
            let i = i0 + r;
            // SAFETY: row (b, i), head h of o and entry (b, h, i) of lse belong to this task only.
            let orow = unsafe { o.slice(((bb * t + i) * dm.h + hh) * dv, dv) };
            let ar = &acc[r * dvp..][..dv];
            if dm.lowp {
                orow.copy_from_slice(ar);
            } else {
                let inv = l[r];
                for (o, &a) in orow.iter_mut().zip(ar) { *o = a / inv; }
            }
            let le = unsafe { lse.slice((bb * dm.h + hh) * t + i, 1) };
            le[0] = (m[r] as f64 + (l[r] as f64).ln()) as f32;
        }
    }
}

multiversion! {
    /// All the queries of one (batch, head) when there are fewer queries than keys (a KV-cache decode
    /// step). The tiled forward's copies of k transposed and v padded for every (batch, head), made
    /// once and read by 64 queries, would cost a single query more than its scores: here k goes
    /// through an L1-sized buffer a tile at a time and v is read in place where it can be. The
    /// arithmetic is forward_task's in the same order (scores summed over the head dimension in
    /// order, the same online softmax tile by tile, the same P.V reductions), so each query's o and
    /// lse are the bits of its row in a full forward (attention_with_fewer_queries_... in tests.rs).
    fn decode_task(q: &[f32], k: &[f32], v: &[f32], dm: &Dims, hd: Head, out: ForwardOut) {
        let ForwardOut { o, lse } = out;
        let (bb, hh, nh) = (hd.b, hd.h, dm.h);
        let (t, tk, dqk, dv, dvp, lowp) = (dm.t, dm.tk, dm.dqk, dm.dv, dm.dvp(), dm.lowp);
        // V rows as gemv_acc reads them: in place (row stride H*dv) when they need neither BF16
        // rounding nor zero padding to whole vectors, else copied [Tpad, dvp] as forward does.
        let (vv, ldv) = if !lowp && dv == dvp {
            (std::borrow::Cow::Borrowed(&v[(bb * tk * nh + hh) * dv..]), nh * dv)
        } else {
            let mut g = vec![0f32; dm.tpad() * dvp];
            gather_rows(v, dm, hd, tk, dv, dvp, dm.tpad(), &mut g);
            (std::borrow::Cow::Owned(g), dvp)
        };
        let mut qr = vec![0f32; dqk];
        let mut kt = vec![0f32; dqk * BK];
        let mut acc = vec![0f32; dvp];
        let mut s = vec![0f32; tk.div_ceil(BK) * BK];
        for i in 0..t {
            let n = tk - t + i + 1; // the keys query i sees
            for (d, &x) in qr.iter_mut().zip(&q[((bb * t + i) * nh + hh) * dqk..][..dqk]) { *d = rd(x, lowp); }
            // Scaled scores of keys 0..n, -inf beyond, tile by tile: each tile of k transposed in
            // an L1-sized buffer (columns past `valid` hold stale values, masked), then summed over
            // the head dimension in order, 64 keys at a time.
            for j0 in (0..n).step_by(BK) {
                let valid = BK.min(n - j0);
                for j in 0..valid {
                    let src = &k[((bb * tk + j0 + j) * nh + hh) * dqk..][..dqk];
                    for (c, &x) in src.iter().enumerate() { kt[c * BK + j] = rd(x, lowp); }
                }
                let sr: &mut [f32; BK] = (&mut s[j0..][..BK]).try_into().unwrap();
                sr.fill(0.0);
                for (c, &a) in qr.iter().enumerate() {
                    let krow: &[f32; BK] = kt[c * BK..][..BK].try_into().unwrap();
                    for j in 0..BK { sr[j] += a * krow[j]; }
                }
                scaled_masked(sr, dm.scale, valid);
            }
            let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
            acc.fill(0.0);
            let mut e = [0f32; BK];
            for j0 in (0..n).step_by(BK) {
                let valid = BK.min(n - j0);
                e.copy_from_slice(&s[j0..][..BK]);
                let mnew = { let mx = row_max(&e); if mx > m { mx } else { m } };
                let alpha = exp_f32(m - mnew);
                for x in e.iter_mut() { *x = exp_f32(*x - mnew); }
                l = l * alpha + row_sum(&e);
                m = mnew;
                if !lowp {
                    for a in acc.iter_mut() { *a *= alpha; }
                    gemv_acc(&mut acc, &e[..], 1, &vv[j0 * ldv..], ldv, valid);
                }
            }
            if lowp {
                for j0 in (0..n).step_by(BK) {
                    let valid = BK.min(n - j0);
                    e.copy_from_slice(&s[j0..][..BK]);
                    for x in e.iter_mut() { *x = round_bf16(exp_f32(*x - m) / l); }
                    gemv_acc(&mut acc, &e[..], 1, &vv[j0 * ldv..], ldv, valid);
                }
            }
            // SAFETY: row (b, i), head h of o and entry (b, h, i) of lse belong to this task only.
            let orow = unsafe { o.slice(((bb * t + i) * nh + hh) * dv, dv) };
            if lowp {
                orow.copy_from_slice(&acc[..dv]);
            } else {
                for (o, &a) in orow.iter_mut().zip(&acc[..dv]) { *o = a / l; }
            }
            let le = unsafe { lse.slice((bb * nh + hh) * t + i, 1) };
            le[0] = (m as f64 + (l as f64).ln()) as f32;
        }
    }
}

/// o [B*T, H*dv] and lse [B*H*T] of causal softmax(q k^T * scale) v, the T queries of a batch at
/// its last T of Tk key positions.
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dm: Dims,
    o: &mut [f32],
    lse: &mut [f32],
) -> R<()> {
    dm.check(q.len(), k.len(), v.len())?;
    if o.len() != dm.b * dm.t * dm.h * dm.dv || lse.len() != dm.b * dm.h * dm.t {
        return Err("attention: output sizes do not match".into());
    }
    if dm.t == 0 || dm.b * dm.h == 0 {
        return Ok(());
    }
    let (ld, bh) = (dm.tpad(), dm.b * dm.h);
    let out = ForwardOut {
        o: SendPtr(o.as_mut_ptr()),
        lse: SendPtr(lse.as_mut_ptr()),
    };
    if dm.tk > dm.t {
        (0..bh).into_par_iter().for_each(|x| {
            let hd = Head {
                b: x / dm.h,
                h: x % dm.h,
            };
            decode_task(q, k, v, &dm, hd, out);
        });
        return Ok(());
    }
    // K^T [dqk, Tpad] and V [Tpad, dv] per (batch, head), BF16-rounded in bf16 precision.
    let mut kt = vec![0f32; bh * dm.dqk * ld];
    let dvp = dm.dvp();
    let mut vv = vec![0f32; bh * ld * dvp];
    kt.par_chunks_mut((dm.dqk * ld).max(1))
        .zip(vv.par_chunks_mut((ld * dvp).max(1)))
        .enumerate()
        .for_each(|(x, (kt, vv))| {
            let hd = Head {
                b: x / dm.h,
                h: x % dm.h,
            };
            gather_transposed(k, &dm, hd, dm.tk, dm.dqk, ld, kt);
            gather_rows(v, &dm, hd, dm.tk, dm.dv, dvp, ld, vv);
        });
    let nqb = dm.t.div_ceil(BQ);
    // Largest query blocks (most work) first, for a better balance under work stealing.
    (0..bh * nqb).into_par_iter().for_each(|x| {
        let qb = nqb - 1 - x / bh;
        let y = x % bh;
        let hd = Head {
            b: y / dm.h,
            h: y % dm.h,
        };
        let ktb = &kt[y * dm.dqk * ld..][..dm.dqk * ld];
        let vb = &vv[y * ld * dvp..][..ld * dvp];
        forward_task(q, ktb, vb, &dm, hd, qb, out);
    });
    Ok(())
}

multiversion! {
    /// One (batch, head) of the backward pass; writes that head's columns of dq, dk, dv.
    fn backward_task(d_o: &[f32], fwd: &Saved, dm: &Dims, hd: Head, out: GradsOut) {
        let Saved { q, k, v, o, lse } = *fwd;
        let GradsOut { dq, dk, dv: dvo } = out;
        let (bb, hh) = (hd.b, hd.h);
        let (t, dqk, dv, ld, lowp) = (dm.t, dm.dqk, dm.dv, dm.tpad(), dm.lowp);
        let (dqkp, dvp) = (dm.dqkp(), dm.dvp());
        let mut qr = vec![0f32; ld * dqkp];
        let mut kr = vec![0f32; ld * dqkp];
        let mut kt = vec![0f32; dqk * ld];
        let mut vt = vec![0f32; dv * ld];
        let mut dor = vec![0f32; ld * dvp];
        gather_rows(q, dm, hd, t, dqk, dqkp, ld, &mut qr);
        gather_rows(k, dm, hd, t, dqk, dqkp, ld, &mut kr);
        gather_transposed(k, dm, hd, t, dqk, ld, &mut kt);
        gather_transposed(v, dm, hd, t, dv, ld, &mut vt);
        gather_rows(d_o, dm, hd, t, dv, dvp, ld, &mut dor);
        // D_i = dO_i . o_i (dO rounded in bf16 precision, o as stored).
        let mut dd = vec![0f32; t];
        for (i, d) in dd.iter_mut().enumerate() {
            let orow = &o[((bb * t + i) * dm.h + hh) * dv..][..dv];
            let drow = &dor[i * dvp..][..dv];
            let mut a = [0f32; 8];
            let mut c = 0;
            while c + 8 <= dv {
                for x in 0..8 { a[x] += drow[c + x] * orow[c + x]; }
                c += 8;
            }
            for x in 0..dv - c { a[x] += drow[c + x] * orow[c + x]; }
            *d = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
        }
        let lrow = &lse[(bb * dm.h + hh) * t..][..t];
        let mut dqa = vec![0f32; ld * dqkp];
        let mut dka = vec![0f32; ld * dqkp];
        let mut dva = vec![0f32; ld * dvp];
        let mut s = vec![0f32; BQ * BK];
        let mut dp = vec![0f32; BQ * BK];
        let nqb = t.div_ceil(BQ);
        for qb in 0..nqb {
            let i0 = qb * BQ;
            let nq = BQ.min(t - i0);
            let nq4 = nq.div_ceil(4) * 4;
            let qblk = &qr[i0 * dqkp..][..nq4 * dqkp];
            let doblk = &dor[i0 * dvp..][..nq4 * dvp];
            for kb in 0..=qb {
                let j0 = kb * BK;
                tile_product(Mat { x: qblk, ld: dqkp }, nq4, dqk, Mat { x: &kt, ld }, j0, &mut s);
                tile_product(Mat { x: doblk, ld: dvp }, nq4, dv, Mat { x: &vt, ld }, j0, &mut dp);
                // s <- P (rounded in bf16), dp <- dS * scale (dS rounded in bf16).
                for r in 0..BQ {
                    let i = i0 + r;
                    let valid = if r < nq && i >= j0 { (i + 1 - j0).min(BK) } else { 0 };
                    let (li, di) = if r < nq { (lrow[i], dd[i]) } else { (0.0, 0.0) };
                    let sr: &mut [f32; BK] = (&mut s[r * BK..][..BK]).try_into().unwrap();
                    let pr: &mut [f32; BK] = (&mut dp[r * BK..][..BK]).try_into().unwrap();
                    for j in 0..BK {
                        let p = exp_f32(sr[j] * dm.scale - li);
                        let p = if j < valid { p } else { 0.0 };
                        let ds = rd(p * (pr[j] - di), lowp) * dm.scale;
                        sr[j] = rd(p, lowp);
                        pr[j] = ds;
                    }
                }
                let kv = (t - j0).min(BK);
                for j in 0..kv {
                    gemv_acc(&mut dva[(j0 + j) * dvp..][..dvp], &s[j..], BK, doblk, dvp, nq);
                    gemv_acc(&mut dka[(j0 + j) * dqkp..][..dqkp], &dp[j..], BK, qblk, dqkp, nq);
                }
                for r in 0..nq {
                    gemv_acc(&mut dqa[(i0 + r) * dqkp..][..dqkp], &dp[r * BK..], 1, &kr[j0 * dqkp..], dqkp, kv);
                }
            }
        }
        for i in 0..t {
            let base = (bb * t + i) * dm.h + hh;
            // SAFETY: head h of rows (b, *) of dq, dk, dv belong to this task only.
            unsafe {
                dq.slice(base * dqk, dqk).copy_from_slice(&dqa[i * dqkp..][..dqk]);
                dk.slice(base * dqk, dqk).copy_from_slice(&dka[i * dqkp..][..dqk]);
                dvo.slice(base * dv, dv).copy_from_slice(&dva[i * dvp..][..dv]);
            }
        }
    }
}

/// dq, dk, dv of causal attention from dO and what the forward saved.
pub fn attention_backward(d_o: &[f32], fwd: Saved, dm: Dims, g: Grads) -> R<()> {
    let Saved { q, k, v, o, lse } = fwd;
    let Grads { dq, dk, dv } = g;
    if dm.tk != dm.t {
        return Err(format!(
            "attentionBackward: kvSeq {} is not seq {}",
            dm.tk, dm.t
        ));
    }
    dm.check(q.len(), k.len(), v.len())?;
    if d_o.len() != v.len() || o.len() != v.len() || lse.len() != dm.b * dm.h * dm.t {
        return Err("attentionBackward: dO, o or lse size does not match".into());
    }
    if dq.len() != q.len() || dk.len() != k.len() || dv.len() != v.len() {
        return Err("attentionBackward: output sizes do not match".into());
    }
    if dm.t == 0 || dm.b * dm.h == 0 {
        return Ok(());
    }
    let out = GradsOut {
        dq: SendPtr(dq.as_mut_ptr()),
        dk: SendPtr(dk.as_mut_ptr()),
        dv: SendPtr(dv.as_mut_ptr()),
    };
    (0..dm.b * dm.h).into_par_iter().for_each(|x| {
        let hd = Head {
            b: x / dm.h,
            h: x % dm.h,
        };
        backward_task(d_o, &fwd, &dm, hd, out);
    });
    Ok(())
}
