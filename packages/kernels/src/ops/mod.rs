//! Native kernels for every non-GEMM op of the Backend interface (packages/tensor/src/backend.ts),
//! reproducing the `ts` reference backend. Outputs are preallocated by the caller (the CpuBackend
//! in TypeScript) and written in place; inputs are borrowed typed arrays, never copied.
//!
//! Every kernel is deterministic: parallel work is split into fixed blocks and partial sums are
//! combined in a fixed order, so repeated runs are bit-identical, whatever the thread count.

pub mod util;

pub mod attention;
pub mod dequant;
pub mod elementwise;
pub mod moe;
pub mod napi;
pub mod napi_moe;
pub mod nn;
pub mod optim;
#[cfg(test)]
mod tests;
pub mod tiles;
