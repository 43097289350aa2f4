//! napi bindings of the CUDA side. The TypeScript `CudaBackend` owns the op logic (shapes, grid
//! sizes, which kernel); these functions are the primitives it needs: device buffers, copies,
//! kernel launches on the one stream, and cuBLASLt GEMMs. Every function returns a JS error (never
//! panics) when CUDA is unavailable, naming the reason.

use super::{alloc, device, gemm, graph, nvrtc, tma};
use cudarc::driver::sys as cu;
use napi::bindgen_prelude::{Buffer, Uint8ArraySlice};
use napi::{Error, Result, Status};
use napi_derive::napi;

fn e(msg: String) -> Error {
    Error::new(Status::GenericFailure, msg)
}

fn ck(r: cu::CUresult, what: &str) -> Result<()> {
    super::ck(r, what).map_err(e)
}

/// What `cudaInfo()` reports: whether the backend can run here and, if so, on what.
#[napi(object)]
pub struct CudaInfo {
    pub available: bool,
    /// Why it is not available (null when it is).
    pub reason: Option<String>,
    pub name: Option<String>,
    pub total_memory: Option<f64>,
    /// e.g. "9.0".
    pub compute_capability: Option<String>,
    /// The NVRTC target, e.g. "sm_90a".
    pub arch: Option<String>,
    pub multiprocessors: Option<u32>,
    /// The driver's CUDA version, e.g. "13.0".
    pub driver_version: Option<String>,
    /// NVRTC's version (the CUDA toolkit version of the run-time compiler), e.g. "13.0".
    pub nvrtc_version: Option<String>,
    /// cuBLASLt's version, e.g. "13.0.0".
    pub cublas_lt_version: Option<String>,
    /// CUDA devices on this machine, and the one this process runs on (MOE8_CUDA_DEVICE).
    pub device_count: Option<u32>,
    pub device: Option<u32>,
}

