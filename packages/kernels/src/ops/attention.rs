//! Causal attention, forward and backward, as packages/tensor/src/ts/nn.ts defines it, computed
//! FlashAttention-style in 64 x 64 tiles with f32 arithmetic, every tile product on the SIMD
//! micro-kernels of `tiles.rs` (fused multiply-add chains in a fixed order).
//!
//! Layouts: q [B*T, H*dqk], o [B*T, H*dv] (row b*T+i, head h at column h*d); k [B*Tk, H*dqk], v
//! [B*Tk, H*dv]; lse [B*H*T]. Tk = T but in the forward of a KV-cache decode step, which has fewer
//! queries than keys, the queries at the last positions: query i sees keys 0..Tk-T+i.
//!
//! Tiles hold scores transposed, keys by queries (`s[j][r]`), so that a query is a vector lane:
//! the softmax's max and sum over keys are vertical operations, and q.k^T is the micro-kernel's
//! product of the key rows (broadcast) with q^T, which each task transposes once, while the keys
//! and values of a tile are plain row copies.
//!
//! Forward: one task per (batch, head, 64-query block), over the key tiles up to its last query's
//! position: s = k q^T, scaled and masked; an online softmax per query (running max m and
//! normaliser l = l * exp(m_old - m) + the tile's exp(s - m), summed in key order); o += P v after
//! scaling o by the same factor. In `bf16` precision q, k, v are rounded to BF16 and the
//! *normalised* probabilities are rounded before the P.V product (the reference's rounding point),
//! which needs each query's final max and normaliser first: the task keeps its block's scores
//! (64 x Tk floats) and runs the P.V products after the last tile. A decode step with fewer than 16
//! queries runs decode_task instead, one query at a time, with the same arithmetic in the same
//! order, so its rows are the full forward's bit for bit.
//!
//! Backward: one task per (batch, head), over query blocks and, within one, its key tiles in order;
//! P is recomputed from lse (P = exp(s * scale - lse)); dS = P (dP - D) with D = rowsum(dO * o),
//! rounded to BF16 (and P too) in `bf16` precision as the reference does; dV += P^T dO, dK += dS^T
//! q and dQ += dS k tile by tile, each element of them one chain over the tiles in order.
//!
//! Products skip the masked corner of the diagonal tiles (see tiles.rs: the skipped terms are exact
//! zeros). Scratch is one per-thread buffer, grown on demand and kept, so a call allocates nothing
//! once warm. Every sum runs in a fixed order that depends on the shapes only: the results are
//! bit-for-bit repeatable whatever the thread count, and identical at every SIMD level.

use super::nn::R;
use super::tiles::{by_level, product, row_product, Span, Tile, Tiles, W};
use super::util::{exp_f32, round_bf16, SendPtr};
use rayon::prelude::*;
use std::cell::RefCell;

const BQ: usize = 64;
const BK: usize = 64;
const NEG_INF: f32 = f32::NEG_INFINITY;

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

/// An input array: f32 values, or BF16 codes (a bf16 tensor's storage), decoded as the tiles are
/// copied instead of in a pass of their own. Codes are BF16 values already: rounding them again
/// in bf16 precision would change nothing, so it is skipped.
#[derive(Clone, Copy)]
pub enum Src<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Src<'_> {
    pub fn len(&self) -> usize {
        match self {
            Src::F32(x) => x.len(),
            Src::Bf16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// dst = elements off.., BF16-rounded under `lowp`, 16 floats at a time (a short row: no
    /// memcpy call).
    #[inline(always)]
    fn load(&self, off: usize, dst: &mut [f32], lowp: bool) {
        let n = dst.len();
        match *self {
            Src::F32(x) => copy_short(dst, &x[off..][..n], lowp),
            Src::Bf16(x) => {
                for (o, &c) in dst.iter_mut().zip(&x[off..][..n]) {
                    *o = f32::from_bits((c as u32) << 16);
                }
            }
        }
    }
}

impl<'a> From<&'a [f32]> for Src<'a> {
    fn from(x: &'a [f32]) -> Self {
        Src::F32(x)
    }
}

impl<'a> From<&'a Vec<f32>> for Src<'a> {
    fn from(x: &'a Vec<f32>) -> Self {
        Src::F32(x)
    }
}

impl<'a> From<&'a [u16]> for Src<'a> {
    fn from(x: &'a [u16]) -> Self {
        Src::Bf16(x)
    }
}

