//! Run-time SIMD detection. Kernels pick their inner loops from this once per call.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    Scalar,
    Neon,
    Avx2Fma,
    Avx512,
}

impl SimdLevel {
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Neon => "neon",
            SimdLevel::Avx2Fma => "avx2+fma",
            SimdLevel::Avx512 => "avx512f",
        }
    }
}

/// The widest instruction set this CPU supports that we have kernels for.
/// `MOE8_SIMD=scalar` forces the scalar fallback (used by tests to cover that path);
/// `MOE8_SIMD=avx2` stops at AVX2+FMA, so an AVX-512 machine runs (and measures) a laptop's
/// kernels (the `gemm` crate's f32 micro-kernels still pick their own width).
pub fn detect() -> SimdLevel {
    let forced = std::env::var("MOE8_SIMD").unwrap_or_default();
    if forced == "scalar" {
        return SimdLevel::Scalar;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if forced != "avx2"
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("fma")
        {
            return SimdLevel::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return SimdLevel::Avx2Fma;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            return SimdLevel::Neon;
        }
    }
    SimdLevel::Scalar
}
