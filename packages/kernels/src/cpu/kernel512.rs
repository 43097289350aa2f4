//! The AVX-512 GEMM of the BF16 and FP8 precisions when the CPU has AVX-512F: packed B micro-panels,
//! per-task A blocks, a 12x32 register-tiled micro-kernel (24 zmm accumulators), and the BF16
//! rounding or FP8 decoding fused into the packing, so no operand is converted twice and no
//! whole-operand scratch copy is made.
//!
//! C[M,N] (+)= op(A)[M,K] op(B)[K,N]. K is walked in chunks: `KC` for f32/BF16 (the accumulator
//! goes back through C between chunks), the promotion interval for FP8 (each chunk's partial sums
//! start at zero in registers and are promoted into C as `c + (p * sa) * sb`, rounded after each
//! operation as the reference does). Tasks are (row block, column block) tiles of C and K is never
//! split across threads, so every element's summation order depends only on the shape: the
//! results are bit-for-bit repeatable, whatever the thread count.

use super::fp8::{bf16_round, decode_slice, Fp8Format};
use super::gemm::{Mnk, Output};
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Micro-tile: MR rows of C by NR columns (two zmm vectors).
pub const MR: usize = 12;
pub const NR: usize = 32;
/// Rows of C per task (a multiple of MR).
const MC: usize = 96;
/// K chunk of the f32/BF16 GEMM, and the largest FP8 promotion interval handled here. Also the
/// row stride of the row-major A blocks.
pub const KC: usize = 128;

/// Whether this path can run (AVX-512F present, not forced scalar).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && crate::simd::detect() == crate::simd::SimdLevel::Avx512
    })
}

/// An operand: element (i, j) of op(X) at `i*rs + j*cs` (elements), f32 (optionally rounded to
/// BF16) or FP8 codes (decoded without their scales).
#[derive(Clone, Copy)]
pub enum Src {
    F32 {
        p: *const f32,
        rs: isize,
        cs: isize,
        bf16: bool,
    },
    Fp8 {
        q: *const u8,
        rs: isize,
        cs: isize,
        f: Fp8Format,
    },
}
unsafe impl Send for Src {}
unsafe impl Sync for Src {}

impl Src {
    pub(crate) fn strides(self) -> (isize, isize) {
        match self {
            Src::F32 { rs, cs, .. } | Src::Fp8 { rs, cs, .. } => (rs, cs),
        }
    }

    /// out[t] = converted element at offset `off + t*step`, t < out.len().
    #[inline(always)]
    pub(crate) unsafe fn load_run(self, off: isize, step: isize, out: &mut [f32]) {
        let len = out.len();
        match self {
            Src::F32 { p, bf16, .. } => {
                if step == 1 {
                    let s = std::slice::from_raw_parts(p.offset(off), len);
                    if bf16 {
                        out.iter_mut().zip(s).for_each(|(o, &v)| *o = bf16_round(v));
                    } else {
                        out.copy_from_slice(s);
                    }
                } else {
                    for (t, o) in out.iter_mut().enumerate() {
                        let v = *p.offset(off + t as isize * step);
                        *o = if bf16 { bf16_round(v) } else { v };
                    }
                }
            }
            Src::Fp8 { q, f, .. } => {
                if step == 1 {
                    decode_slice(std::slice::from_raw_parts(q.offset(off), len), f, out);
                } else {
                    let tab = f.table();
                    for (t, o) in out.iter_mut().enumerate() {
                        *o = tab[*q.offset(off + t as isize * step) as usize];
                    }
                }
            }
        }
    }
}

/// A 64-byte aligned f32 buffer kept per thread (grown on demand, never shrunk).
pub(crate) struct Aligned {
    buf: Vec<f32>,
}
impl Aligned {
    pub(crate) const fn new() -> Self {
        Aligned { buf: Vec::new() }
    }
    /// Floats held (the larger of two buffers is the one to keep).
    pub(crate) fn capacity(&self) -> usize {
        self.buf.len()
    }
    pub(crate) fn get(&mut self, len: usize) -> &mut [f32] {
        if self.buf.len() < len + 16 {
            self.buf = vec![0f32; len + 16];
        }
        let off = self.buf.as_ptr().align_offset(64).min(15);
        &mut self.buf[off..off + len]
    }
}

