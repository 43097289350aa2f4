//! The native CPU backend: FP8/BF16 codecs, fine-grained quantisation and the GEMMs of every
//! precision (f32 core + BF16/FP8 panels), plain and grouped by expert. `napi` holds the bindings.

pub mod bench;
pub mod fp8;
pub mod gemm;
pub mod grouped;
#[cfg(target_arch = "x86_64")]
pub mod kernel256;
#[cfg(target_arch = "x86_64")]
pub mod kernel512;
pub mod napi;
pub mod quant;
pub mod requant;
pub mod threads;

#[cfg(test)]
mod tests;
