//! Register-tiled products of small matrices, for kernels that multiply tiles of their own scratch
//! (the attention's q.k, p.v and gradient products): C[rows, 16 nv] (+)= A B, with A read one
//! element at a time (broadcast, any strides) and B and C a row of 16-lane vectors at a time.
//!
//! The micro-kernel is `kernel512`'s design (an R x NV block of accumulators, one broadcast of A and
//! NV vectors of B per step of k) over a 16-lane vector type: one zmm register (AVX-512), two ymm
//! (AVX2+FMA) or an array of 16 floats (the baseline and NEON builds, through `f32::mul_add`). Each
//! element of C is one chain of fused multiply-adds along k, in order, starting from C (`add`) or
//! from +0, so every level and every register tiling computes the same bits; only the row count R of
//! the block differs per level (as many accumulators as the registers hold).
//!
//! Callers give, per block of rows, the k range and the first column vector to compute, so that the
//! masked corners of causal tiles are skipped. Terms left out are exact zeros (masked probabilities),
//! and `x + 0 = x` in every case where x is not -0 (a sum that starts at +0 never becomes -0), so a
//! skipped term leaves the same bits as a computed one.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Lanes of the vector type.
pub const W: usize = 16;

/// A 16-lane f32 vector.
pub trait Lanes: Copy {
    /// # Safety
    /// Each: the vector instructions of the type must be enabled in the caller (the entry points
    /// carry `target_feature`), and pointers must be valid for 16 floats (one for `splat`).
    unsafe fn zero() -> Self;
    /// # Safety
    /// See [`Lanes::zero`].
    unsafe fn splat(p: *const f32) -> Self;
    /// # Safety
    /// See [`Lanes::zero`].
    unsafe fn load(p: *const f32) -> Self;
    /// # Safety
    /// See [`Lanes::zero`].
    unsafe fn store(self, p: *mut f32);
    /// a * b + c, rounded once.
    ///
    /// # Safety
    /// See [`Lanes::zero`].
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    /// dst[c * ldd + r] = src[r * lds + c] for a 16 x 16 block (a plain copy, one element at a
    /// time unless the type has a register transposition).
    ///
    /// # Safety
    /// See [`Lanes::zero`]; both blocks lie in their allocations.
    #[inline(always)]
    unsafe fn transpose16(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
        for r in 0..W {
            for c in 0..W {
                *dst.add(c * ldd + r) = *src.add(r * lds + c);
            }
        }
    }
}

/// The portable vector: 16 floats, each lane through `f32::mul_add` (a fused multiply-add in
/// hardware where the build has one, a correctly rounded `fmaf` call otherwise).
#[derive(Clone, Copy)]
pub struct S16([f32; W]);

impl Lanes for S16 {
    #[inline(always)]
    unsafe fn zero() -> Self {
        S16([0.0; W])
    }
    #[inline(always)]
    unsafe fn splat(p: *const f32) -> Self {
        S16([*p; W])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        S16(*(p as *const [f32; W]))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        *(p as *mut [f32; W]) = self.0;
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        let mut r = c.0;
        for ((x, &a), &b) in r.iter_mut().zip(&a.0).zip(&b.0) {
            *x = a.mul_add(b, *x);
        }
        S16(r)
    }
}

/// One zmm register.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub struct Z512(__m512);

