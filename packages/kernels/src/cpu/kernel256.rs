//! The AVX2+FMA GEMM of the BF16 and FP8 precisions, for CPUs without AVX-512 (most laptops): the
//! design of `kernel512` at half the vector width. Packed B micro-panels, per-task A blocks, a 6x16
//! register-tiled micro-kernel (12 ymm accumulators), and the BF16 rounding or FP8 decoding fused
//! into the packing, so no operand is converted twice and no whole-operand copy is made (the
//! fallback in `gemm` decodes both operands into scratch and re-packs them per promotion chunk).
//!
//! The arithmetic is `kernel512`'s lane for lane: per element one FMA chain along K in the same
//! order, the same K chunks (the accumulator goes back through C between chunks) and the same FP8
//! promotion `c + (p * sa) * sb`. So both kernels give the same bits, whatever the thread count
//! (`test/cpu-determinism.test.ts` compares them).

use super::fp8::bf16_round;
use super::gemm::{Mnk, Output};
use super::kernel512::{Aligned, Promotion, Src};
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Micro-tile: MR rows of C by NR columns (two ymm vectors).
pub const MR: usize = 6;
pub const NR: usize = 16;
/// Rows of C per task (a multiple of MR).
const MC: usize = 96;
/// K chunk of the BF16 GEMM and the largest FP8 promotion interval handled here; also the row
/// stride of the row-major A blocks. The same as `kernel512::KC`, so the sums are the same.
pub const KC: usize = super::kernel512::KC;

/// Whether this path can run: AVX2 and FMA present and the dispatch at AVX2+FMA (a CPU with
/// AVX-512 runs `kernel512` unless `MOE8_SIMD=avx2`).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && crate::simd::detect() == crate::simd::SimdLevel::Avx2Fma
    })
}

/// N rounded up to whole panels (the row length of `Promotion::sb` for this kernel).
pub fn npad(n: usize) -> usize {
    n.div_ceil(NR) * NR
}

thread_local! {
    static BPACK: RefCell<Aligned> = const { RefCell::new(Aligned::new()) };
    static ABLOCK: RefCell<Aligned> = const { RefCell::new(Aligned::new()) };
}

/// Packs op(B) [K, N] into NR-wide panels `bp[p][k][NR]` (zero beyond N).
#[target_feature(enable = "avx2,fma")]
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
#[target_feature(enable = "avx2,fma")]
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
        // Panels [kc][MR]: op(A)'s MR rows of one k are a run of stride rs in the stored [K, M].
        for (pi, r0) in (0..rpad).step_by(MR).enumerate() {
            let w = MR.min(rows.saturating_sub(r0));
            let panel = &mut out[pi * MR * KC..];
            for kk in 0..kc {
                let o = &mut panel[kk * MR..(kk + 1) * MR];
                let off = (i0 + r0) as isize * rs + (k0 + kk) as isize * cs;
                a.load_run(off, rs, &mut o[..w]);
                o[w..].fill(0.0);
            }
        }
    }
}

/// What the micro-kernel does with its accumulators (as in `kernel512`).
#[derive(Clone, Copy)]
enum Epi {
    Set,
    Add,
    Promote {
        sa: *const f32,
        sb: *const f32,
        fresh: bool,
    },
}