/// What the backward pass reads of the forward: its inputs q, k, v and its outputs o and lse.
#[derive(Clone, Copy)]
pub struct Saved<'a> {
    pub q: Src<'a>,
    pub k: Src<'a>,
    pub v: Src<'a>,
    pub o: Src<'a>,
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

thread_local! {
    /// Per-thread scratch of the attention tasks, grown on demand and kept.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The thread's scratch with at least `len` floats (contents unspecified), taken out of its slot
/// until [`scratch_put`] gives it back (a nested use would allocate, never share it).
fn scratch_take(len: usize) -> Vec<f32> {
    let mut buf = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    buf
}

fn scratch_put(buf: Vec<f32>) {
    SCRATCH.with(|s| {
        let mut slot = s.borrow_mut();
        if slot.len() < buf.len() {
            *slot = buf;
        }
    });
}

/// The first `n` floats of `buf`, which keeps the rest.
#[inline(always)]
fn carve<'a>(buf: &mut &'a mut [f32], n: usize) -> &'a mut [f32] {
    let (a, b) = std::mem::take(buf).split_at_mut(n);
    *buf = b;
    a
}

/// Which rows of a head one copy takes: rows `r0..r0+n` of `len` per batch, `d` values each.
#[derive(Clone, Copy)]
struct Rows {
    len: usize,
    d: usize,
    r0: usize,
    n: usize,
}

/// dst = src, BF16-rounded under `lowp`, 16 floats at a time (a short row: no memcpy call).
#[inline(always)]
fn copy_short(dst: &mut [f32], src: &[f32], lowp: bool) {
    let mut d = dst.chunks_exact_mut(W);
    let mut s = src.chunks_exact(W);
    for (o, i) in (&mut d).zip(&mut s) {
        let o: &mut [f32; W] = o.try_into().unwrap();
        let i: &[f32; W] = i.try_into().unwrap();
        *o = *i;
        if lowp {
            o.iter_mut().for_each(|x| *x = round_bf16(*x));
        }
    }
    for (o, &i) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *o = rd(i, lowp);
    }
}

/// Where element 0 of row r0 + i of head `hd.h` of batch `hd.b` lies in x [B*len, H*d].
#[inline(always)]
fn row_at(dm: &Dims, hd: Head, rs: Rows, i: usize) -> usize {
    ((hd.b * rs.len + rs.r0 + i) * dm.h + hd.h) * rs.d
}

/// Rows of head `hd.h` of batch `hd.b` of x [B*len, H*d] into `out` with row stride `ld >= d`
/// (columns d..ld zero), then zero rows up to `rows`; BF16-rounded in bf16 precision.
#[inline(always)]
fn copy_rows(x: Src, dm: &Dims, hd: Head, rs: Rows, ld: usize, rows: usize, out: &mut [f32]) {
    let (d, n) = (rs.d, rs.n);
    for i in 0..n {
        let dst = &mut out[i * ld..][..ld];
        x.load(row_at(dm, hd, rs, i), &mut dst[..d], dm.lowp);
        dst[d..].fill(0.0);
    }
    out[n * ld..rows * ld].fill(0.0);
}

/// `n` rows of `d` floats (row stride `lds`) transposed: out[c * ld + i], zero for i in n..cols;
/// 16 x 16 blocks in registers where the vector type can.
#[inline(always)]
unsafe fn transpose<V: Tiles>(
    x: &[f32],
    lds: usize,
    (n, d): (usize, usize),
    ld: usize,
    cols: usize,
    out: &mut [f32],
) {
    let (n16, d16) = (n / W * W, d / W * W);
    assert!(n == 0 || (x.len() >= (n - 1) * lds + d && out.len() >= (d.max(1) - 1) * ld + cols));
    for i in (0..n16).step_by(W) {
        for c in (0..d16).step_by(W) {
            let src = x.as_ptr().add(i * lds + c);
            V::transpose16(src, lds, out.as_mut_ptr().add(c * ld + i), ld);
        }
    }
    for i in 0..n {
        let c0 = if i < n16 { d16 } else { 0 };
        for c in c0..d {
            out[c * ld + i] = x[i * lds + c];
        }
    }
    for c in 0..d {
        out[c * ld + n..c * ld + cols].fill(0.0);
    }
}

