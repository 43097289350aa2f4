//! The f32 GEMM core and the BF16/FP8 GEMMs built on it.
//!
//! Every precision runs the same f32 core, so the precisions differ only in how the operands are
//! rounded or quantised, never in how products are summed: BF16 rounds the operands into scratch
//! copies first; FP8 dequantises each operand into f32 *without* its scales, multiplies one
//! promotion chunk of K at a time into a temporary tile, and adds the chunk's partial sums into
//! the f32 accumulator times the two groups' scales (docs/numerics.md, promotion).
//!
//! On AVX-512 machines the BF16 and FP8 GEMMs run the own packed kernel of `kernel512` instead,
//! which fuses the BF16 rounding / FP8 decoding into its packing and applies the FP8 promotion in
//! the micro-kernel's epilogue (no dequantised or rounded operand copies, no per-tile calls).
//!
//! The core is the `gemm` crate (packed micro-kernels with run-time dispatch to AVX-512, AVX2+FMA,
//! NEON or scalar); measured on the 2-core AVX-512 development machine it beats OpenBLAS at the
//! model's shapes. It never splits K across threads, so each output element's summation order
//! depends only on the shape: results are bit-for-bit repeatable. `MOE8_SIMD=scalar` switches to the
//! plain loop below (k-sequential per element), which is also the reference the tests trust.

use super::fp8::{bf16_round, decode_slice, Fp8Format};
use super::quant::{Group, G};
use crate::simd::{detect, SimdLevel};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// A strided read-only f32 matrix view: element (i, j) is at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
pub struct View {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl View {
    /// op(X) of a row-major stored matrix with `ld` columns: transposed views swap the strides.
    pub fn of(x: &[f32], ld: usize, trans: bool) -> View {
        let ld = ld as isize;
        if trans {
            View {
                ptr: x.as_ptr(),
                rs: 1,
                cs: ld,
            }
        } else {
            View {
                ptr: x.as_ptr(),
                rs: ld,
                cs: 1,
            }
        }
    }
    /// The view starting at element (i, j).
    pub fn at(self, i: usize, j: usize) -> View {
        View {
            ptr: self
                .ptr
                .wrapping_offset(i as isize * self.rs + j as isize * self.cs),
            ..self
        }
    }
}

/// A row-major output block that threads writing disjoint tiles may share: element (i, j) is at
/// `ptr + i*ld + j`.
#[derive(Clone, Copy)]
pub struct OutView {
    pub ptr: *mut f32,
    pub ld: usize,
}
impl OutView {
    /// The start of row `i`. A method (not field access) so closures capture the Send wrapper,
    /// not the raw pointer.
    #[inline]
    pub fn row(self, i: usize) -> *mut f32 {
        self.ptr.wrapping_add(i * self.ld)
    }
}
unsafe impl Send for OutView {}
unsafe impl Sync for OutView {}
unsafe impl Send for View {}
unsafe impl Sync for View {}

/// The sizes of C[M,N] (+)= A[M,K] B[K,N] on views (whose strides already encode any
/// transposition).
#[derive(Clone, Copy, Debug)]
pub struct Mnk {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// What a GEMM does with C: overwrite it or add into it, and round the result to BF16 or not.
#[derive(Clone, Copy, Debug, Default)]
pub struct Output {
    pub accumulate: bool,
    pub bf16: bool,
}

/// C[M,N] (+)= op(A)[M,K] op(B)[K,N] on row-major stored operands: the sizes, how A and B are
/// stored (A [M,K], or [K,M] when `trans_a`; B [K,N], or [N,K] when `trans_b`) and what happens
/// to C (row-major [M,N]).
#[derive(Clone, Copy, Debug, Default)]
pub struct GemmParams {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    /// C += product (false: C = product).
    pub accumulate: bool,
    /// Round the final C to BF16.
    pub output_bf16: bool,
}

impl GemmParams {
    pub fn mnk(&self) -> Mnk {
        Mnk {
            m: self.m,
            n: self.n,
            k: self.k,
        }
    }
    pub fn output(&self) -> Output {
        Output {
            accumulate: self.accumulate,
            bf16: self.output_bf16,
        }
    }
    /// Stored (rows, cols) of A.
    pub fn stored_a(&self) -> (usize, usize) {
        if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        }
    }
    /// Stored (rows, cols) of B.
    pub fn stored_b(&self) -> (usize, usize) {
        if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        }
    }
}