thread_local! {
    static BPACK: RefCell<Aligned> = const { RefCell::new(Aligned::new()) };
    static ABLOCK: RefCell<Aligned> = const { RefCell::new(Aligned::new()) };
}

/// Packs op(B) [K, N] into NR-wide panels `bp[p][k][NR]` (zero beyond N).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn pack_b_panel(b: Src, k: usize, n: usize, p: usize, out: &mut [f32], tmp: &mut Vec<f32>) {
    let (rs, cs) = b.strides();
    let j0 = p * NR;
    let w = NR.min(n - j0);
    if cs == 1 || w == 1 {
        for kk in 0..k {
            let o = &mut out[kk * NR..(kk + 1) * NR];
            b.load_run(kk as isize * rs + j0 as isize * cs, cs, &mut o[..w]);
            o[w..].fill(0.0);
        }
    } else {
        if tmp.len() < k {
            tmp.resize(k, 0.0);
        }
        for c in 0..NR {
            if c < w {
                b.load_run((j0 + c) as isize * cs, rs, &mut tmp[..k]);
                for (kk, &v) in tmp[..k].iter().enumerate() {
                    out[kk * NR + c] = v;
                }
            } else {
                for kk in 0..k {
                    out[kk * NR + c] = 0.0;
                }
            }
        }
    }
}

/// Copies rows [i0, i0+rows) x K-chunk [k0, k0+kc) of op(A) into `out`, rows padded with zeros to
/// a multiple of MR: row-major with row stride KC when A's rows are contiguous along K
/// (`rowmajor`), else as MR-row panels `[panel][kc][MR]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn pack_a_block(
    a: Src,
    i0: usize,
    rows: usize,
    k0: usize,
    kc: usize,
    rowmajor: bool,
    out: &mut [f32],
) {
    let (rs, cs) = a.strides();
    let rpad = rows.div_ceil(MR) * MR;
    if rowmajor {
        for r in 0..rpad {
            let o = &mut out[r * KC..r * KC + kc];
            if r < rows {
                a.load_run((i0 + r) as isize * rs + k0 as isize * cs, cs, o);
            } else {
                o.fill(0.0);
            }
        }
    } else {
        // Panels [kc][MR]: op(A)'s MR rows of one k are contiguous in the stored [K, M] matrix.
        for (pi, r0) in (0..rpad).step_by(MR).enumerate() {
            let w = MR.min(rows.saturating_sub(r0));
            let mask = mask16(w);
            let o = out.as_mut_ptr().add(pi * MR * KC);
            for kk in 0..kc {
                let off = (i0 + r0) as isize * rs + (k0 + kk) as isize * cs;
                let v = match a {
                    Src::F32 { p, bf16, .. } => {
                        let v = _mm512_maskz_loadu_ps(mask, p.offset(off));
                        if bf16 {
                            round_bf16_vec(v)
                        } else {
                            v
                        }
                    }
                    // The panel's MR codes of one k are contiguous: decoded in a register (a
                    // decode through memory stalled on store forwarding, half of this function).
                    Src::Fp8 { q, f, .. } if rs == 1 => decode16(q.offset(off), mask, f),
                    Src::Fp8 { q, f, .. } => {
                        let tab = f.table();
                        let mut t = [0f32; 16];
                        for (x, tv) in t.iter_mut().enumerate().take(w) {
                            *tv = tab[*q.offset(off + x as isize * rs) as usize];
                        }
                        _mm512_loadu_ps(t.as_ptr())
                    }
                };
                _mm512_mask_storeu_ps(o.add(kk * MR), 0x0fff, v);
            }
        }
    }
}