#[inline(always)]
fn row_max(x: &[f32; BK]) -> f32 {
    let mut m = [NEG_INF; 16];
    for c in x.chunks_exact(16) {
        let c: &[f32; 16] = c.try_into().unwrap();
        for l in 0..16 {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    m.iter().fold(NEG_INF, |a, &b| if b > a { b } else { a })
}

/// The forward's inputs.
#[derive(Clone, Copy)]
struct Inputs<'a> {
    q: Src<'a>,
    k: Src<'a>,
    v: Src<'a>,
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

/// Where a tile lies: its first key `j0` and the position of its query block's first query
/// (query r sees key j0 + j when j0 + j <= first + r).
#[derive(Clone, Copy)]
struct At {
    j0: usize,
    first: usize,
}

/// Key rows of a tile that vector `cv` of queries sees at least in part: the rest are masked for
/// all 16 of its queries, and no product reads them for those queries.
#[inline(always)]
fn seen_rows(nkr: usize, cv: usize, at: At) -> usize {
    nkr.min((at.first + cv * W + W).saturating_sub(at.j0))
}

/// One tile of scores s[j][r] (row stride BQ, `nkr` key rows, `nqv` vectors of queries) scaled and
/// masked in place (-inf where query r does not see key j), and `mx` = each query's max over it.
#[inline(always)]
fn mask_max(s: &mut [f32], nkr: usize, nqv: usize, at: At, scale: f32, mx: &mut [f32]) {
    for cv in 0..nqv {
        let c0 = cv * W;
        let mut m = [NEG_INF; W];
        for j in 0..seen_rows(nkr, cv, at) {
            let row: &mut [f32; W] = (&mut s[j * BQ + c0..][..W]).try_into().unwrap();
            // Lane r sees the key when j0 + j <= first + c0 + r.
            let seen = (at.first + c0) as isize - (at.j0 + j) as isize;
            for (r, x) in row.iter_mut().enumerate() {
                let y = *x * scale;
                let y = if r as isize >= -seen { y } else { NEG_INF };
                *x = y;
                m[r] = if y > m[r] { y } else { m[r] };
            }
        }
        mx[c0..c0 + W].copy_from_slice(&m);
    }
}

/// s <- exp(s - m) over a masked tile, added to each query's `l` in key order.
#[inline(always)]
fn exp_sum(s: &mut [f32], nkr: usize, nqv: usize, at: At, m: &[f32], l: &mut [f32]) {
    for cv in 0..nqv {
        let c0 = cv * W;
        let mr: &[f32; W] = m[c0..][..W].try_into().unwrap();
        let mut lr: [f32; W] = l[c0..][..W].try_into().unwrap();
        for j in 0..seen_rows(nkr, cv, at) {
            let row: &mut [f32; W] = (&mut s[j * BQ + c0..][..W]).try_into().unwrap();
            for r in 0..W {
                let e = exp_f32(row[r] - mr[r]);
                lr[r] += e;
                row[r] = e;
            }
        }
        l[c0..c0 + W].copy_from_slice(&lr);
    }
}

/// acc[0..nqr, 0..dvp] += P v for one tile: P transposed in `s` (s[j][r], stride BQ), the tile's
/// `nk` value rows in `vt` (stride dvp). Each block of queries stops at the last key it sees.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn pv<V: Tiles>(
    s: &[f32],
    vt: &[f32],
    acc: &mut [f32],
    nqr: usize,
    dvp: usize,
    nk: usize,
    at: At,
) {
    let t = Tile {
        a: s.as_ptr(),
        ars: 1,
        acs: BQ,
        b: vt.as_ptr(),
        ldb: dvp,
        c: acc.as_mut_ptr(),
        ldc: dvp,
        k0: 0,
        k1: 0,
        add: true,
    };
    product::<V>(nqr, dvp / W, t, |_, r1| Span {
        k0: 0,
        k1: nk.min((at.first + r1).saturating_sub(at.j0)),
        v0: 0,
    });
}

/// s[0..nkr][0..16 nqv] = k q^T for one tile: `kt` the tile's key rows (stride dqk), `qt` the
/// block's q transposed (stride BQ). Key rows skip the query vectors that cannot see them.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn scores<V: Tiles>(
    kt: &[f32],
    ldk: usize,
    qt: &[f32],
    ldq: usize,
    d: usize,
    s: &mut [f32],
    nkr: usize,
    nqv: usize,
    at: At,
) {
    let t = Tile {
        a: kt.as_ptr(),
        ars: ldk,
        acs: 1,
        b: qt.as_ptr(),
        ldb: ldq,
        c: s.as_mut_ptr(),
        ldc: BQ,
        k0: 0,
        k1: 0,
        add: false,
    };
    product::<V>(nkr, nqv, t, |r0, _| Span {
        k0: 0,
        k1: d,
        v0: (at.j0 + r0).saturating_sub(at.first) / W,
    });
}

