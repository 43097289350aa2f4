//! FP8 (E4M3 OCP `e4m3fn`, E5M2) and BF16 codecs, bit for bit as CUDA converts
//! (docs/numerics.md, formats).
//!
//! Encoding works on the f32 bits, never through float arithmetic, so that a tie can never be
//! rounded twice. Conventions shared with `@moe8/fp8-core` (the TypeScript reference):
//! - round to nearest, ties to even; subnormals kept; +-0 and underflow keep their sign;
//! - FP8 saturates (`__NV_SATFINITE`): beyond the largest finite value, infinities too, gives +-max;
//! - a NaN of either sign encodes to 0x7f in both FP8 formats (CUDA canonicalises the NaN first,
//!   so the sign is dropped), and to 0x7fff in BF16.

/// An FP8 format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Format {
    E4M3,
    E5M2,
}

/// The code every NaN encodes to, in both formats.
pub const NAN_CODE: u8 = 0x7f;

impl Fp8Format {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "e4m3" => Ok(Fp8Format::E4M3),
            "e5m2" => Ok(Fp8Format::E5M2),
            _ => Err(format!("unknown FP8 format \"{s}\" (allowed: e4m3, e5m2)")),
        }
    }
    /// Largest finite value (FMAX in the scaling formulas of docs/numerics.md).
    pub fn max(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 448.0,
            Fp8Format::E5M2 => 57344.0,
        }
    }
    fn man(self) -> u32 {
        match self {
            Fp8Format::E4M3 => 3,
            Fp8Format::E5M2 => 2,
        }
    }
    fn bias(self) -> i32 {
        match self {
            Fp8Format::E4M3 => 7,
            Fp8Format::E5M2 => 15,
        }
    }
    /// Code of +max: the saturation target (E4M3's 0x7f is NaN, E5M2's 0x7c is inf).
    #[cfg(test)]
    fn max_code(self) -> u32 {
        match self {
            Fp8Format::E4M3 => 0x7e,
            Fp8Format::E5M2 => 0x7b,
        }
    }
    /// The 256-entry decode table (exact: every FP8 value is an f32).
    pub fn table(self) -> &'static [f32; 256] {
        match self {
            Fp8Format::E4M3 => &TABLES.0,
            Fp8Format::E5M2 => &TABLES.1,
        }
    }
}

/// Encodes one f32 (RNE, saturating, NaN to 0x7f).
#[inline(always)]
pub fn encode(x: f32, f: Fp8Format) -> u8 {
    match f {
        Fp8Format::E4M3 => encode_e4m3(x),
        Fp8Format::E5M2 => encode_e5m2(x),
    }
}

#[inline(always)]
pub fn encode_e4m3(x: f32) -> u8 {
    enc::<3, 7, 0x7e>(x)
}

#[inline(always)]
pub fn encode_e5m2(x: f32) -> u8 {
    enc::<2, 15, 0x7b>(x)
}

/// The encoder of a format with `MAN` mantissa bits, exponent bias `BIAS` and saturation code
/// `MAXC`, written as selects only (no branches, no float-to-int conversions) so that loops over it
/// vectorise.
///
/// - Normal range (|x| >= 2^(1-bias)): integer round-to-nearest-even of the f32 bits at the FP8
///   mantissa position (`a + (half - 1) + lsb`), then the exponent re-bias. A carry out of the
///   mantissa bumps the exponent, which is exactly the encoding of the next binade's first value.
/// - Subnormal range: the code is |x| / 2^(1-bias-man) rounded to an integer; the product is exact
///   (a power-of-two scaling of a normal f32 to below 2^man) and adding 1.5 * 2^23 rounds it to
///   the nearest integer, ties to even, in one f32 rounding. f32 subnormal inputs are flushed to
///   zero first (they are far below half the smallest FP8 subnormal, and slow in f32 arithmetic).
/// - Saturation to +-max (infinities too), NaN of either sign to 0x7f, the sign of zeros kept.
#[inline(always)]
fn enc<const MAN: u32, const BIAS: u32, const MAXC: u32>(x: f32) -> u8 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let bits = x.to_bits();
    let sign = (bits >> 24) & 0x80;
    let a = bits & 0x7fff_ffff;
    let shift = 23 - MAN;
    let r = a.wrapping_add(((1u32 << (shift - 1)) - 1) + ((a >> shift) & 1));
    let normal = (r >> shift).wrapping_sub((127 - BIAS) << MAN);
    let min_normal = (128 - BIAS) << 23;
    let af = f32::from_bits(if a < 0x0080_0000 { 0 } else { a });
    // 2^(bias - 1 + man), built from its bits.
    let k = f32::from_bits((127 + BIAS - 1 + MAN) << 23);
    let sub = (af * k + MAGIC).to_bits().wrapping_sub(0x4b40_0000);
    let code = if a >= min_normal { normal } else { sub };
    let code = code.min(MAXC);
    let code = if a > 0x7f80_0000 {
        NAN_CODE as u32
    } else {
        code | sign
    };
    code as u8
}