/// The operands of the f32 GEMM as given, or rounded to BF16 first (the BF16 GEMM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inputs {
    F32,
    Bf16,
}

/// Whether a GEMM may spread its work over the rayon pool, or runs on the calling thread (inside
/// an already parallel tile loop).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    Pool,
    Caller,
}

fn scalar_mode() -> bool {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(detect) == SimdLevel::Scalar
}

/// C[m x n] (row-major, row stride c.ld) = (accumulate ? C : 0) + A[m x k] B[k x n].
///
/// # Safety
/// The views must cover the m x k and k x n elements they describe and `c` m rows of ld >= n.
pub unsafe fn sgemm(s: Mnk, a: View, b: View, c: OutView, accumulate: bool, threads: Threads) {
    let Mnk { m, n, k } = s;
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 || scalar_mode() {
        return sgemm_scalar(s, a, b, c, accumulate, threads);
    }
    let par = if threads == Threads::Pool && m * n * k >= 1 << 15 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        c.ptr,
        1,
        c.ld as isize,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        1.0,
        1.0,
        false,
        false,
        false,
        par,
    );
}

/// The scalar fallback: rows of C in parallel, k-sequential sums (i-k-j loop order so the inner
/// loop streams a row of B when B is not transposed).
pub(crate) unsafe fn sgemm_scalar(
    s: Mnk,
    a: View,
    b: View,
    c: OutView,
    accumulate: bool,
    threads: Threads,
) {
    let Mnk { m, n, k } = s;
    let row = |i: usize| {
        let ci = std::slice::from_raw_parts_mut(c.row(i), n);
        if !accumulate {
            ci.fill(0.0);
        }
        for p in 0..k {
            let aip = *a.at(i, p).ptr;
            let bp = b.at(p, 0);
            for (j, cv) in ci.iter_mut().enumerate() {
                *cv += aip * *bp.ptr.offset(j as isize * bp.cs);
            }
        }
    };
    match threads {
        Threads::Pool => (0..m).into_par_iter().for_each(row),
        Threads::Caller => (0..m).for_each(row),
    }
}

thread_local! {
    /// Per-thread scratch (operand copies, dequantised panels, partial-sum tiles), grown on demand
    /// and kept, so hot calls do not allocate.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a thread-local scratch buffer of at least `len` floats (contents unspecified).
/// The buffer is taken out of its slot while in use, so nested use allocates instead of panicking.
pub fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    SCRATCH.with(|s| {
        let mut slot = s.borrow_mut();
        if slot.len() < buf.len() {
            *slot = buf;
        }
    });
    r
}

pub fn check_len(what: &str, have: usize, need: usize) -> Result<(), String> {
    if have < need {
        return Err(format!("{what} has {have} elements, needs at least {need}"));
    }
    Ok(())
}

/// Rounds every row-major element of an m x n (ldc) block to BF16, in parallel over rows.
fn round_rows_bf16(c: &mut [f32]) {
    c.par_chunks_mut(1 << 14)
        .for_each(|ch| ch.iter_mut().for_each(|v| *v = bf16_round(*v)));
}

/// Copies `x` rounded to BF16 into `out` in parallel.
fn copy_bf16(x: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(o, x)| {
            o.iter_mut().zip(x).for_each(|(o, &v)| *o = bf16_round(v));
        });
}