/// One (batch, head, query block) of the forward pass; writes o rows and lse entries.
#[inline(always)]
unsafe fn forward_task<V: Tiles>(x: Inputs, dm: &Dims, hd: Head, qb: usize, out: ForwardOut) {
    let (t, tk, dqk, dv, dvp, lowp) = (dm.t, dm.tk, dm.dqk, dm.dv, dm.dvp(), dm.lowp);
    let i0 = qb * BQ;
    let nq = BQ.min(t - i0);
    let nqv = nq.div_ceil(W);
    let nqr = nqv * W;
    let first = tk - t + i0;
    let nkb = (first + nq - 1) / BK + 1;
    let srows = if lowp { nkb * BK } else { BK };
    let len = dqk * BQ + BK * dqk + BK * dvp + srows * BQ + BQ * dvp + 4 * BQ;
    let mut scratch = scratch_take(len);
    let mut buf = &mut scratch[..];
    let qt = carve(&mut buf, dqk * BQ);
    let kt = carve(&mut buf, BK * dqk);
    let vt = carve(&mut buf, BK * dvp);
    let st = carve(&mut buf, srows * BQ);
    let acc = carve(&mut buf, BQ * dvp);
    let m = carve(&mut buf, BQ);
    let l = carve(&mut buf, BQ);
    let alpha = carve(&mut buf, BQ);
    let mx = carve(&mut buf, BQ);
    let qrows = Rows {
        len: t,
        d: dqk,
        r0: i0,
        n: nq,
    };
    // q^T: transposed from q's rows in place (then rounded), or from decoded codes in kt's space.
    match x.q {
        Src::F32(q) => {
            let rows = &q[row_at(dm, hd, qrows, 0)..];
            transpose::<V>(rows, dm.h * dqk, (nq, dqk), BQ, nqr, qt);
            if lowp {
                for c in 0..dqk {
                    qt[c * BQ..][..nq]
                        .iter_mut()
                        .for_each(|x| *x = round_bf16(*x));
                }
            }
        }
        Src::Bf16(_) => {
            copy_rows(x.q, dm, hd, qrows, dqk, nq, kt);
            transpose::<V>(kt, dqk, (nq, dqk), BQ, nqr, qt);
        }
    }
    m.fill(NEG_INF);
    l.fill(0.0);
    acc[..nqr * dvp].fill(0.0);
    // Tile kb: where it lies, its keys and its key rows padded to whole vectors.
    let tile = |kb: usize| {
        let j0 = kb * BK;
        let nk = BK.min(tk - j0);
        (At { j0, first }, nk, nk.div_ceil(W) * W)
    };
    let vrows = |at: At, nk: usize| Rows {
        len: tk,
        d: dv,
        r0: at.j0,
        n: nk,
    };
    for kb in 0..nkb {
        let (at, nk, nkr) = tile(kb);
        let krows = Rows {
            d: dqk,
            ..vrows(at, nk)
        };
        copy_rows(x.k, dm, hd, krows, dqk, nkr, kt);
        let s = &mut st[if lowp { at.j0 * BQ } else { 0 }..][..BK * BQ];
        scores::<V>(kt, dqk, qt, BQ, dqk, s, nkr, nqv, at);
        mask_max(s, nkr, nqv, at, dm.scale, mx);
        // The running max; in f32 the online softmax rescales l and o by exp(m_old - m_new).
        for r in 0..nqr {
            let mn = if mx[r] > m[r] { mx[r] } else { m[r] };
            alpha[r] = exp_f32(m[r] - mn);
            m[r] = mn;
        }
        if !lowp {
            for r in 0..nqr {
                l[r] *= alpha[r];
            }
            exp_sum(s, nkr, nqv, at, m, l);
            copy_rows(x.v, dm, hd, vrows(at, nk), dvp, nk, vt);
            for r in 0..nqr {
                let a = alpha[r];
                acc[r * dvp..][..dvp].iter_mut().for_each(|x| *x *= a);
            }
            pv::<V>(s, vt, acc, nqr, dvp, nk, at);
        }
    }
    if lowp {
        // With each query's final max: l = the sum of exp(s - m) in key order, then P =
        // bf16(exp(s - m) * (1 / l)) and o = P v.
        for kb in 0..nkb {
            let (at, _, nkr) = tile(kb);
            exp_sum(&mut st[at.j0 * BQ..][..BK * BQ], nkr, nqv, at, m, l);
        }
        for r in 0..nqr {
            alpha[r] = 1.0 / l[r];
        }
        for kb in 0..nkb {
            let (at, nk, nkr) = tile(kb);
            let s = &mut st[at.j0 * BQ..][..BK * BQ];
            for cv in 0..nqv {
                let inv: &[f32; W] = alpha[cv * W..][..W].try_into().unwrap();
                for j in 0..seen_rows(nkr, cv, at) {
                    let row: &mut [f32; W] = (&mut s[j * BQ + cv * W..][..W]).try_into().unwrap();
                    for r in 0..W {
                        row[r] = round_bf16(row[r] * inv[r]);
                    }
                }
            }
            copy_rows(x.v, dm, hd, vrows(at, nk), dvp, nk, vt);
            pv::<V>(s, vt, acc, nqr, dvp, nk, at);
        }
    }
    for r in 0..nq {
        let i = i0 + r;
        // SAFETY: row (b, i), head h of o and entry (b, h, i) of lse belong to this task only.
        let orow = out.o.slice(((hd.b * t + i) * dm.h + hd.h) * dv, dv);
        let ar = &acc[r * dvp..][..dv];
        if lowp {
            copy_short(orow, ar, false);
        } else {
            let inv = l[r];
            for (o, &a) in orow.iter_mut().zip(ar) {
                *o = a / inv;
            }
        }
        let le = out.lse.slice((hd.b * dm.h + hd.h) * t + i, 1);
        le[0] = (m[r] as f64 + (l[r] as f64).ln()) as f32;
    }
    scratch_put(scratch);
}