/// The lanes [0, w) of 8 as a maskload/maskstore mask.
#[inline(always)]
unsafe fn mask8(w: usize) -> __m256i {
    let w = w.min(8) as i32;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(w),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// Where a micro-kernel's MR x NR tile of C lies and which of it is stored (the first `mr` rows;
/// the columns of masks m0 and m1, 8 each; `full`: all NR columns, stored without the masks).
#[derive(Clone, Copy)]
struct Tile {
    c: *mut f32,
    ldc: usize,
    mr: usize,
    m0: __m256i,
    m1: __m256i,
    full: bool,
}

// C's loads and stores: plain ones for a whole row of the tile, masked ones at N's edge. (AMD's
// Zen cores run a masked store of 8 floats as microcode, tens of cycles each: with 24 of them per
// tile and K chunk they cost the micro-kernel about a fifth of its time there.)
#[inline(always)]
unsafe fn ld(p: *const f32, m: __m256i, full: bool) -> __m256 {
    if full {
        _mm256_loadu_ps(p)
    } else {
        _mm256_maskload_ps(p, m)
    }
}

#[inline(always)]
unsafe fn st(p: *mut f32, m: __m256i, v: __m256, full: bool) {
    if full {
        _mm256_storeu_ps(p, v)
    } else {
        _mm256_maskstore_ps(p, m, v)
    }
}

/// One MR x NR tile of C from `kc` steps of packed A (`a`) and packed B (`b`).
#[inline(always)]
unsafe fn micro<const ROWMAJOR: bool>(kc: usize, a: *const f32, b: *const f32, t: Tile, epi: Epi) {
    let Tile {
        c,
        ldc,
        mr,
        m0,
        m1,
        full,
    } = t;
    let mut acc0 = [_mm256_setzero_ps(); MR];
    let mut acc1 = [_mm256_setzero_ps(); MR];
    if let Epi::Add = epi {
        for r in 0..MR {
            if r < mr {
                acc0[r] = ld(c.add(r * ldc), m0, full);
                acc1[r] = ld(c.add(r * ldc + 8), m1, full);
            }
        }
    }
    let (mut ap, mut bp) = (a, b);
    for _ in 0..kc {
        let b0 = _mm256_load_ps(bp);
        let b1 = _mm256_load_ps(bp.add(8));
        for r in 0..MR {
            let av = _mm256_broadcast_ss(&*ap.add(if ROWMAJOR { r * KC } else { r }));
            acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
            acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
        }
        ap = ap.add(if ROWMAJOR { 1 } else { MR });
        bp = bp.add(NR);
    }
    match epi {
        Epi::Set | Epi::Add => {
            for r in 0..mr.min(MR) {
                st(c.add(r * ldc), m0, acc0[r], full);
                st(c.add(r * ldc + 8), m1, acc1[r], full);
            }
        }
        Epi::Promote { sa, sb, fresh } => {
            let sb0 = _mm256_loadu_ps(sb);
            let sb1 = _mm256_loadu_ps(sb.add(8));
            for r in 0..mr.min(MR) {
                let s = _mm256_set1_ps(*sa.add(r));
                let (c0, c1) = if fresh {
                    (_mm256_setzero_ps(), _mm256_setzero_ps())
                } else {
                    (
                        ld(c.add(r * ldc), m0, full),
                        ld(c.add(r * ldc + 8), m1, full),
                    )
                };
                let t0 = _mm256_mul_ps(_mm256_mul_ps(acc0[r], s), sb0);
                let t1 = _mm256_mul_ps(_mm256_mul_ps(acc1[r], s), sb1);
                st(c.add(r * ldc), m0, _mm256_add_ps(c0, t0), full);
                st(c.add(r * ldc + 8), m1, _mm256_add_ps(c1, t1), full);
            }
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn micro_rm(kc: usize, a: *const f32, b: *const f32, t: Tile, epi: Epi) {
    micro::<true>(kc, a, b, t, epi)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn micro_pk(kc: usize, a: *const f32, b: *const f32, t: Tile, epi: Epi) {
    micro::<false>(kc, a, b, t, epi)
}

#[derive(Clone, Copy)]
struct CPtr(*mut f32);
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}

/// C[m x n] (row-major, row stride n) (+)= op(A) op(B), as `kernel512::gemm` (whose docs hold);
/// an FP8 `promo` has its column scales padded to this kernel's `npad(n)`.
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
    // Tasks: row blocks of at most MC rows first, then column blocks if M is too short.
    let want = 4 * rayon::current_num_threads();
    let mc = (m.div_ceil(want).div_ceil(MR) * MR).clamp(MR, MC);
    let mb = m.div_ceil(mc);
    let nb = np.min(want.div_ceil(mb)).max(1);
    let ppb = np.div_ceil(nb);
    let nb = np.div_ceil(ppb);
    let rowmajor = a.strides().1 == 1;
    let cp = CPtr(c);
    // The packed B buffer is taken out of its slot while in use (a nested call allocates).
    let mut bpk = BPACK.with(|s| std::mem::replace(&mut *s.borrow_mut(), Aligned::new()));
    {
        let bp = bpk.get(np * k * NR);
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
                    unreachable!("kernel256: nested task on one thread")
                };
                let abuf = ab.get(MC * KC);
                let (mut k0, mut ci) = (0, 0);
                while k0 < k {
                    let kc = chunk.min(k - k0);
                    pack_a_block(a, i0, rows, k0, kc, rowmajor, abuf);
                    for p in p0..p1 {
                        let j0 = p * NR;
                        let w = NR.min(n - j0);
                        let (m0, m1) = (mask8(w), mask8(w.saturating_sub(8)));
                        let bpanel = bp.as_ptr().add(p * k * NR + k0 * NR);
                        for ip in 0..rows.div_ceil(MR) {
                            let r0 = ip * MR;
                            let tile = Tile {
                                c: c.0.add((i0 + r0) * n + j0),
                                ldc: n,
                                mr: MR.min(rows - r0),
                                m0,
                                m1,
                                full: w == NR,
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
                    let (j0, j1) = (p0 * NR, (p1 * NR).min(n));
                    for r in 0..rows {
                        let row =
                            std::slice::from_raw_parts_mut(c.0.add((i0 + r) * n + j0), j1 - j0);
                        row.iter_mut().for_each(|v| *v = bf16_round(*v));
                    }
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
        if slot.capacity() < bpk.capacity() {
            *slot = bpk;
        }
    });
}