/// The f32 (and BF16-input) GEMM of the napi `gemmF32`: C[M,N] (+)= op(A) op(B).
pub fn gemm_f32(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    p: GemmParams,
    inputs: Inputs,
) -> Result<(), String> {
    let GemmParams { m, n, k, .. } = p;
    check_len("gemm: a", a.len(), m * k)?;
    check_len("gemm: b", b.len(), k * n)?;
    check_len("gemm: c", c.len(), m * n)?;
    let (lda, ldb) = (p.stored_a().1, p.stored_b().1);
    let c = &mut c[..m * n];
    let out = OutView {
        ptr: c.as_mut_ptr(),
        ld: n,
    };
    // BF16 inputs on AVX-512: the rounding is fused into the packing of the own kernel (no
    // rounded copies). Plain f32 stays on the `gemm` crate, which measured a little faster here,
    // most of all on the long-K weight-gradient shapes.
    #[cfg(target_arch = "x86_64")]
    if inputs == Inputs::Bf16 && m > 0 && n > 0 && k > 0 {
        let (va, vb) = (View::of(a, lda, p.trans_a), View::of(b, ldb, p.trans_b));
        let src = |v: View| super::kernel512::Src::F32 {
            p: v.ptr,
            rs: v.rs,
            cs: v.cs,
            bf16: true,
        };
        let (sa, sb) = (src(va), src(vb));
        if super::kernel512::available() {
            unsafe { super::kernel512::gemm(p.mnk(), sa, sb, out.ptr, p.output(), None) };
            return Ok(());
        }
        // The same packed design on AVX2+FMA, with the same bits.
        if super::kernel256::available() {
            unsafe { super::kernel256::gemm(p.mnk(), sa, sb, out.ptr, p.output(), None) };
            return Ok(());
        }
    }
    match inputs {
        Inputs::Bf16 => {
            // BF16 GEMM: operands rounded once into scratch copies, then the same f32 core.
            with_scratch(m * k + k * n, |s| {
                let (sa, sb) = s.split_at_mut(m * k);
                copy_bf16(&a[..m * k], sa);
                copy_bf16(&b[..k * n], sb);
                let (va, vb) = (View::of(sa, lda, p.trans_a), View::of(sb, ldb, p.trans_b));
                unsafe { sgemm(p.mnk(), va, vb, out, p.accumulate, Threads::Pool) };
            });
        }
        Inputs::F32 => {
            let (va, vb) = (View::of(a, lda, p.trans_a), View::of(b, ldb, p.trans_b));
            unsafe { sgemm(p.mnk(), va, vb, out, p.accumulate, Threads::Pool) };
        }
    }
    if p.output_bf16 {
        round_rows_bf16(c);
    }
    Ok(())
}

/// One FP8 operand as stored: `rows x cols` codes (row-major) and scales in `group` layout.
#[derive(Clone, Copy)]
pub struct Fp8Mat<'a> {
    pub q: &'a [u8],
    pub scales: &'a [f32],
    pub group: Group,
    pub format: Fp8Format,
}

/// How an operand's scale varies along K and along its other dimension (M for A, N for B):
/// the group extent along each (usize::MAX = constant) and a closure-free index rule.
struct ScaleMap {
    group: Group,
    trans: bool, // stored [K, other] (true) or [other, K] (false)
    cols: usize, // stored columns
}

impl ScaleMap {
    fn index(&self, kk: usize, other: usize) -> usize {
        let (r, c) = if self.trans { (kk, other) } else { (other, kk) };
        self.group.scale_index(r, c, self.cols)
    }
    /// The length of a constant-scale run along K.
    fn k_extent(&self) -> usize {
        match (self.group, self.trans) {
            (Group::Tensor, _) | (Group::Row, false) => usize::MAX,
            (Group::Tile, false) | (Group::Block, _) | (Group::ColumnTile, true) => G,
            (Group::Tile, true) | (Group::Row, true) | (Group::ColumnTile, false) => 1,
        }
    }
}