#[cfg(target_arch = "x86_64")]
impl Lanes for Z512 {
    #[inline(always)]
    unsafe fn zero() -> Self {
        Z512(_mm512_setzero_ps())
    }
    #[inline(always)]
    unsafe fn splat(p: *const f32) -> Self {
        Z512(_mm512_set1_ps(*p))
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Z512(_mm512_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm512_storeu_ps(p, self.0)
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        Z512(_mm512_fmadd_ps(a.0, b.0, c.0))
    }
    /// In registers: unpacks pair rows, `shuffle_ps` makes 4 x 4 blocks within 128-bit lanes, and
    /// two rounds of `shuffle_f32x4` move the lanes into place (64 shuffles for 256 floats).
    #[inline(always)]
    unsafe fn transpose16(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
        let r: [__m512; W] = std::array::from_fn(|i| _mm512_loadu_ps(src.add(i * lds)));
        let mut t = [_mm512_setzero_ps(); W];
        for i in 0..W / 2 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // u[4g + k], 128-bit lane L: column 4L + k of rows 4g..4g+3.
        let mut u = [_mm512_setzero_ps(); W];
        for g in 0..4 {
            let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
            u[4 * g] = _mm512_shuffle_ps::<0x44>(a, c);
            u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(a, c);
            u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(b, d);
            u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(b, d);
        }
        for k in 0..4 {
            let v0 = _mm512_shuffle_f32x4::<0x88>(u[k], u[4 + k]);
            let v1 = _mm512_shuffle_f32x4::<0xDD>(u[k], u[4 + k]);
            let x0 = _mm512_shuffle_f32x4::<0x88>(u[8 + k], u[12 + k]);
            let x1 = _mm512_shuffle_f32x4::<0xDD>(u[8 + k], u[12 + k]);
            _mm512_storeu_ps(dst.add(k * ldd), _mm512_shuffle_f32x4::<0x88>(v0, x0));
            _mm512_storeu_ps(dst.add((4 + k) * ldd), _mm512_shuffle_f32x4::<0x88>(v1, x1));
            _mm512_storeu_ps(dst.add((8 + k) * ldd), _mm512_shuffle_f32x4::<0xDD>(v0, x0));
            _mm512_storeu_ps(
                dst.add((12 + k) * ldd),
                _mm512_shuffle_f32x4::<0xDD>(v1, x1),
            );
        }
    }
}

/// Two ymm registers.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub struct Y256(__m256, __m256);

#[cfg(target_arch = "x86_64")]
impl Lanes for Y256 {
    #[inline(always)]
    unsafe fn zero() -> Self {
        Y256(_mm256_setzero_ps(), _mm256_setzero_ps())
    }
    #[inline(always)]
    unsafe fn splat(p: *const f32) -> Self {
        let x = _mm256_broadcast_ss(&*p);
        Y256(x, x)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Y256(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm256_storeu_ps(p, self.0);
        _mm256_storeu_ps(p.add(8), self.1);
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        Y256(
            _mm256_fmadd_ps(a.0, b.0, c.0),
            _mm256_fmadd_ps(a.1, b.1, c.1),
        )
    }
}

/// One product block: A(i, k) at `a + i*ars + k*acs`, row k of B at `b + k*ldb`, row i of C at
/// `c + i*ldc`; k runs over `k0..k1`; `add` continues from C's values instead of from zero.
#[derive(Clone, Copy)]
pub struct Tile {
    pub a: *const f32,
    pub ars: usize,
    pub acs: usize,
    pub b: *const f32,
    pub ldb: usize,
    pub c: *mut f32,
    pub ldc: usize,
    pub k0: usize,
    pub k1: usize,
    pub add: bool,
}

/// R rows by NV vectors of C.
#[inline(always)]
unsafe fn micro<V: Lanes, const R: usize, const NV: usize>(t: Tile) {
    let mut acc = [[V::zero(); NV]; R];
    if t.add {
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                *x = V::load(t.c.add(r * t.ldc + v * W));
            }
        }
    }
    let mut ap = t.a.add(t.k0 * t.acs);
    let mut bp = t.b.add(t.k0 * t.ldb);
    for _ in t.k0..t.k1 {
        let mut bv = [V::zero(); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = V::load(bp.add(v * W));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let av = V::splat(ap.add(r * t.ars));
            for (x, &b) in row.iter_mut().zip(&bv) {
                *x = V::fma(av, b, *x);
            }
        }
        ap = ap.add(t.acs);
        bp = bp.add(t.ldb);
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            x.store(t.c.add(r * t.ldc + v * W));
        }
    }
}