/// The FP8 codes of the lanes in `mask` (others read as code 0) decoded to f32 without scales, bit
/// for bit as `fp8::decode_slice`: sign | (code < min normal ? code * 2^-(bias+man-1) : re-biased
/// exponent and mantissa), the NaN codes (and E5M2's infinity) mapped as there.
#[inline(always)]
unsafe fn decode16(q: *const u8, mask: __mmask16, f: Fp8Format) -> __m512 {
    let x = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, q as *const i8));
    let c = _mm512_and_si512(x, _mm512_set1_epi32(0x7f));
    let sign = _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x80)), 24);
    let (min_normal, sub_scale, shift, rebias) = match f {
        Fp8Format::E4M3 => (8, 1.0 / 512.0, 20, 120 << 23),
        Fp8Format::E5M2 => (4, 1.0 / 65536.0, 21, 112 << 23),
    };
    let sub = _mm512_castps_si512(_mm512_mul_ps(
        _mm512_cvtepi32_ps(c),
        _mm512_set1_ps(sub_scale),
    ));
    let normal = _mm512_add_epi32(
        _mm512_sllv_epi32(c, _mm512_set1_epi32(shift)),
        _mm512_set1_epi32(rebias),
    );
    let is_sub = _mm512_cmplt_epi32_mask(c, _mm512_set1_epi32(min_normal));
    let mut v = _mm512_mask_blend_epi32(is_sub, normal, sub);
    let nan = _mm512_set1_epi32(0x7fc0_0000);
    match f {
        Fp8Format::E4M3 => {
            v = _mm512_mask_mov_epi32(v, _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(0x7f)), nan);
        }
        Fp8Format::E5M2 => {
            let inf = _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(0x7c));
            v = _mm512_mask_mov_epi32(v, inf, _mm512_set1_epi32(0x7f80_0000));
            v = _mm512_mask_mov_epi32(v, _mm512_cmpgt_epi32_mask(c, _mm512_set1_epi32(0x7c)), nan);
        }
    }
    _mm512_castsi512_ps(_mm512_or_si512(v, sign))
}

/// BF16 rounding of 16 lanes, as `bf16_round` (RNE; NaN -> the quiet NaN 0x7fff0000).
#[inline(always)]
unsafe fn round_bf16_vec(v: __m512) -> __m512 {
    let b = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    let r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    let r = _mm512_and_si512(r, _mm512_set1_epi32(0xffff_0000u32 as i32));
    let abs = _mm512_and_si512(b, _mm512_set1_epi32(0x7fff_ffff));
    let nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7f80_0000));
    let r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fff_0000));
    _mm512_castsi512_ps(r)
}

/// What the micro-kernel does with its accumulators.
#[derive(Clone, Copy)]
enum Epi {
    /// C = acc (accumulators start at zero).
    Set,
    /// C = acc, accumulators start from C.
    Add,
    /// C = (fresh ? 0 : C) + (acc * sa[r]) * sb[j] (FP8 promotion; accumulators start at zero).
    Promote {
        sa: *const f32,
        sb: *const f32,
        fresh: bool,
    },
}

#[inline(always)]
fn mask16(w: usize) -> __mmask16 {
    if w >= 16 {
        0xffff
    } else {
        ((1u32 << w) - 1) as __mmask16
    }
}

/// Where a micro-kernel's MR x NR tile of C lies: its first element and row stride, and which of
/// it is stored (the first `mr` rows; the columns of masks m0 and m1, 16 each).
#[derive(Clone, Copy)]
struct Tile {
    c: *mut f32,
    ldc: usize,
    mr: usize,
    m0: __mmask16,
    m1: __mmask16,
}