by_level!(
    /// forward_task on the widest vectors the CPU has.
    fn forward_block(x: Inputs, dm: &Dims, hd: Head, qb: usize, out: ForwardOut) => forward_task
);

/// acc += e[..valid] times the first `valid` rows of the value tile at vp (row stride ldv): one
/// query's probabilities against a tile of values (acc's length a whole number of vectors).
#[inline(always)]
unsafe fn add_weighted_rows<V: Tiles>(
    e: &[f32],
    vp: *const f32,
    ldv: usize,
    valid: usize,
    acc: &mut [f32],
) {
    let tile = Tile {
        a: e.as_ptr(),
        ars: 0,
        acs: 1,
        b: vp,
        ldb: ldv,
        c: acc.as_mut_ptr(),
        ldc: 0,
        k0: 0,
        k1: valid,
        add: true,
    };
    row_product::<V>(acc.len() / W, tile);
}

/// All the queries of one (batch, head) when there are few of them (a KV-cache decode step), one
/// at a time: forward_task's arithmetic in its order, on one query instead of a vector lane of 16.
/// Each tile of k is transposed into an L1-sized buffer (keys as lanes), the scores are the same
/// chains of fused multiply-adds over the head dimension, the softmax takes the same maxima and sums
/// the same exponentials in key order (online in f32, after the final max in bf16), and o gets the
/// same chains over the keys; v is read in place when it needs neither BF16 rounding nor padding. So each query's o and lse are the bits
/// of its row in a full forward (attention_with_fewer_queries_... in tests.rs).
unsafe fn decode_task<V: Tiles>(x: Inputs, dm: &Dims, hd: Head, out: ForwardOut) {
    let (bb, hh, nh) = (hd.b, hd.h, dm.h);
    let (t, tk, dqk, dv, dvp, lowp) = (dm.t, dm.tk, dm.dqk, dm.dv, dm.dvp(), dm.lowp);
    let v_f32 = match x.v {
        Src::F32(v) if !lowp && dv == dvp => Some(v),
        _ => None,
    };
    let mut scratch = scratch_take(dqk + 2 * dqk * BK + BK * dvp + dm.tpad() + dvp);
    let mut buf = &mut scratch[..];
    let qr = carve(&mut buf, dqk);
    let kr = carve(&mut buf, BK * dqk);
    let kt = carve(&mut buf, dqk * BK);
    let vt = carve(&mut buf, BK * dvp);
    let s = carve(&mut buf, dm.tpad());
    let acc = carve(&mut buf, dvp);
    // The rows of v for keys j0..j0+n, and their stride.
    let vrows = |j0: usize, n: usize, vt: &mut [f32]| -> (*const f32, usize) {
        if let Some(v) = v_f32 {
            (v_at(v, dm, hd, j0), nh * dv)
        } else {
            copy_rows(
                x.v,
                dm,
                hd,
                Rows {
                    len: tk,
                    d: dv,
                    r0: j0,
                    n,
                },
                dvp,
                n,
                vt,
            );
            (vt.as_ptr(), dvp)
        }
    };
    for i in 0..t {
        let n = tk - t + i + 1; // the keys query i sees
        x.q.load(((bb * t + i) * nh + hh) * dqk, qr, lowp);
        // Scaled scores of keys 0..n, -inf beyond, a tile at a time (k's rows, rounded, then
        // transposed into kt: keys as lanes).
        for j0 in (0..n).step_by(BK) {
            let valid = BK.min(n - j0);
            let krows = Rows {
                len: tk,
                d: dqk,
                r0: j0,
                n: valid,
            };
            let nkr = valid.div_ceil(W) * W;
            copy_rows(x.k, dm, hd, krows, dqk, nkr, kr);
            transpose::<V>(kr, dqk, (nkr, dqk), BK, BK, kt);
            let tile = Tile {
                a: qr.as_ptr(),
                ars: 0,
                acs: 1,
                b: kt.as_ptr(),
                ldb: BK,
                c: s[j0..].as_mut_ptr(),
                ldc: 0,
                k0: 0,
                k1: dqk,
                add: false,
            };
            row_product::<V>(BK / W, tile);
            for (j, v) in s[j0..][..BK].iter_mut().enumerate() {
                let y = *v * dm.scale;
                *v = if j < valid { y } else { NEG_INF };
            }
        }
        let (mut m, mut l) = (NEG_INF, 0f32);
        acc.fill(0.0);
        let mut e = [0f32; BK];
        for j0 in (0..n).step_by(BK) {
            let valid = BK.min(n - j0);
            e.copy_from_slice(&s[j0..][..BK]);
            let mx = row_max(&e);
            let mn = if mx > m { mx } else { m };
            let alpha = exp_f32(m - mn);
            m = mn;
            if !lowp {
                l *= alpha;
                for x in e.iter_mut() {
                    *x = exp_f32(*x - mn);
                }
                for &x in e.iter() {
                    l += x;
                }
                acc.iter_mut().for_each(|a| *a *= alpha);
                let (vp, ldv) = vrows(j0, valid, vt);
                add_weighted_rows::<V>(&e, vp, ldv, valid, acc);
            }
        }
        if lowp {
            for x in s[..n.div_ceil(BK) * BK].iter_mut() {
                *x = exp_f32(*x - m);
                l += *x;
            }
            let inv = 1.0 / l;
            for j0 in (0..n).step_by(BK) {
                let valid = BK.min(n - j0);
                for (x, &v) in e.iter_mut().zip(&s[j0..][..BK]) {
                    *x = round_bf16(v * inv);
                }
                let (vp, ldv) = vrows(j0, valid, vt);
                add_weighted_rows::<V>(&e, vp, ldv, valid, acc);
            }
        }
        // SAFETY: row (b, i), head h of o and entry (b, h, i) of lse belong to this task only.
        let orow = out.o.slice(((bb * t + i) * nh + hh) * dv, dv);
        if lowp {
            orow.copy_from_slice(&acc[..dv]);
        } else {
            for (o, &a) in orow.iter_mut().zip(&acc[..dv]) {
                *o = a / l;
            }
        }
        let le = out.lse.slice((bb * nh + hh) * t + i, 1);
        le[0] = (m as f64 + (l as f64).ln()) as f32;
    }
    scratch_put(scratch);
}

