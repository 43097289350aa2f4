//! Shared helpers of the non-GEMM kernels: SIMD dispatch, BF16 rounding, a vectorisable exp,
//! deterministic f64 reductions and a pointer wrapper for disjoint parallel writes.

use crate::simd::SimdLevel;
use rayon::prelude::*;
use std::sync::OnceLock;

static LEVEL: OnceLock<SimdLevel> = OnceLock::new();

/// The SIMD level the kernels of this module dispatch on (read once; `MOE8_SIMD=scalar` forces the
/// baseline build). AVX-512 is used only with the F, BW, VL and DQ subsets all present.
pub fn level() -> SimdLevel {
    *LEVEL.get_or_init(|| {
        let l = crate::simd::detect();
        #[cfg(target_arch = "x86_64")]
        {
            if l == SimdLevel::Avx512
                && !(is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
                    && is_x86_feature_detected!("avx2"))
            {
                return SimdLevel::Avx2Fma;
            }
        }
        l
    })
}

/// Defines `pub fn name(args) -> R` that runs one body compiled three times: for AVX-512, for
/// AVX2+FMA and for the baseline target, picked at run time by [`level`]. The body only uses
/// plain Rust (no `mul_add`), so LLVM's auto-vectorisation changes the instruction width and never
/// the results: every level computes bit-identical outputs.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,avx")]
                unsafe fn v512($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                #[target_feature(enable = "avx2,fma,avx")]
                unsafe fn v256($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                match $crate::ops::util::level() {
                    $crate::simd::SimdLevel::Avx512 => return unsafe { v512($($arg),*) },
                    $crate::simd::SimdLevel::Avx2Fma => return unsafe { v256($($arg),*) },
                    _ => {}
                }
            }
            inner($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// A raw pointer that may cross threads: for kernels whose parallel tasks write disjoint parts of
/// one output (each task's region is documented where it is used).
#[derive(Clone, Copy)]
pub struct SendPtr<T>(pub *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// # Safety
    /// `off..off+len` is inside the allocation and no other live reference overlaps it.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, off: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(off), len)
    }
}

/// BF16 bits of `x`: round to nearest even, inf kept, every NaN to 0x7fff (as @moe8/fp8-core).
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let r = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        0x7fff
    } else {
        r
    }
}

#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` rounded to the nearest BF16 value (as an f32).
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    bf16_to_f32(bf16_bits(x))
}

/// e^x in f32 with a relative error of about 1 ulp (Cephes' expf polynomial), written without
/// branches or calls so that loops over it vectorise. Results below ~2^-125 flush to 0; x > 88.72
/// gives inf; NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer (ties to even)
    let xc = x.clamp(-87.0, 88.72);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    // The integer n sits in the low mantissa bits of t (no float-to-int conversion, which would
    // not vectorise with Rust's saturating `as` semantics).
    let ni = (t.to_bits() as i32).wrapping_sub(0x4b40_0000);
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^(n-1) * 2 keeps n = 128 finite in the exponent field.
    let s = f32::from_bits((ni.wrapping_add(126) << 23) as u32);
    let v = y * s * 2.0;
    let v = if x < -87.0 { 0.0 } else { v };
    if x > 88.72 {
        f32::INFINITY
    } else {
        v
    }
}

/// 1 / (1 + e^-x) in f32.
#[inline(always)]
pub fn sigmoid_f32(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// Lanes of the f64 reductions: four AVX-512 vectors of independent add chains.
const LANES: usize = 32;

#[inline(always)]
fn fold_lanes(acc: &[f64; LANES]) -> f64 {
    // A fixed pairwise tree: the association depends only on the lane count.
    let mut v = *acc;
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            v[l] += v[l + w];
        }
        w /= 2;
    }
    v[0]
}

/// Sum of `f(x[i])` in f64 over 32 fixed lanes (vectorises; the association depends only on the
/// length, never on threads or on the SIMD level).
#[inline(always)]
pub fn sum_f64_by<F: Fn(f32) -> f64>(x: &[f32], f: F) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        let c: &[f32; LANES] = c.try_into().unwrap();
        for l in 0..LANES {
            acc[l] += f(c[l]);
        }
    }
    for (l, &v) in rest.iter().enumerate() {
        acc[l] += f(v);
    }
    fold_lanes(&acc)
}