/// R rows by `nv` (1 to 4) vectors.
#[inline(always)]
unsafe fn by_width<V: Lanes, const R: usize>(nv: usize, t: Tile) {
    match nv {
        1 => micro::<V, R, 1>(t),
        2 => micro::<V, R, 2>(t),
        3 => micro::<V, R, 3>(t),
        _ => micro::<V, R, 4>(t),
    }
}

/// A vector type with its register tiling: the rows of a block of 1 to 4 vectors.
pub trait Tiles: Lanes {
    /// Rows of a block `nv` vectors wide (a divisor of 16).
    fn rows(nv: usize) -> usize;
    /// One block of `rows(full)` rows by `nv <= full` vectors.
    ///
    /// # Safety
    /// As [`Lanes`]; `t` covers the elements the block reads and writes.
    unsafe fn block(full: usize, nv: usize, t: Tile);
}

macro_rules! tiles {
    ($t:ty, $r1:literal, $r2:literal, $r3:literal, $r4:literal) => {
        impl Tiles for $t {
            #[inline(always)]
            fn rows(nv: usize) -> usize {
                match nv {
                    1 => $r1,
                    2 => $r2,
                    3 => $r3,
                    _ => $r4,
                }
            }
            #[inline(always)]
            unsafe fn block(full: usize, nv: usize, t: Tile) {
                match full {
                    1 => by_width::<$t, $r1>(nv, t),
                    2 => by_width::<$t, $r2>(nv, t),
                    3 => by_width::<$t, $r3>(nv, t),
                    _ => by_width::<$t, $r4>(nv, t),
                }
            }
        }
    };
}

// 32 zmm registers: up to 16 accumulators and the B vectors.
#[cfg(target_arch = "x86_64")]
tiles!(Z512, 16, 8, 8, 4);
// 16 ymm registers, two per vector: up to 12 accumulators.
#[cfg(target_arch = "x86_64")]
tiles!(Y256, 4, 2, 2, 1);
tiles!(S16, 4, 2, 1, 1);

/// What a block of rows of a product computes: the k range and the first column vector (the
/// columns before it are left as they are).
#[derive(Clone, Copy)]
pub struct Span {
    pub k0: usize,
    pub k1: usize,
    pub v0: usize,
}

/// C[0..rows, 0..16 nv] (+)= A B (`t` with its k range unused), in blocks of rows whose k range
/// and first column vector `span(r0, r1)` gives for rows r0..r1. `rows` is a multiple of 16. A block
/// with an empty k range is left as it is when adding and set to zero otherwise.
///
/// # Safety
/// As [`Lanes`]; `t` covers every element read and written.
#[inline(always)]
pub unsafe fn product<V: Tiles>(
    rows: usize,
    nv: usize,
    t: Tile,
    span: impl Fn(usize, usize) -> Span,
) {
    let mut g = 0;
    while g < nv {
        let full = (nv - g).min(4);
        let r = V::rows(full);
        let mut r0 = 0;
        while r0 < rows {
            let Span { k0, k1, v0 } = span(r0, r0 + r);
            let vs = v0.max(g);
            if vs < g + full {
                let c = t.c.add(r0 * t.ldc + vs * W);
                if k0 < k1 {
                    let blk = Tile {
                        a: t.a.add(r0 * t.ars),
                        b: t.b.add(vs * W),
                        c,
                        k0,
                        k1,
                        ..t
                    };
                    V::block(full, g + full - vs, blk);
                } else if !t.add {
                    for i in 0..r {
                        std::slice::from_raw_parts_mut(c.add(i * t.ldc), (g + full - vs) * W)
                            .fill(0.0);
                    }
                }
            }
            r0 += r;
        }
        g += full;
    }
}

/// One row: c[0..16 nv] (+)= sum over k of a[k * acs] * B[k, ..] (`t.ars`, `t.ldc` unused).
///
/// # Safety
/// As [`product`].
#[inline(always)]
pub unsafe fn row_product<V: Lanes>(nv: usize, t: Tile) {
    let mut g = 0;
    while g < nv {
        let w = (nv - g).min(4);
        let blk = Tile {
            b: t.b.add(g * W),
            c: t.c.add(g * W),
            ..t
        };
        by_width::<V, 1>(w, blk);
        g += w;
    }
}