#[napi]
pub fn cuda_info() -> CudaInfo {
    let mut info = CudaInfo {
        available: false,
        reason: None,
        name: None,
        total_memory: None,
        compute_capability: None,
        arch: None,
        multiprocessors: None,
        driver_version: None,
        nvrtc_version: None,
        cublas_lt_version: None,
        device_count: None,
        device: None,
    };
    let d = match device() {
        Ok(d) => d,
        Err(r) => {
            info.reason = Some(r);
            return info;
        }
    };
    info.name = Some(d.name.clone());
    info.device_count = Some(d.count as u32);
    info.device = Some(d.ordinal as u32);
    info.total_memory = Some(d.total_memory as f64);
    info.compute_capability = Some(format!("{}.{}", d.cc_major, d.cc_minor));
    info.arch = nvrtc::arch().ok();
    info.multiprocessors = Some(d.sm_count as u32);
    info.driver_version = Some(format!(
        "{}.{}",
        d.driver_version / 1000,
        (d.driver_version % 1000) / 10
    ));
    let mut missing = Vec::new();
    match super::nvrtc_version() {
        Ok((a, b)) => info.nvrtc_version = Some(format!("{a}.{b}")),
        Err(r) => missing.push(r),
    }
    match super::cublaslt_version() {
        Ok(v) => {
            info.cublas_lt_version = Some(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
        }
        Err(r) => missing.push(r),
    }
    if missing.is_empty() {
        info.available = true;
    } else {
        info.reason = Some(missing.join("; "));
    }
    info
}

#[napi(object)]
pub struct CudaMemStats {
    /// Bytes in live device buffers (rounded to their size classes).
    pub allocated: f64,
    /// The most `allocated` has been since the start (or the last `cudaResetPeak`).
    pub peak: f64,
    /// Bytes held in the allocator's free lists.
    pub cached: f64,
    /// Bytes obtained from the driver (allocated + cached).
    pub reserved: f64,
    pub allocs: f64,
    /// Allocations served from the cache.
    pub hits: f64,
}

#[napi]
pub fn cuda_mem_stats() -> CudaMemStats {
    let s = alloc::stats();
    CudaMemStats {
        allocated: s.allocated as f64,
        peak: s.peak as f64,
        cached: s.cached as f64,
        reserved: s.reserved as f64,
        allocs: s.allocs as f64,
        hits: s.hits as f64,
    }
}

#[napi]
pub fn cuda_reset_peak() {
    alloc::reset_peak();
}

/// Returns the allocator's cached blocks to the driver.
#[napi]
pub fn cuda_empty_cache() -> Result<()> {
    alloc::empty_cache().map_err(e)
}

/// Waits for all work enqueued on the backend's stream.
#[napi]
pub fn cuda_synchronize() -> Result<()> {
    super::synchronize().map_err(e)
}

/// Starts (true) or stops (false) timing every kernel launch with CUDA events (see timer.rs);
/// `graph`: as external events, so that a CUDA graph captured meanwhile is timed at each replay.
#[napi]
pub fn cuda_kernel_timing(on: bool, graph: Option<bool>) -> Result<()> {
    super::timer::enable(on, graph.unwrap_or(false)).map_err(e)
}

/// GPU time per kernel since timing started or was last read.
#[napi(object)]
pub struct KernelTime {
    pub name: String,
    pub ms: f64,
    pub launches: u32,
}

/// Per-kernel times and the span of the timed launches (first start to last end), in ms. Waits
/// for the stream and clears the record, unless `keep` (a timed graph's events, for its next replay).
#[napi(object)]
pub struct KernelTimes {
    pub kernels: Vec<KernelTime>,
    pub span_ms: f64,
}

#[napi]
pub fn cuda_kernel_times(keep: Option<bool>) -> Result<KernelTimes> {
    let (rows, span) = super::timer::read(keep.unwrap_or(false)).map_err(e)?;
    Ok(KernelTimes {
        kernels: rows
            .into_iter()
            .map(|(name, ms, launches)| KernelTime { name, ms, launches })
            .collect(),
        span_ms: span,
    })
}

/// Device memory from the caching allocator. Freed by `free()` (the backend calls it when a
/// tensor is released); dropping an unfreed buffer (garbage collection) also returns it.
#[napi]
pub struct DeviceBuffer {
    ptr: u64,
    bytes: u64,
    class: usize,
}

#[napi]
impl DeviceBuffer {
    #[napi(constructor)]
    pub fn new(bytes: f64) -> Result<Self> {
        if bytes.is_nan() || bytes < 0.0 || bytes.fract() != 0.0 {
            return Err(e(format!("DeviceBuffer: bad size {bytes}")));
        }
        let class = alloc::size_class(bytes as usize);
        let ptr = alloc::alloc(class).map_err(e)?;
        if ptr >= 1 << 53 {
            return Err(e("DeviceBuffer: device address beyond 2^53".into()));
        }
        Ok(DeviceBuffer {
            ptr,
            bytes: bytes as u64,
            class,
        })
    }

    /// The device address (exact: below 2^53).
    #[napi(getter)]
    pub fn ptr(&self) -> f64 {
        self.ptr as f64
    }

    #[napi(getter)]
    pub fn bytes(&self) -> f64 {
        self.bytes as f64
    }

    #[napi(getter)]
    pub fn freed(&self) -> bool {
        self.class == usize::MAX
    }

    /// Gives the memory back to the allocator (stream-ordered). Safe to call twice.
    #[napi]
    pub fn free(&mut self) -> Result<()> {
        if self.class == usize::MAX {
            return Ok(());
        }
        let (p, c) = (self.ptr, self.class);
        self.class = usize::MAX;
        self.ptr = 0;
        alloc::free(p, c).map_err(e)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let _ = self.free();
    }
}

fn range(buf: &DeviceBuffer, offset: f64, bytes: usize, what: &str) -> Result<u64> {
    if buf.class == usize::MAX {
        return Err(e(format!("{what}: use of a freed device buffer")));
    }
    let off = offset as u64;
    if offset < 0.0 || off + bytes as u64 > buf.bytes {
        return Err(e(format!(
            "{what}: {bytes} bytes at offset {off} outside a buffer of {} bytes",
            buf.bytes
        )));
    }
    Ok(buf.ptr + off)
}

/// Host to device copy (stream-ordered; the host memory may be reused once this returns).
#[napi]
pub fn cuda_htod(buf: &DeviceBuffer, offset: f64, data: &[u8]) -> Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let d = device().map_err(e)?;
    let p = range(buf, offset, data.len(), "cudaHtoD")?;
    // Pageable source: the driver stages it before returning, so this is safe without a sync.
    ck(
        unsafe {
            cu::cuMemcpyHtoDAsync_v2(
                p,
                data.as_ptr() as *const std::ffi::c_void,
                data.len(),
                d.stream,
            )
        },
        "cuMemcpyHtoDAsync",
    )
}