/// Row j0 of head h of batch b of v [B*Tk, H*dv].
#[inline(always)]
fn v_at(v: &[f32], dm: &Dims, hd: Head, j0: usize) -> *const f32 {
    v[((hd.b * dm.tk + j0) * dm.h + hd.h) * dm.dv..].as_ptr()
}

by_level!(
    /// decode_task on the widest vectors the CPU has.
    fn decode_head(x: Inputs, dm: &Dims, hd: Head, out: ForwardOut) => decode_task
);

/// o [B*T, H*dv] and lse [B*H*T] of causal softmax(q k^T * scale) v, the T queries of a batch at
/// its last T of Tk key positions.
pub fn attention_forward<'a>(
    q: impl Into<Src<'a>>,
    k: impl Into<Src<'a>>,
    v: impl Into<Src<'a>>,
    dm: Dims,
    o: &mut [f32],
    lse: &mut [f32],
) -> R<()> {
    let (q, k, v) = (q.into(), k.into(), v.into());
    dm.check(q.len(), k.len(), v.len())?;
    if o.len() != dm.b * dm.t * dm.h * dm.dv || lse.len() != dm.b * dm.h * dm.t {
        return Err("attention: output sizes do not match".into());
    }
    if dm.t == 0 || dm.b * dm.h == 0 {
        return Ok(());
    }
    let bh = dm.b * dm.h;
    let out = ForwardOut {
        o: SendPtr(o.as_mut_ptr()),
        lse: SendPtr(lse.as_mut_ptr()),
    };
    let x = Inputs { q, k, v };
    let head = |y: usize| Head {
        b: y / dm.h,
        h: y % dm.h,
    };
    if dm.tk > dm.t && dm.t < W {
        (0..bh)
            .into_par_iter()
            .for_each(|y| decode_head(x, &dm, head(y), out));
        return Ok(());
    }
    let nqb = dm.t.div_ceil(BQ);
    // Largest query blocks (most work) first, for a better balance under work stealing.
    (0..bh * nqb).into_par_iter().for_each(|z| {
        let qb = nqb - 1 - z / bh;
        forward_block(x, &dm, head(z % bh), qb, out);
    });
    Ok(())
}

