//! The CUDA side of the `cuda` backend: one device, one primary context and one stream for the
//! whole process (every op is stream-ordered on it), reached through cudarc with dynamic loading,
//! so one build of the addon loads and runs with or without a GPU. Every entry point returns an
//! error string (never panics) when libcuda, NVRTC or cuBLASLt are absent.
//!
//! Layout (candle style: each kernel's CUDA C++ source sits next to the host code that launches it):
//! - `mod.rs`    device/context/stream singleton, library discovery, `cudaInfo()`;
//! - `alloc.rs`  caching device allocator (size classes, stream-ordered reuse, stats);
//! - `nvrtc.rs`  NVRTC compilation for the GPU present with an on-disk CUBIN/PTX cache;
//! - `gemm.rs`   cuBLASLt GEMMs (f32, BF16, FP8 with DeepSeek-V3 block scaling);
//! - `graph.rs`  CUDA graphs: a step's work recorded once and replayed as one launch;
//! - `nccl.rs`   NCCL (libnccl.so.2 loaded at run time): the collectives of several GPUs' ranks;
//! - `timer.rs`  GPU time per kernel (CUDA events) for `bench step --profile`;
//! - `tma.rs`    TMA tensor maps (cuTensorMapEncodeTiled) for the Hopper GEMM's by-value arguments;
//! - `napi.rs`   the functions the TypeScript `CudaBackend` calls (buffers, copies, launches);
//! - `kernels/*.cu` every other op, compiled at run time.

pub mod alloc;
pub mod gemm;
pub mod graph;
pub mod napi;
pub mod nccl;
pub mod nvrtc;
pub mod sha256;
pub mod timer;
pub mod tma;

use cudarc::driver::sys as cu;
use std::cell::Cell;
use std::ffi::CStr;
use std::sync::OnceLock;

/// A CUDA driver result as a `Result`, with the error's name in the message.
pub fn ck(r: cu::CUresult, what: &str) -> Result<(), String> {
    if r == cu::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut name: *const std::ffi::c_char = std::ptr::null();
    let mut desc: *const std::ffi::c_char = std::ptr::null();
    unsafe {
        cu::cuGetErrorName(r, &mut name);
        cu::cuGetErrorString(r, &mut desc);
    }
    let s = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::from("?")
        } else {
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    Err(format!("{what}: {} ({})", s(name), s(desc)))
}

/// The device the backend runs on, with what `cudaInfo()` reports.
pub struct Device {
    pub dev: cu::CUdevice,
    pub ctx: cu::CUcontext,
    pub stream: cu::CUstream,
    pub name: String,
    pub total_memory: u64,
    pub cc_major: i32,
    pub cc_minor: i32,
    pub sm_count: i32,
    pub driver_version: i32,
    /// CUDA devices the driver reports, and the ordinal this process uses (MOE8_CUDA_DEVICE).
    pub count: i32,
    pub ordinal: i32,
}

// The raw handles are process-wide and only used from the JS thread (and the context is made
// current on any thread that uses it).
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

static DEVICE: OnceLock<Result<Device, String>> = OnceLock::new();

thread_local! {
    static CURRENT: Cell<bool> = const { Cell::new(false) };
}