/// Encodes `x` into `q` (the shorter length of the two), vectorised.
pub fn encode_slice(x: &[f32], f: Fp8Format, q: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            return unsafe { encode_slice_avx512(x, f, q) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return unsafe { encode_slice_avx2(x, f, q) };
        }
    }
    encode_slice_generic(x, f, q)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
unsafe fn encode_slice_avx512(x: &[f32], f: Fp8Format, q: &mut [u8]) {
    encode_slice_generic(x, f, q)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn encode_slice_avx2(x: &[f32], f: Fp8Format, q: &mut [u8]) {
    encode_slice_generic(x, f, q)
}

#[inline(always)]
fn encode_slice_generic(x: &[f32], f: Fp8Format, q: &mut [u8]) {
    match f {
        Fp8Format::E4M3 => q.iter_mut().zip(x).for_each(|(o, &v)| *o = encode_e4m3(v)),
        Fp8Format::E5M2 => q.iter_mut().zip(x).for_each(|(o, &v)| *o = encode_e5m2(v)),
    }
}

/// The straightforward branchy encoder the vectorisable one replaced (kept as a test oracle).
#[cfg(test)]
pub fn encode_branchy(x: f32, f: Fp8Format) -> u8 {
    let bits = x.to_bits();
    let sign = (bits >> 24) & 0x80;
    let abs = bits & 0x7fff_ffff;
    if abs > 0x7f80_0000 {
        return NAN_CODE;
    }
    let f32_exp = (abs >> 23) as i32;
    if f32_exp == 0 {
        return sign as u8;
    }
    let man = f.man();
    let min_exp = 1 - f.bias();
    let exp = f32_exp - 127;
    let (mut code, shift, significand) = if exp >= min_exp {
        let shift = 23 - man;
        let s = abs & 0x7f_ffff;
        ((((exp + f.bias()) as u32) << man) | (s >> shift), shift, s)
    } else {
        let shift = 23 - man + (min_exp - exp) as u32;
        if shift >= 25 {
            return sign as u8;
        }
        let s = (abs & 0x7f_ffff) | 0x80_0000;
        (s >> shift, shift, s)
    };
    let rest = significand & ((1u32 << shift) - 1);
    let half = 1u32 << (shift - 1);
    if rest > half || (rest == half && (code & 1) == 1) {
        code += 1;
    }
    code = code.min(f.max_code());
    (code | sign) as u8
}

#[inline(always)]
pub fn decode(q: u8, f: Fp8Format) -> f32 {
    f.table()[q as usize]
}

fn build_table(f: Fp8Format) -> [f32; 256] {
    let man = f.man();
    let exp_max = if f == Fp8Format::E4M3 { 15 } else { 31 };
    let mut t = [0f32; 256];
    for (code, slot) in t.iter_mut().enumerate() {
        let code = code as u32;
        let e = (code >> man) & exp_max;
        let m = code & ((1 << man) - 1);
        let v = if f == Fp8Format::E5M2 && e == exp_max {
            if m == 0 {
                f32::INFINITY
            } else {
                f32::NAN
            }
        } else if f == Fp8Format::E4M3 && e == exp_max && m == (1 << man) - 1 {
            f32::NAN
        } else if e == 0 {
            (m as f64 * 2f64.powi(1 - f.bias() - man as i32)) as f32
        } else {
            f32::from_bits((((e as i32 - f.bias() + 127) as u32) << 23) | (m << (23 - man)))
        };
        *slot = if code & 0x80 != 0 { -v } else { v };
    }
    t
}

static TABLES: std::sync::LazyLock<([f32; 256], [f32; 256])> =
    std::sync::LazyLock::new(|| (build_table(Fp8Format::E4M3), build_table(Fp8Format::E5M2)));

/// BF16 bits of `x`, RNE (`__float2bfloat16_rn`); overflow rounds to inf; NaN -> 0x7fff.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7fff_ffff > 0x7f80_0000 {
        return 0x7fff;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to the nearest BF16 value, as an f32.
#[inline(always)]
pub fn bf16_round(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

/// Rounds a slice to BF16 in place. Written as a plain loop of selects so LLVM vectorises it.
pub fn bf16_round_slice(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = bf16_round(*v);
    }
}

/// Decodes codes into f32 (no scale), the first step of every FP8 GEMM panel.
///
/// Arithmetic instead of a table lookup so that LLVM vectorises it (gather-free): a normal code's
/// bits shifted into an f32's exponent/mantissa position plus the exponent re-bias is the f32; a
/// subnormal code is its integer mantissa times 2^(1 - bias - man) (exact, and computed without
/// touching f32 subnormals, whose arithmetic is very slow on x86). Specials are patched by selects.
pub fn decode_slice(q: &[u8], f: Fp8Format, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return unsafe { decode_avx512(q, f, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return unsafe { decode_avx2(q, f, out) };
        }
    }
    decode_generic(q, f, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn decode_avx512(q: &[u8], f: Fp8Format, out: &mut [f32]) {
    decode_generic(q, f, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_avx2(q: &[u8], f: Fp8Format, out: &mut [f32]) {
    decode_generic(q, f, out)
}

#[inline(always)]
fn decode_generic(q: &[u8], f: Fp8Format, out: &mut [f32]) {
    match f {
        Fp8Format::E4M3 => {
            for (o, &c) in out.iter_mut().zip(q) {
                let (c, sign) = (c as u32 & 0x7f, (c as u32 & 0x80) << 24);
                let sub = (c as f32 * (1.0 / 512.0)).to_bits(); // m * 2^-9
                let v = if c < 8 { sub } else { (c << 20) + (120 << 23) };
                let v = if c == 0x7f { 0x7fc0_0000 } else { v };
                *o = f32::from_bits(v | sign);
            }
        }
        Fp8Format::E5M2 => {
            for (o, &c) in out.iter_mut().zip(q) {
                let (c, sign) = (c as u32 & 0x7f, (c as u32 & 0x80) << 24);
                let sub = (c as f32 * (1.0 / 65536.0)).to_bits(); // m * 2^-16
                let v = if c < 4 { sub } else { (c << 21) + (112 << 23) };
                let v = if c > 0x7c {
                    0x7fc0_0000
                } else if c == 0x7c {
                    0x7f80_0000
                } else {
                    v
                };
                *o = f32::from_bits(v | sign);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slow reference: the nearest finite FP8 value by exhaustive search, ties to the even code,
    /// saturating; compared in f64 where every f32 and FP8 value and midpoint is exact.
    fn encode_ref(x: f32, f: Fp8Format) -> u8 {
        if x.is_nan() {
            return NAN_CODE;
        }
        let t = f.table();
        let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
        let a = (x as f64).abs();
        if a >= f.max() as f64 {
            return f.max_code() as u8 | sign; // saturation (far values would tie in f64 below)
        }
        let mut best = 0u8;
        let mut best_d = f64::INFINITY;
        for c in 0..=(f.max_code() as u8) {
            let d = (t[c as usize] as f64 - a).abs();
            if d < best_d || (d == best_d && c & 1 == 0) {
                best = c;
                best_d = d;
            }
        }
        best | sign
    }

    #[test]
    fn decode_all_codes() {
        for f in [Fp8Format::E4M3, Fp8Format::E5M2] {
            for c in 0..=255u8 {
                let v = decode(c, f);
                let nan = match f {
                    Fp8Format::E4M3 => c & 0x7f == 0x7f,
                    Fp8Format::E5M2 => c & 0x7f > 0x7c,
                };
                assert_eq!(v.is_nan(), nan, "{f:?} {c:#x}");
                if !v.is_nan() {
                    assert_eq!(v.is_sign_negative(), c & 0x80 != 0);
                    // Every non-NaN value encodes back to its own code.
                    let expect = if f == Fp8Format::E5M2 && c & 0x7f == 0x7c {
                        0x7b | (c & 0x80)
                    } else {
                        c
                    };
                    assert_eq!(encode(v, f), expect, "{f:?} {c:#x} {v}");
                }
            }
        }
        assert_eq!(decode(0x7e, Fp8Format::E4M3), 448.0);
        assert_eq!(decode(0x01, Fp8Format::E4M3), 2f32.powi(-9));
        assert_eq!(decode(0x7b, Fp8Format::E5M2), 57344.0);
        assert_eq!(decode(0x01, Fp8Format::E5M2), 2f32.powi(-16));
        assert_eq!(decode(0xfc, Fp8Format::E5M2), f32::NEG_INFINITY);
    }

    #[test]
    fn encode_matches_reference() {
        let mut s = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for f in [Fp8Format::E4M3, Fp8Format::E5M2] {
            // Random bit patterns (all exponents), random values near the FP8 range, midpoints.
            for i in 0..200_000 {
                let r = next();
                let x = match i % 3 {
                    0 => f32::from_bits(r as u32),
                    1 => {
                        ((r >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * f.max() * 1.2
                    }
                    _ => {
                        let t = f.table();
                        let c = (r % 0x7b) as usize;
                        let mid = (t[c] as f64 + t[c + 1] as f64) / 2.0;
                        (if r & 1 << 40 != 0 { -mid } else { mid }) as f32
                    }
                };
                assert_eq!(
                    encode(x, f),
                    encode_ref(x, f),
                    "{f:?} {x:e} bits {:#x}",
                    x.to_bits()
                );
            }
            for x in [
                0.0f32,
                -0.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
                -f32::NAN,
                1e-40,
                -1e-40,
                1e30,
            ] {
                assert_eq!(encode(x, f), encode_ref(x, f), "{f:?} {x}");
            }
        }
        assert_eq!(encode(f32::INFINITY, Fp8Format::E4M3), 0x7e);
        assert_eq!(encode(-f32::NAN, Fp8Format::E5M2), 0x7f);
        assert_eq!(encode(464.0, Fp8Format::E4M3), 0x7e); // tie above max saturates
    }

    /// Every third f32 bit pattern (every 4099th in debug builds; all of them pass too) against the
    /// branchy encoder,
    /// through the vectorised slice encoder.
    #[test]
    fn encode_matches_branchy_exhaustively() {
        use rayon::prelude::*;
        let step: u64 = if cfg!(debug_assertions) { 4099 } else { 3 };
        for f in [Fp8Format::E4M3, Fp8Format::E5M2] {
            (0u64..1 << 16).into_par_iter().for_each(|hi| {
                let x: Vec<f32> = (0u64..1 << 16)
                    .map(|lo| (hi << 16) | lo)
                    .filter(|b| b % step == 0)
                    .map(|b| f32::from_bits(b as u32))
                    .collect();
                let mut q = vec![0u8; x.len()];
                encode_slice(&x, f, &mut q);
                for (&v, &c) in x.iter().zip(&q) {
                    assert_eq!(c, encode_branchy(v, f), "{f:?} bits {:#x}", v.to_bits());
                    assert_eq!(encode(v, f), c);
                }
            });
        }
    }

    #[test]
    fn vector_decode_matches_table() {
        for f in [Fp8Format::E4M3, Fp8Format::E5M2] {
            let q: Vec<u8> = (0..1000).map(|i| (i * 37 % 256) as u8).collect();
            let mut out = vec![0f32; q.len()];
            decode_slice(&q, f, &mut out);
            for (&c, &v) in q.iter().zip(&out) {
                let t = decode(c, f);
                assert_eq!(v.to_bits(), t.to_bits(), "{f:?} {c:#x} {v} {t}");
            }
        }
    }

    #[test]
    fn bf16_rounding() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80); // tie to even (down)
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82); // tie to even (up)
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(bf16_bits(f32::MAX), 0x7f80); // overflow to inf
        assert_eq!(bf16_bits(f32::NEG_INFINITY), 0xff80);
        assert_eq!(bf16_bits(f32::NAN), 0x7fff);
    }
}