/// One MR x NR tile of C from `kc` steps of packed A (`a`) and packed B (`b`).
#[inline(always)]
unsafe fn micro<const ROWMAJOR: bool>(kc: usize, a: *const f32, b: *const f32, t: Tile, epi: Epi) {
    let Tile { c, ldc, mr, m0, m1 } = t;
    let mut acc0 = [_mm512_setzero_ps(); MR];
    let mut acc1 = [_mm512_setzero_ps(); MR];
    if let Epi::Add = epi {
        for r in 0..MR {
            if r < mr {
                acc0[r] = _mm512_maskz_loadu_ps(m0, c.add(r * ldc));
                acc1[r] = _mm512_maskz_loadu_ps(m1, c.add(r * ldc + 16));
            }
        }
    }
    let (mut ap, mut bp) = (a, b);
    for _ in 0..kc {
        let b0 = _mm512_load_ps(bp);
        let b1 = _mm512_load_ps(bp.add(16));
        for r in 0..MR {
            let av = _mm512_set1_ps(*ap.add(if ROWMAJOR { r * KC } else { r }));
            acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
            acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
        }
        ap = ap.add(if ROWMAJOR { 1 } else { MR });
        bp = bp.add(NR);
    }
    match epi {
        Epi::Set | Epi::Add => {
            for r in 0..MR {
                if r < mr {
                    _mm512_mask_storeu_ps(c.add(r * ldc), m0, acc0[r]);
                    _mm512_mask_storeu_ps(c.add(r * ldc + 16), m1, acc1[r]);
                }
            }
        }
        Epi::Promote { sa, sb, fresh } => {
            let sb0 = _mm512_loadu_ps(sb);
            let sb1 = _mm512_loadu_ps(sb.add(16));
            for r in 0..MR {
                if r < mr {
                    let s = _mm512_set1_ps(*sa.add(r));
                    let (c0, c1) = if fresh {
                        (_mm512_setzero_ps(), _mm512_setzero_ps())
                    } else {
                        (
                            _mm512_maskz_loadu_ps(m0, c.add(r * ldc)),
                            _mm512_maskz_loadu_ps(m1, c.add(r * ldc + 16)),
                        )
                    };
                    let t0 = _mm512_mul_ps(_mm512_mul_ps(acc0[r], s), sb0);
                    let t1 = _mm512_mul_ps(_mm512_mul_ps(acc1[r], s), sb1);
                    _mm512_mask_storeu_ps(c.add(r * ldc), m0, _mm512_add_ps(c0, t0));
                    _mm512_mask_storeu_ps(c.add(r * ldc + 16), m1, _mm512_add_ps(c1, t1));
                }
            }
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn micro_rm(kc: usize, a: *const f32, b: *const f32, t: Tile, epi: Epi) {
    micro::<true>(kc, a, b, t, epi)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn micro_pk(kc: usize, a: *const f32, b: *const f32, t: Tile, epi: Epi) {
    micro::<false>(kc, a, b, t, epi)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn round_bf16_rows(c: *mut f32, ldc: usize, rows: usize, j0: usize, j1: usize) {
    for r in 0..rows {
        let row = std::slice::from_raw_parts_mut(c.add(r * ldc + j0), j1 - j0);
        row.iter_mut().for_each(|v| *v = bf16_round(*v));
    }
}

#[derive(Clone, Copy)]
struct CPtr(*mut f32);
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}

/// FP8 promotion data: per chunk, the scale of each row of op(A) (`sa[chunk * m + i]`) and of
/// each column of op(B) padded to whole panels (`sb[chunk * npad + j]`, npad = N rounded up to NR).
pub struct Promotion<'a> {
    pub chunk: usize,
    pub sa: &'a [f32],
    pub sb: &'a [f32],
}

/// N rounded up to whole panels (the row length of `Promotion::sb`).
pub fn npad(n: usize) -> usize {
    n.div_ceil(NR) * NR
}

/// C[m x n] (row-major, row stride n) (+)= op(A) op(B) as described in the module docs; `out`
/// says whether to add into C and whether to round the result to BF16.
///
/// # Safety
/// `available()` must be true; the sources must cover their m x k and k x n elements and `c`
/// m * n elements; m, n, k > 0; an FP8 promotion chunk must be <= KC.
pub unsafe fn gemm(s: Mnk, a: Src, b: Src, c: *mut f32, out: Output, promo: Option<Promotion>) {
    let Mnk { m, n, k } = s;
    let Output {
        accumulate,
        bf16: output_bf16,
    } = out;
    let chunk = promo.as_ref().map_or(KC, |p| p.chunk);
    assert!(chunk > 0 && chunk <= KC && m > 0 && n > 0 && k > 0);
    let np = n.div_ceil(NR);
    let npd = np * NR;
    // Enough tasks to balance the threads: split M first (each task converts its A rows once and
    // streams all of packed B), in blocks of at most MC rows, then N if M is too short.
    let want = 4 * rayon::current_num_threads();
    let mc = (m.div_ceil(want).div_ceil(MR) * MR).clamp(MR, MC);
    let mb = m.div_ceil(mc);
    let nb = np.min(want.div_ceil(mb)).max(1);
    let ppb = np.div_ceil(nb);
    let nb = np.div_ceil(ppb);
    let (_, acs) = a.strides();
    let rowmajor = acs == 1;
    let cp = CPtr(c);
    // The packed B buffer is taken out of its slot while in use (a nested call allocates).
    let mut bpk = BPACK.with(|s| std::mem::replace(&mut *s.borrow_mut(), Aligned::new()));
    {
        let bp = bpk.get(np * k * NR);
        // Pack B once, in parallel over panels when it is large.
        if k * n >= 1 << 15 {
            bp.par_chunks_mut(k * NR).enumerate().for_each(|(p, out)| {
                let mut tmp = Vec::new();
                pack_b_panel(b, k, n, p, out, &mut tmp);
            });
        } else {
            let mut tmp = Vec::new();
            for (p, out) in bp.chunks_mut(k * NR).enumerate() {
                pack_b_panel(b, k, n, p, out, &mut tmp);
            }
        }
        let bp: &[f32] = bp;
        let promo = promo.as_ref();
        let task = |t: usize| {
            let c = cp;
            let (ib, jb) = (t / nb, t % nb);
            let i0 = ib * mc;
            let rows = mc.min(m - i0);
            let (p0, p1) = (jb * ppb, ((jb + 1) * ppb).min(np));
            ABLOCK.with(|ab| {
                let Ok(mut ab) = ab.try_borrow_mut() else {
                    unreachable!("kernel512: nested task on one thread")
                };
                let abuf = ab.get(MC * KC);
                let mut k0 = 0;
                let mut ci = 0;
                while k0 < k {
                    let kc = chunk.min(k - k0);
                    pack_a_block(a, i0, rows, k0, kc, rowmajor, abuf);
                    for p in p0..p1 {
                        let j0 = p * NR;
                        let w = NR.min(n - j0);
                        let (m0, m1) = (mask16(w), mask16(w.saturating_sub(16)));
                        let bpanel = bp.as_ptr().add(p * k * NR + k0 * NR);
                        for ip in 0..rows.div_ceil(MR) {
                            let r0 = ip * MR;
                            let mr = MR.min(rows - r0);
                            let tile = Tile {
                                c: c.0.add((i0 + r0) * n + j0),
                                ldc: n,
                                mr,
                                m0,
                                m1,
                            };
                            let epi = match promo {
                                Some(pr) => Epi::Promote {
                                    sa: pr.sa.as_ptr().add(ci * m + i0 + r0),
                                    sb: pr.sb.as_ptr().add(ci * npd + j0),
                                    fresh: ci == 0 && !accumulate,
                                },
                                None if ci == 0 && !accumulate => Epi::Set,
                                None => Epi::Add,
                            };
                            let ap = abuf.as_ptr().add(r0 * KC);
                            if rowmajor {
                                micro_rm(kc, ap, bpanel, tile, epi);
                            } else {
                                micro_pk(kc, ap, bpanel, tile, epi);
                            }
                        }
                    }
                    k0 += kc;
                    ci += 1;
                }
                if output_bf16 {
                    round_bf16_rows(c.0.add(i0 * n), n, rows, p0 * NR, (p1 * NR).min(n));
                }
            });
        };
        if mb * nb == 1 || m * n * k < 1 << 15 {
            (0..mb * nb).for_each(task);
        } else {
            (0..mb * nb).into_par_iter().for_each(task);
        }
    }
    BPACK.with(|s| {
        let mut slot = s.borrow_mut();
        if slot.buf.len() < bpk.buf.len() {
            *slot = bpk;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code of both formats, in every lane, decodes as `fp8::decode_slice` does (bit for bit,
    /// NaNs included); lanes outside the mask read code 0.
    #[test]
    fn decode16_equals_decode_slice() {
        if !available() {
            return;
        }
        for f in [Fp8Format::E4M3, Fp8Format::E5M2] {
            let codes: Vec<u8> = (0..=255u8).collect();
            let mut want = vec![0f32; 256];
            decode_slice(&codes, f, &mut want);
            for start in (0..256).step_by(16) {
                for w in [16, 12, 1] {
                    let mut got = [0f32; 16];
                    unsafe {
                        let v = decode16(codes.as_ptr().add(start), mask16(w), f);
                        _mm512_storeu_ps(got.as_mut_ptr(), v);
                    }
                    for l in 0..16 {
                        let expect = if l < w { want[start + l].to_bits() } else { 0 };
                        assert_eq!(
                            got[l].to_bits(),
                            expect,
                            "{f:?} code {} width {w}",
                            start + l
                        );
                    }
                }
            }
        }
    }
}