/// Device to host copy into `out`; waits for the stream (the host needs the values).
#[napi]
pub fn cuda_dtoh(buf: &DeviceBuffer, offset: f64, mut out: Uint8ArraySlice) -> Result<()> {
    let out = unsafe { out.as_mut() };
    let d = device().map_err(e)?;
    if out.is_empty() {
        return super::synchronize().map_err(e);
    }
    let p = range(buf, offset, out.len(), "cudaDtoH")?;
    ck(
        unsafe {
            cu::cuMemcpyDtoHAsync_v2(
                out.as_mut_ptr() as *mut std::ffi::c_void,
                p,
                out.len(),
                d.stream,
            )
        },
        "cuMemcpyDtoHAsync",
    )?;
    ck(
        unsafe { cu::cuStreamSynchronize(d.stream) },
        "cuStreamSynchronize",
    )
}

/// Device to device copy (stream-ordered).
#[napi]
pub fn cuda_dtod(
    dst: &DeviceBuffer,
    dst_offset: f64,
    src: &DeviceBuffer,
    src_offset: f64,
    bytes: f64,
) -> Result<()> {
    let n = bytes as usize;
    if n == 0 {
        return Ok(());
    }
    let d = device().map_err(e)?;
    let pd = range(dst, dst_offset, n, "cudaDtoD")?;
    let ps = range(src, src_offset, n, "cudaDtoD")?;
    ck(
        unsafe { cu::cuMemcpyDtoDAsync_v2(pd, ps, n, d.stream) },
        "cuMemcpyDtoDAsync",
    )
}

/// Sets `count` 32-bit words from `offset` to `value` (its bits; stream-ordered).
#[napi]
pub fn cuda_memset32(buf: &DeviceBuffer, offset: f64, value: u32, count: f64) -> Result<()> {
    let n = count as usize;
    if n == 0 {
        return Ok(());
    }
    let d = device().map_err(e)?;
    let p = range(buf, offset, n * 4, "cudaMemset32")?;
    if !p.is_multiple_of(4) {
        return Err(e("cudaMemset32: unaligned offset".into()));
    }
    ck(
        unsafe { cu::cuMemsetD32Async(p, value, n, d.stream) },
        "cuMemsetD32Async",
    )
}

/// Sets `bytes` bytes from `offset` to `value` (stream-ordered).
#[napi]
pub fn cuda_memset8(buf: &DeviceBuffer, offset: f64, value: u32, bytes: f64) -> Result<()> {
    let n = bytes as usize;
    if n == 0 {
        return Ok(());
    }
    let d = device().map_err(e)?;
    let p = range(buf, offset, n, "cudaMemset8")?;
    ck(
        unsafe { cu::cuMemsetD8Async(p, value as u8, n, d.stream) },
        "cuMemsetD8Async",
    )
}

/// The id of a kernel (compiled with NVRTC and loaded on first use).
#[napi]
pub fn cuda_kernel(module: String, name: String) -> Result<u32> {
    nvrtc::function(&module, &name).map_err(e)
}

/// Launches kernel `id` on the stream. `args`: one 8-byte little-endian slot per parameter, or,
/// with `offsets`, each parameter's bytes from its offset (a 128-byte tensor map, 64-aligned).
#[napi]
// A napi boundary whose positional signature the typed TypeScript launches call (grid, block,
// shared memory and argument bytes, as cuLaunchKernel takes them); kept as is for those callers.
#[allow(clippy::too_many_arguments)]
pub fn cuda_launch(
    id: u32,
    gx: u32,
    gy: u32,
    gz: u32,
    bx: u32,
    by: u32,
    bz: u32,
    shared: u32,
    args: &[u8],
    offsets: Option<Vec<u32>>,
) -> Result<()> {
    nvrtc::launch(
        id,
        [gx, gy, gz],
        [bx, by, bz],
        shared,
        args,
        offsets.as_deref(),
    )
    .map_err(e)
}

/// The 128 bytes of a TMA tensor map (cuTensorMapEncodeTiled) for a row-major `[rows, inner]`
/// tensor of `elem` ("u8" FP8 codes, "bf16" or "f32") at device address `ptr`, copied in boxes of
/// `boxInner x boxRows` elements with the `swizzle`-byte swizzle (128 unless given; 64): a by-value
/// kernel argument of the Hopper kernels (gemm_sm90.cu, flash_sm90.cu).
#[napi]
pub fn cuda_tensor_map_2d(
    ptr: f64,
    elem: String,
    inner: f64,
    rows: f64,
    box_inner: u32,
    box_rows: u32,
    swizzle: Option<u32>,
) -> Result<Buffer> {
    let m = tma::Map2d {
        ptr: ptr as u64,
        elem: tma::MapElem::parse(&elem).map_err(e)?,
        inner: inner as u64,
        rows: rows as u64,
        box_inner,
        box_rows,
        swizzle: swizzle.unwrap_or(128),
    };
    Ok(tma::encode_2d(&m).map_err(e)?.to_vec().into())
}