/// Directories searched for the CUDA user-space libraries (NVRTC, cuBLASLt) besides the loader's
/// own path: `MOE8_CUDA_LIB_DIR` (colon-separated), `$CUDA_HOME`, /usr/local/cuda and the
/// NVIDIA PyPI wheels (`nvidia/cu13/lib`, `nvidia/cuda_nvrtc/lib`, `nvidia/cublas/lib`) of the
/// usual Python installations.
pub(crate) fn lib_dirs() -> Vec<std::path::PathBuf> {
    use std::path::PathBuf;
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(v) = std::env::var("MOE8_CUDA_LIB_DIR") {
        dirs.extend(v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(v) = std::env::var(var) {
            dirs.push(PathBuf::from(&v).join("lib64"));
            dirs.push(PathBuf::from(&v).join("lib"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    dirs.push("/usr/local/cuda/targets/x86_64-linux/lib".into());
    dirs.push("/usr/local/cuda/targets/sbsa-linux/lib".into());
    let mut roots: Vec<PathBuf> = vec![
        "/usr/lib".into(),
        "/usr/local/lib".into(),
        "/opt/conda/lib".into(),
    ];
    if let Ok(h) = std::env::var("HOME") {
        roots.push(PathBuf::from(&h).join(".local/lib"));
        roots.push(PathBuf::from(&h).join(".pyenv/versions"));
    }
    if let Ok(v) = std::env::var("VIRTUAL_ENV") {
        roots.push(PathBuf::from(v).join("lib"));
    }
    // <root>/python3.X/{site,dist}-packages/nvidia/..., and one level deeper for pyenv versions.
    let mut pys: Vec<PathBuf> = Vec::new();
    for r in &roots {
        let Ok(rd) = std::fs::read_dir(r) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("python3") {
                pys.push(p);
            } else if let Ok(rd2) = std::fs::read_dir(p.join("lib")) {
                for e2 in rd2.flatten() {
                    if e2.file_name().to_string_lossy().starts_with("python3") {
                        pys.push(e2.path());
                    }
                }
            }
        }
    }
    for py in pys {
        for sp in ["site-packages", "dist-packages"] {
            for sub in [
                "nvidia/cu13/lib",
                "nvidia/cuda_nvrtc/lib",
                "nvidia/cublas/lib",
            ] {
                let d = py.join(sp).join(sub);
                if d.is_dir() {
                    dirs.push(d);
                }
            }
        }
    }
    dirs
}

/// Loads (RTLD_GLOBAL) the CUDA 13 user-space libraries from the directories above, so that
/// cudarc's later `dlopen("libnvrtc.so.13")` finds the already-loaded library by its soname even
/// when it is not on the loader's path. Missing libraries are not an error here.
fn preload_libs() -> Vec<String> {
    let mut loaded = Vec::new();
    #[cfg(unix)]
    {
        use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
        let dirs = lib_dirs();
        for lib in ["libcublasLt.so.13", "libnvrtc.so.13"] {
            // Already reachable through the loader's own path: nothing to do.
            if unsafe { Library::open(Some(lib), RTLD_NOW | RTLD_GLOBAL) }
                .map(std::mem::forget)
                .is_ok()
            {
                loaded.push(lib.to_string());
                continue;
            }
            for d in &dirs {
                let p = d.join(lib);
                if p.exists() {
                    // libnvrtc dlopens its builtins library by soname: load it first from there.
                    if lib.starts_with("libnvrtc") {
                        if let Ok(rd) = std::fs::read_dir(d) {
                            for e in rd.flatten() {
                                let n = e.file_name().to_string_lossy().into_owned();
                                if n.starts_with("libnvrtc-builtins.so.13") {
                                    if let Ok(l) = unsafe {
                                        Library::open(Some(e.path()), RTLD_NOW | RTLD_GLOBAL)
                                    } {
                                        std::mem::forget(l);
                                    }
                                }
                            }
                        }
                    }
                    if let Ok(l) = unsafe { Library::open(Some(&p), RTLD_NOW | RTLD_GLOBAL) } {
                        std::mem::forget(l);
                        loaded.push(p.display().to_string());
                        break;
                    }
                }
            }
        }
    }
    loaded
}

fn init() -> Result<Device, String> {
    if std::env::var("MOE8_NO_CUDA").as_deref() == Ok("1") {
        return Err("disabled by MOE8_NO_CUDA=1".into());
    }
    preload_libs();
    if !unsafe { cu::is_culib_present() } {
        return Err(
            "libcuda (the NVIDIA driver library) was not found: no NVIDIA driver on this machine"
                .into(),
        );
    }
    unsafe {
        ck(cu::cuInit(0), "cuInit")?;
        let mut count = 0;
        ck(cu::cuDeviceGetCount(&mut count), "cuDeviceGetCount")?;
        if count == 0 {
            return Err("the NVIDIA driver reports no CUDA device".into());
        }
        let ordinal: i32 = std::env::var("MOE8_CUDA_DEVICE")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut dev = 0;
        ck(cu::cuDeviceGet(&mut dev, ordinal), "cuDeviceGet")?;
        let mut ctx = std::ptr::null_mut();
        ck(
            cu::cuDevicePrimaryCtxRetain(&mut ctx, dev),
            "cuDevicePrimaryCtxRetain",
        )?;
        ck(cu::cuCtxSetCurrent(ctx), "cuCtxSetCurrent")?;
        CURRENT.with(|c| c.set(true));
        let mut stream = std::ptr::null_mut();
        ck(
            cu::cuStreamCreate(
                &mut stream,
                cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
            ),
            "cuStreamCreate",
        )?;
        let mut name = [0 as std::ffi::c_char; 256];
        ck(
            cu::cuDeviceGetName(name.as_mut_ptr(), 256, dev),
            "cuDeviceGetName",
        )?;
        let name = CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
        let mut total = 0usize;
        ck(cu::cuDeviceTotalMem_v2(&mut total, dev), "cuDeviceTotalMem")?;
        let attr = |a: cu::CUdevice_attribute| -> Result<i32, String> {
            let mut v = 0;
            ck(
                cu::cuDeviceGetAttribute(&mut v, a, dev),
                "cuDeviceGetAttribute",
            )?;
            Ok(v)
        };
        use cu::CUdevice_attribute as A;
        let cc_major = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let cc_minor = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let sm_count = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let mut driver_version = 0;
        ck(
            cu::cuDriverGetVersion(&mut driver_version),
            "cuDriverGetVersion",
        )?;
        Ok(Device {
            dev,
            ctx,
            stream,
            name,
            total_memory: total as u64,
            cc_major,
            cc_minor,
            sm_count,
            driver_version,
            count,
            ordinal,
        })
    }
}

/// The device, initialised on first use; an error string says why CUDA is unavailable.
pub fn device() -> Result<&'static Device, String> {
    let d = DEVICE
        .get_or_init(|| match std::panic::catch_unwind(init) {
            Ok(r) => r,
            Err(_) => {
                Err("CUDA initialisation panicked (a CUDA library could not be loaded)".into())
            }
        })
        .as_ref()
        .map_err(|e| e.clone())?;
    if !CURRENT.with(|c| c.get()) {
        ck(unsafe { cu::cuCtxSetCurrent(d.ctx) }, "cuCtxSetCurrent")?;
        CURRENT.with(|c| c.set(true));
    }
    Ok(d)
}

/// The one stream every op is enqueued on.
pub fn stream() -> Result<cu::CUstream, String> {
    Ok(device()?.stream)
}

/// Waits for everything enqueued so far (the host needs a value).
pub fn synchronize() -> Result<(), String> {
    ck(
        unsafe { cu::cuStreamSynchronize(stream()?) },
        "cuStreamSynchronize",
    )
}

/// NVRTC's version (major, minor), or why it cannot be used.
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    use cudarc::nvrtc::sys as nv;
    if !unsafe { nv::is_culib_present() } {
        return Err("libnvrtc.so.13 not found (install the CUDA 13 NVRTC library, e.g. `pip install nvidia-cuda-nvrtc`, or set MOE8_CUDA_LIB_DIR)".into());
    }
    let (mut a, mut b) = (0, 0);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
        nv::nvrtcVersion(&mut a, &mut b)
    }))
    .map_err(|_| "nvrtcVersion panicked".to_string())?;
    if r != nv::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion failed: {r:?}"));
    }
    Ok((a, b))
}

/// cuBLASLt's version (e.g. 130000 for 13.0.0), or why it cannot be used.
pub fn cublaslt_version() -> Result<usize, String> {
    use cudarc::cublaslt::sys as lt;
    if !unsafe { lt::is_culib_present() } {
        return Err("libcublasLt.so.13 not found (install the CUDA 13 cuBLAS library, e.g. `pip install nvidia-cublas`, or set MOE8_CUDA_LIB_DIR)".into());
    }
    std::panic::catch_unwind(|| unsafe { lt::cublasLtGetVersion() })
        .map_err(|_| "cublasLtGetVersion panicked".to_string())
}