/// Defines `fn name(args)` that runs the generic `body::<V>(args)` with the widest vector type
/// the CPU runs ([`super::util::level`]): `Z512` under AVX-512, `Y256` under AVX2+FMA (each
/// compiled with those instructions enabled, so plain loops in the body vectorise for them too),
/// `S16` otherwise.
macro_rules! by_level {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) => $body:ident) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,avx")]
                unsafe fn z($($arg: $ty),*) {
                    $body::<$crate::ops::tiles::Z512>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,avx")]
                unsafe fn y($($arg: $ty),*) {
                    $body::<$crate::ops::tiles::Y256>($($arg),*)
                }
                match $crate::ops::util::level() {
                    $crate::simd::SimdLevel::Avx512 => return unsafe { z($($arg),*) },
                    $crate::simd::SimdLevel::Avx2Fma => return unsafe { y($($arg),*) },
                    _ => {}
                }
            }
            unsafe { $body::<$crate::ops::tiles::S16>($($arg),*) }
        }
    };
}
pub(crate) use by_level;

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        b: &[f32],
        c0: &[f32],
        add: bool,
    ) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = if add { c0[i * n + j] } else { 0.0 };
                for p in 0..k {
                    s = a[i * k + p].mul_add(b[p * n + j], s);
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    unsafe fn run<V: Tiles>(
        m: usize,
        nv: usize,
        k: usize,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        add: bool,
    ) {
        let n = nv * W;
        let t = Tile {
            a: a.as_ptr(),
            ars: k,
            acs: 1,
            b: b.as_ptr(),
            ldb: n,
            c: c.as_mut_ptr(),
            ldc: n,
            k0: 0,
            k1: 0,
            add,
        };
        product::<V>(m, nv, t, |_, _| Span {
            k0: 0,
            k1: k,
            v0: 0,
        });
    }

    unsafe fn transposed<V: Tiles>(src: &[f32], dst: &mut [f32]) {
        V::transpose16(src.as_ptr().add(3), 21, dst.as_mut_ptr().add(1), 19);
    }

    by_level!(fn transpose_level(src: &[f32], dst: &mut [f32]) => transposed);

    #[test]
    fn transposition_moves_every_element() {
        let src: Vec<f32> = (0..21 * 16).map(|i| i as f32).collect();
        let mut want = vec![-1f32; 19 * 16 + 1];
        for r in 0..16 {
            for c in 0..16 {
                want[1 + c * 19 + r] = src[3 + r * 21 + c];
            }
        }
        let mut got = vec![-1f32; want.len()];
        transpose_level(&src, &mut got);
        assert_eq!(got, want);
    }

    by_level!(fn run_level(m: usize, nv: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32], add: bool) => run);

    /// Every level and width gives the bits of a plain chain of `mul_add` along k.
    #[test]
    fn products_equal_a_fused_chain() {
        let val = |i: usize| ((i * 7919 % 1013) as f32 - 506.0) / 97.0;
        for &(m, nv, k) in &[
            (16, 1, 5),
            (32, 3, 48),
            (64, 4, 33),
            (16, 6, 17),
            (48, 2, 1),
        ] {
            let n = nv * W;
            let a: Vec<f32> = (0..m * k).map(val).collect();
            let b: Vec<f32> = (0..k * n).map(|i| val(i + 31)).collect();
            let c0: Vec<f32> = (0..m * n).map(|i| val(i + 77)).collect();
            for add in [false, true] {
                let want = naive(m, n, k, &a, &b, &c0, add);
                let mut c = c0.clone();
                run_level(m, nv, k, &a, &b, &mut c, add);
                assert_eq!(c, want, "{:?}", (m, nv, k, add));
                let mut c = c0.clone();
                unsafe { run::<S16>(m, nv, k, &a, &b, &mut c, add) };
                assert_eq!(c, want, "scalar {:?}", (m, nv, k, add));
            }
        }
    }
}