/// Dot product in f64 (each product exact) over 32 fixed lanes.
#[inline(always)]
pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f64; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        let (x, y): (&[f32; LANES], &[f32; LANES]) = (x.try_into().unwrap(), y.try_into().unwrap());
        for l in 0..LANES {
            acc[l] += x[l] as f64 * y[l] as f64;
        }
    }
    for l in 0..ra.len() {
        acc[l] += ra[l] as f64 * rb[l] as f64;
    }
    fold_lanes(&acc)
}

/// sum_i a[i] * b[i] * c[i] in f64 ((a*b)*c per element, as JS evaluates it) over 32 fixed lanes.
#[inline(always)]
pub fn dot3_f64(a: &[f32], b: &[f32], c: &[f32]) -> f64 {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [0f64; LANES];
    let full = n / LANES * LANES;
    for i in (0..full).step_by(LANES) {
        let x: &[f32; LANES] = a[i..i + LANES].try_into().unwrap();
        let y: &[f32; LANES] = b[i..i + LANES].try_into().unwrap();
        let z: &[f32; LANES] = c[i..i + LANES].try_into().unwrap();
        for l in 0..LANES {
            acc[l] += x[l] as f64 * y[l] as f64 * z[l] as f64;
        }
    }
    for i in full..n {
        acc[i - full] += a[i] as f64 * b[i] as f64 * c[i] as f64;
    }
    fold_lanes(&acc)
}

/// Elements per parallel block of the deterministic reductions: fixed, so the result of a
/// reduction never depends on the number of threads or on scheduling.
pub const REDUCE_BLOCK: usize = 1 << 14;

multiversion! {
    fn block_sum(x: &[f32]) -> f64 { sum_f64_by(x, |v| v as f64) }
}
multiversion! {
    fn block_sumsq(x: &[f32]) -> f64 { sum_f64_by(x, |v| { let d = v as f64; d * d }) }
}

/// Deterministic parallel f64 sum of `x` (fixed blocks summed in order).
pub fn par_sum(x: &[f32]) -> f64 {
    let parts: Vec<f64> = x.par_chunks(REDUCE_BLOCK).map(block_sum).collect();
    parts.iter().sum()
}

/// Deterministic parallel f64 sum of squares of `x`.
pub fn par_sumsq(x: &[f32]) -> f64 {
    let parts: Vec<f64> = x.par_chunks(REDUCE_BLOCK).map(block_sumsq).collect();
    parts.iter().sum()
}

/// Rows per parallel task for a row-wise kernel with `cols` columns: about 16K elements a task.
#[inline]
pub fn rows_per_task(cols: usize) -> usize {
    (REDUCE_BLOCK / cols.max(1)).max(1)
}

/// Touches every 4 KiB page of `x` with a write that keeps its value (an atomic `or` with an
/// opaque 0, which LLVM cannot turn into a load), before a read-modify-write kernel runs over it.
///
/// A fresh typed array's pages are not mapped yet; a kernel that reads them first gets the shared
/// zero page mapped, and its write then takes a copy-on-write fault whose TLB flush interrupts the
/// other cores (an IPI per page: ~20 us each in a VM). That made `zeros` + `headScatterAdd` cost
/// ~10 ms for 2 MB. Writing first maps each page directly, without a flush. On mapped memory this
/// costs one locked instruction per page.
pub fn prefault_for_write<T>(x: &mut [T]) {
    use std::sync::atomic::{AtomicU8, Ordering};
    let bytes = std::mem::size_of_val(x);
    if bytes < 1 << 16 {
        return;
    }
    let p = x.as_mut_ptr() as *mut u8;
    let zero = std::hint::black_box(0u8);
    let mut off = 0;
    while off < bytes {
        // SAFETY: in bounds of the exclusively borrowed slice; the value is unchanged.
        unsafe { AtomicU8::from_ptr(p.add(off)).fetch_or(zero, Ordering::Relaxed) };
        off += 4096;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -86.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(1000.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80); // tie to even (down)
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82); // tie to even (up)
        assert_eq!(bf16_bits(f32::NAN), 0x7fff);
        assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
        assert_eq!(bf16_bits(f32::NEG_INFINITY), 0xff80);
        assert_eq!(bf16_bits(f32::MAX), 0x7f80); // rounds up to inf
    }
}