/// The full CUDA C++ text NVRTC compiles for a module and the options, for the CI check.
#[napi]
pub fn cuda_kernel_sources() -> Vec<String> {
    nvrtc::SOURCES.iter().map(|(n, _)| n.to_string()).collect()
}

/// C[M,N] (row-major; c_type "f32", or "bf16" without accumulate: the product rounded to BF16 by
/// cuBLASLt's epilogue) = op(A) op(B) (+= with accumulate) through cuBLASLt. Pointers are
/// device addresses (numbers); types "f32" | "bf16" | "e4m3" | "e5m2"; scale modes "none" |
/// "scalar" | "vec128" | "blk128" (see gemm.rs for the layouts). Throws with
/// CUBLAS_STATUS_NOT_SUPPORTED in the message when cuBLASLt has no kernel for the case.
#[napi]
// A napi boundary mirroring the cuBLASLt call's argument list; the cuda backend's TypeScript calls
// it positionally, so its JavaScript signature stays as is.
#[allow(clippy::too_many_arguments)]
pub fn cuda_gemm_lt(
    a: f64,
    a_type: String,
    trans_a: bool,
    a_scale: f64,
    a_scale_mode: String,
    b: f64,
    b_type: String,
    trans_b: bool,
    b_scale: f64,
    b_scale_mode: String,
    c: f64,
    c_type: String,
    m: u32,
    n: u32,
    k: u32,
    accumulate: bool,
) -> Result<()> {
    let op = |p: f64, t: &str, tr: bool, s: f64, sm: &str| -> Result<gemm::Operand> {
        Ok(gemm::Operand {
            ptr: p as u64,
            elem: gemm::Elem::parse(t).map_err(e)?,
            trans: tr,
            scale: s as u64,
            scale_mode: gemm::ScaleMode::parse(sm).map_err(e)?,
        })
    };
    let oa = op(a, &a_type, trans_a, a_scale, &a_scale_mode)?;
    let ob = op(b, &b_type, trans_b, b_scale, &b_scale_mode)?;
    let c_elem = gemm::Elem::parse(&c_type).map_err(e)?;
    gemm::matmul(
        &oa, &ob, c as u64, c_elem, m as usize, n as usize, k as usize, accumulate,
    )
    .map_err(e)
}

/// Starts recording the stream's work into a CUDA graph (graph.rs); nothing enqueued until
/// `cudaCaptureEnd` runs.
#[napi]
pub fn cuda_capture_begin() -> Result<()> {
    graph::begin().map_err(e)
}

/// Ends the recording: the graph, ready to replay.
#[napi]
pub fn cuda_capture_end() -> Result<CudaGraph> {
    Ok(CudaGraph {
        inner: Some(graph::end().map_err(e)?),
    })
}

/// Discards a recording the host abandoned.
#[napi]
pub fn cuda_capture_abort() {
    graph::abort()
}

/// A recorded stream of work; `launch` replays it on the stream.
#[napi]
pub struct CudaGraph {
    inner: Option<graph::Graph>,
}

#[napi]
impl CudaGraph {
    fn live(&self) -> Result<&graph::Graph> {
        self.inner
            .as_ref()
            .ok_or_else(|| e("CUDA graph: used after free()".into()))
    }

    #[napi]
    pub fn launch(&self) -> Result<()> {
        self.live()?.launch().map_err(e)
    }

    /// Operations recorded.
    #[napi(getter)]
    pub fn nodes(&self) -> Result<u32> {
        Ok(self.live()?.nodes() as u32)
    }

    /// Device blocks its work uses.
    #[napi(getter)]
    pub fn blocks(&self) -> Result<u32> {
        Ok(self.live()?.blocks() as u32)
    }

    /// Of those, the blocks held now by tensors made outside the graph (a replay needs 0).
    #[napi(getter)]
    pub fn borrowed(&self) -> Result<u32> {
        Ok(self.live()?.borrowed() as u32)
    }

    /// Destroys the graph (stream-ordered; safe to call twice).
    #[napi]
    pub fn free(&mut self) {
        self.inner = None;
    }
}