/// One (batch, head) of the backward pass; writes that head's columns of dq, dk, dv.
#[inline(always)]
unsafe fn backward_task<V: Tiles>(d_o: Src, fwd: &Saved, dm: &Dims, hd: Head, out: GradsOut) {
    let (bb, hh) = (hd.b, hd.h);
    let (t, dqk, dv, lowp, scale) = (dm.t, dm.dqk, dm.dv, dm.lowp, dm.scale);
    let (dqkp, dvp) = (dm.dqkp(), dm.dvp());
    let tp = t.div_ceil(BQ) * BQ;
    let len = 4 * tp * dqkp + dqk * tp + 3 * tp * dvp + dv * tp + 2 * tp + 2 * BK * BQ + dv;
    let mut scratch = scratch_take(len);
    let mut buf = &mut scratch[..];
    let qr = carve(&mut buf, tp * dqkp);
    let qt = carve(&mut buf, dqk * tp);
    let kr = carve(&mut buf, tp * dqkp);
    let vr = carve(&mut buf, tp * dvp);
    let dor = carve(&mut buf, tp * dvp);
    let dot = carve(&mut buf, dv * tp);
    let dd = carve(&mut buf, tp);
    let lp = carve(&mut buf, tp);
    let st = carve(&mut buf, BK * BQ);
    let dpt = carve(&mut buf, BK * BQ);
    let dqa = carve(&mut buf, tp * dqkp);
    let dka = carve(&mut buf, tp * dqkp);
    let dva = carve(&mut buf, tp * dvp);
    let orow = carve(&mut buf, dv);
    let rq = Rows {
        len: t,
        d: dqk,
        r0: 0,
        n: t,
    };
    let rv = Rows { d: dv, ..rq };
    copy_rows(fwd.q, dm, hd, rq, dqkp, tp, qr);
    transpose::<V>(qr, dqkp, (t, dqk), tp, tp, qt);
    copy_rows(fwd.k, dm, hd, rq, dqkp, tp, kr);
    copy_rows(fwd.v, dm, hd, rv, dvp, tp, vr);
    copy_rows(d_o, dm, hd, rv, dvp, tp, dor);
    transpose::<V>(dor, dvp, (t, dv), tp, tp, dot);
    // D_i = dO_i . o_i (dO rounded in bf16 precision, o as stored); queries past T read D = 0 and
    // lse = inf, so that their P and dS are 0.
    for (i, d) in dd.iter_mut().enumerate() {
        if i >= t {
            *d = 0.0;
            continue;
        }
        fwd.o.load(((bb * t + i) * dm.h + hh) * dv, orow, false);
        let drow = &dor[i * dvp..][..dv];
        let mut a = [0f32; 8];
        let mut c = 0;
        while c + 8 <= dv {
            for x in 0..8 {
                a[x] += drow[c + x] * orow[c + x];
            }
            c += 8;
        }
        for x in 0..dv - c {
            a[x] += drow[c + x] * orow[c + x];
        }
        *d = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    }
    lp[..t].copy_from_slice(&fwd.lse[(bb * dm.h + hh) * t..][..t]);
    lp[t..].fill(f32::INFINITY);
    dqa.fill(0.0);
    dka.fill(0.0);
    dva.fill(0.0);
    for qb in 0..tp / BQ {
        let i0 = qb * BQ;
        let nq = BQ.min(t - i0);
        let nqv = nq.div_ceil(W);
        for kb in 0..=qb {
            let j0 = kb * BK;
            let nk = BK.min(t - j0);
            let nkr = nk.div_ceil(W) * W;
            let at = At { j0, first: i0 };
            scores::<V>(&kr[j0 * dqkp..], dqkp, &qt[i0..], tp, dqk, st, nkr, nqv, at);
            scores::<V>(&vr[j0 * dvp..], dvp, &dot[i0..], tp, dv, dpt, nkr, nqv, at);
            // st <- P (rounded in bf16), dpt <- dS * scale (dS rounded in bf16); 0 where masked.
            for j in 0..nkr {
                let seen = i0 as isize - (j0 + j) as isize;
                // Vectors of queries that all come before key j0 + j: zeros, nothing to compute.
                let cv0 = ((j0 + j).saturating_sub(i0) / W).min(nqv);
                st[j * BQ..][..cv0 * W].fill(0.0);
                dpt[j * BQ..][..cv0 * W].fill(0.0);
                for cv in cv0..nqv {
                    let c0 = cv * W;
                    let sr: &mut [f32; W] = (&mut st[j * BQ + c0..][..W]).try_into().unwrap();
                    let pr: &mut [f32; W] = (&mut dpt[j * BQ + c0..][..W]).try_into().unwrap();
                    let li: &[f32; W] = lp[i0 + c0..][..W].try_into().unwrap();
                    let di: &[f32; W] = dd[i0 + c0..][..W].try_into().unwrap();
                    for r in 0..W {
                        let ok = (c0 + r) as isize >= -seen;
                        let p = exp_f32(sr[r] * scale - li[r]);
                        let p = if ok { p } else { 0.0 };
                        let ds = rd(p * (pr[r] - di[r]), lowp) * scale;
                        sr[r] = rd(p, lowp);
                        pr[r] = if ok { ds } else { 0.0 };
                    }
                }
            }
            // dV and dK rows j0..: the queries from the first that sees the block's first key.
            let from = |r0: usize, _| Span {
                k0: (j0 + r0).saturating_sub(i0).min(nq),
                k1: nq,
                v0: 0,
            };
            let tv = Tile {
                a: st.as_ptr(),
                ars: BQ,
                acs: 1,
                b: dor[i0 * dvp..].as_ptr(),
                ldb: dvp,
                c: dva[j0 * dvp..].as_mut_ptr(),
                ldc: dvp,
                k0: 0,
                k1: 0,
                add: true,
            };
            product::<V>(nkr, dvp / W, tv, from);
            let tk = Tile {
                a: dpt.as_ptr(),
                b: qr[i0 * dqkp..].as_ptr(),
                ldb: dqkp,
                c: dka[j0 * dqkp..].as_mut_ptr(),
                ldc: dqkp,
                ..tv
            };
            product::<V>(nkr, dqkp / W, tk, from);
            // dQ rows i0..: the keys up to the block's last query.
            let tq = Tile {
                a: dpt.as_ptr(),
                ars: 1,
                acs: BQ,
                b: kr[j0 * dqkp..].as_ptr(),
                ldb: dqkp,
                c: dqa[i0 * dqkp..].as_mut_ptr(),
                ldc: dqkp,
                k0: 0,
                k1: 0,
                add: true,
            };
            product::<V>(nqv * W, dqkp / W, tq, |_, r1| Span {
                k0: 0,
                k1: nk.min((i0 + r1).saturating_sub(j0)),
                v0: 0,
            });
        }
    }
    for i in 0..t {
        let base = (bb * t + i) * dm.h + hh;
        // SAFETY: head h of rows (b, *) of dq, dk, dv belong to this task only.
        copy_short(
            out.dq.slice(base * dqk, dqk),
            &dqa[i * dqkp..][..dqk],
            false,
        );
        copy_short(
            out.dk.slice(base * dqk, dqk),
            &dka[i * dqkp..][..dqk],
            false,
        );
        copy_short(out.dv.slice(base * dv, dv), &dva[i * dvp..][..dv], false);
    }
    scratch_put(scratch);
}

by_level!(
    /// backward_task on the widest vectors the CPU has.
    fn backward_head(d_o: Src, fwd: &Saved, dm: &Dims, hd: Head, out: GradsOut) => backward_task
);

/// dq, dk, dv of causal attention from dO and what the forward saved.
pub fn attention_backward<'a>(
    d_o: impl Into<Src<'a>>,
    fwd: Saved<'a>,
    dm: Dims,
    g: Grads,
) -> R<()> {
    let d_o = d_o.into();
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
        backward_head(d_o, &fwd, &dm, hd, out);
    });
    Ok(())
}