fn group_name(g: Group) -> &'static str {
    match g {
        Group::Tile => "tile",
        Group::Block => "block",
        Group::ColumnTile => "column-tile",
        Group::Row => "row",
        Group::Tensor => "tensor",
    }
}

/// Output tile of the FP8 GEMM: big enough to amortise the core's packing, small enough that the
/// tile, its two panels and the partial-sum buffer stay in L2.
const MT: usize = 256;
const NT: usize = 256;

/// The FP8 GEMM of the napi `gemmFp8`: C[M,N] (+)= sum over promotion chunks of
/// (sum_k dec(A) dec(B)) * scaleA(m, chunk) * scaleB(n, chunk), in f32.
pub fn gemm_fp8(
    a: Fp8Mat,
    b: Fp8Mat,
    c: &mut [f32],
    p: GemmParams,
    promotion: usize,
) -> Result<(), String> {
    let GemmParams {
        m,
        n,
        k,
        trans_a,
        trans_b,
        accumulate,
        output_bf16,
    } = p;
    if promotion == 0 {
        return Err("gemm_fp8: promotion must be > 0".into());
    }
    let ((ar, ac), (br, bc)) = (p.stored_a(), p.stored_b());
    check_len("gemm_fp8: a", a.q.len(), m * k)?;
    check_len("gemm_fp8: b", b.q.len(), k * n)?;
    check_len("gemm_fp8: c", c.len(), m * n)?;
    let sa_map = ScaleMap {
        group: a.group,
        trans: trans_a,
        cols: ac,
    };
    let sb_map = ScaleMap {
        group: b.group,
        trans: !trans_b,
        cols: bc,
    };
    // Promotion chunks [k0, k1); each operand's scale must be constant along every chunk.
    let chunks: Vec<(usize, usize)> = (0..k)
        .step_by(promotion)
        .map(|k0| (k0, (k0 + promotion).min(k)))
        .collect();
    for (name, map, stored) in [("A", &sa_map, (ar, ac)), ("B", &sb_map, (br, bc))] {
        let e = map.k_extent();
        if e != usize::MAX && chunks.iter().any(|&(k0, k1)| k0 / e != (k1 - 1) / e) {
            return Err(format!(
                "gemm_fp8: {name}'s scales (group \"{}\", stored {}x{}) change along K within a promotion chunk of {promotion}; \
                 use a promotion that divides {e} or a layout whose scale is constant along K",
                group_name(map.group), stored.0, stored.1
            ));
        }
    }
    check_len(
        "gemm_fp8: a_scales",
        a.scales.len(),
        a.group.scale_count(ar, ac),
    )?;
    check_len(
        "gemm_fp8: b_scales",
        b.scales.len(),
        b.group.scale_count(br, bc),
    )?;
    let c = &mut c[..m * n];
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        if output_bf16 {
            round_rows_bf16(c);
        }
        return Ok(());
    }
    // Per chunk, the scale of every row of op(A) and every column of op(B).
    let nch = chunks.len();
    let mut sa = vec![0f32; nch * m];
    let mut sb = vec![0f32; nch * n];
    for (ci, &(k0, _)) in chunks.iter().enumerate() {
        for i in 0..m {
            sa[ci * m + i] = a.scales[sa_map.index(k0, i)];
        }
        for j in 0..n {
            sb[ci * n + j] = b.scales[sb_map.index(k0, j)];
        }
    }
    #[cfg(target_arch = "x86_64")]
    if promotion <= super::kernel512::KC
        && (super::kernel512::available() || super::kernel256::available())
    {
        use super::{kernel256 as k2, kernel512 as k5};
        let wide = k5::available();
        // The column scales padded to whole panels (of the kernel that runs).
        let npd = if wide { k5::npad(n) } else { k2::npad(n) };
        let mut sbp = vec![0f32; nch * npd];
        for ci in 0..nch {
            sbp[ci * npd..ci * npd + n].copy_from_slice(&sb[ci * n..(ci + 1) * n]);
        }
        let (va, vb) = (View::of(&[], ac, trans_a), View::of(&[], bc, trans_b));
        let src = |q: &[u8], v: View, f| k5::Src::Fp8 {
            q: q.as_ptr(),
            rs: v.rs,
            cs: v.cs,
            f,
        };
        let promo = k5::Promotion {
            chunk: promotion,
            sa: &sa,
            sb: &sbp,
        };
        let (qa, qb) = (src(a.q, va, a.format), src(b.q, vb, b.format));
        if wide {
            unsafe { k5::gemm(p.mnk(), qa, qb, c.as_mut_ptr(), p.output(), Some(promo)) };
        } else {
            unsafe { k2::gemm(p.mnk(), qa, qb, c.as_mut_ptr(), p.output(), Some(promo)) };
        }
        return Ok(());
    }
    with_scratch(m * k + k * n, |s| {
        // Dequantise both operands once, unscaled, in their stored layout.
        let (da, db) = s.split_at_mut(m * k);
        dequant(&a.q[..m * k], a.format, da);
        dequant(&b.q[..k * n], b.format, db);
        let (va, vb) = (View::of(da, ac, trans_a), View::of(db, bc, trans_b));
        let out = OutView {
            ptr: c.as_mut_ptr(),
            ld: n,
        };
        let (tm, tn) = (m.div_ceil(MT), n.div_ceil(NT));
        (0..tm * tn).into_par_iter().for_each(|t| {
            let (i0, j0) = ((t / tn) * MT, (t % tn) * NT);
            let (mt, nt) = (MT.min(m - i0), NT.min(n - j0));
            with_scratch(mt * nt, |partial| {
                for (ci, &(k0, k1)) in chunks.iter().enumerate() {
                    // Partial sums of this chunk, then the promotion into C in f32.
                    let chunk = Mnk {
                        m: mt,
                        n: nt,
                        k: k1 - k0,
                    };
                    let part = OutView {
                        ptr: partial.as_mut_ptr(),
                        ld: nt,
                    };
                    let (ta, tb) = (va.at(i0, k0), vb.at(k0, j0));
                    unsafe { sgemm(chunk, ta, tb, part, false, Threads::Caller) };
                    let (sai, sbj) = (
                        &sa[ci * m + i0..ci * m + i0 + mt],
                        &sb[ci * n + j0..ci * n + j0 + nt],
                    );
                    let fresh = ci == 0 && !accumulate;
                    for (r, &sar) in sai.iter().enumerate() {
                        let crow =
                            unsafe { std::slice::from_raw_parts_mut(out.row(i0 + r).add(j0), nt) };
                        promote_row(crow, &partial[r * nt..(r + 1) * nt], sar, sbj, fresh);
                    }
                }
                if output_bf16 {
                    for r in 0..mt {
                        let crow =
                            unsafe { std::slice::from_raw_parts_mut(out.row(i0 + r).add(j0), nt) };
                        crow.iter_mut().for_each(|v| *v = bf16_round(*v));
                    }
                }
            });
        });
    });
    Ok(())
}

/// acc = acc + (partial * sa) * sb, rounded after each operation as the reference does
/// (no FMA contraction: Rust never fuses these).
#[inline]
fn promote_row(c: &mut [f32], p: &[f32], sa: f32, sb: &[f32], fresh: bool) {
    if fresh {
        for ((cv, &pv), &s) in c.iter_mut().zip(p).zip(sb) {
            *cv = 0.0 + pv * sa * s;
        }
    } else {
        for ((cv, &pv), &s) in c.iter_mut().zip(p).zip(sb) {
            *cv += pv * sa * s;
        }
    }
}

/// FP8 codes to unscaled f32 through the format's table, in parallel.
fn dequant(q: &[u8], f: Fp8Format, out: &mut [f32]) {
    out.par_chunks_mut(1 << 14)
        .zip(q.par_chunks(1 << 14))
        .for_each(|(o, q)| decode_slice(q, f, o));
}
