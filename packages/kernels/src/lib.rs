//! @moe8/kernels: the native side of moe8's backends, exposed to JavaScript through napi-rs.

use napi_derive::napi;

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod simd;
pub mod watchdog;

/// What this build of the addon is and what the machine it runs on offers.
#[napi(object)]
pub struct NativeInfo {
    /// Crate version (Cargo.toml).
    pub version: String,
    /// Target triple the addon was compiled for.
    pub target: String,
    /// Widest SIMD instruction set detected at run time and used by the CPU kernels.
    pub simd: String,
    /// Worker threads in the rayon pool used by the CPU backend.
    pub threads: u32,
    /// Whether CUDA support (the `cuda` cargo feature) is compiled in.
    pub cuda_compiled: bool,
}

#[napi]
pub fn info() -> NativeInfo {
    cpu::threads::init_pool();
    NativeInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        target: env!("MOE8_TARGET").to_string(),
        simd: simd::detect().name().to_string(),
        threads: rayon::current_num_threads() as u32,
        cuda_compiled: cfg!(feature = "cuda"),
    }
}
pub mod ops;
