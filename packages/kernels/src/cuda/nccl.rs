//! NCCL for the data-parallel ranks of several GPUs (issue 22), loaded at run time like the rest of
//! CUDA: libnccl.so.2 from the loader's path, `MOE8_NCCL_LIB` (a file), or the directories where
//! the other CUDA libraries are looked for plus the `nvidia-nccl-cu13` wheel's `nvidia/nccl/lib`
//! (PyTorch's install carries it). A thin loader of our own rather than cudarc's `nccl` module:
//! cudarc's dynamic loading asks for `libnccl.so` or `libnccl.so.<CUDA major>`, while NCCL's soname
//! is `libnccl.so.2` and the wheels ship nothing else. Only entry points NCCL has had since 2.7 are
//! resolved, so any NCCL 2 release works.
//!
//! Every collective is enqueued on the backend's one stream, in place on device buffers, so it is
//! ordered with the kernels that produce and consume its tensors and the host does not wait.

use super::{ck as cuda_ck, device, lib_dirs};
use cudarc::driver::sys as cu;
use libloading::Library;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// ncclUniqueId: 128 opaque bytes made by one rank and handed to the others (our launcher sends
/// them over its TCP rendezvous).
pub const UNIQUE_ID_BYTES: usize = 128;
type Comm = *mut c_void;
type Stream = *mut c_void;
/// ncclDataType_t values (nccl.h, stable since 2.0).
pub const NCCL_INT32: c_int = 2;
pub const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;

#[allow(non_snake_case)]
struct Api {
    _lib: Library,
    path: String,
    ncclGetVersion: unsafe extern "C" fn(*mut c_int) -> c_int,
    ncclGetErrorString: unsafe extern "C" fn(c_int) -> *const c_char,
    ncclGetUniqueId: unsafe extern "C" fn(*mut [u8; UNIQUE_ID_BYTES]) -> c_int,
    ncclCommInitRank: unsafe extern "C" fn(*mut Comm, c_int, [u8; UNIQUE_ID_BYTES], c_int) -> c_int,
    ncclCommDestroy: unsafe extern "C" fn(Comm) -> c_int,
    ncclCommAbort: unsafe extern "C" fn(Comm) -> c_int,
    ncclAllReduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int,
    ncclBroadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int,
    ncclReduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        c_int,
        Comm,
        Stream,
    ) -> c_int,
    ncclAllGather:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> c_int,
    ncclSend: unsafe extern "C" fn(*const c_void, usize, c_int, c_int, Comm, Stream) -> c_int,
    ncclRecv: unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, Comm, Stream) -> c_int,
    ncclGroupStart: unsafe extern "C" fn() -> c_int,
    ncclGroupEnd: unsafe extern "C" fn() -> c_int,
    ncclCommCount: unsafe extern "C" fn(Comm, *mut c_int) -> c_int,
    ncclCommUserRank: unsafe extern "C" fn(Comm, *mut c_int) -> c_int,
    /// Since NCCL 2.18 (None before): what `--expert-parallel N` with N below the world needs.
    ncclCommSplit:
        Option<unsafe extern "C" fn(Comm, c_int, c_int, *mut Comm, *mut c_void) -> c_int>,
}

// The function pointers are process-wide and NCCL's API is thread-safe for these calls.
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

static API: OnceLock<Result<Api, String>> = OnceLock::new();

/// Where libnccl.so.2 may be, in the order tried.
fn candidates() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(p) = std::env::var("MOE8_NCCL_LIB") {
        // An explicit file is the only candidate: a wrong path must not fall back silently.
        return vec![p];
    }
    out.push("libnccl.so.2".to_string());
    for d in lib_dirs() {
        out.push(d.join("libnccl.so.2").display().to_string());
        // The wheel's layout beside nvidia/cu13/lib, nvidia/cublas/lib, ...
        if let Some(nvidia) = d.parent().and_then(|p| p.parent()) {
            out.push(nvidia.join("nccl/lib/libnccl.so.2").display().to_string());
        }
    }
    out.dedup();
    out
}

fn load() -> Result<Api, String> {
    let tried = candidates();
    let mut found = None;
    for c in &tried {
        if let Ok(lib) = unsafe { Library::new(c) } {
            found = Some((lib, c.clone()));
            break;
        }
    }
    let Some((lib, path)) = found else {
        return Err(format!(
            "libnccl.so.2 was not found (tried {}): install NCCL 2 (`pip install nvidia-nccl-cu13`, or the system's package) or set MOE8_NCCL_LIB to the library file",
            if tried.len() > 3 { format!("{} and {} more", tried[..3].join(", "), tried.len() - 3) } else { tried.join(", ") }
        ));
    };
    macro_rules! sym {
        ($name:ident) => {
            *unsafe { lib.get(concat!(stringify!($name), "\0").as_bytes()) }
                .map_err(|err| format!("{path}: no symbol {} ({err})", stringify!($name)))?
        };
    }
    Ok(Api {
        path: path.clone(),
        ncclGetVersion: sym!(ncclGetVersion),
        ncclGetErrorString: sym!(ncclGetErrorString),
        ncclGetUniqueId: sym!(ncclGetUniqueId),
        ncclCommInitRank: sym!(ncclCommInitRank),
        ncclCommDestroy: sym!(ncclCommDestroy),
        ncclCommAbort: sym!(ncclCommAbort),
        ncclAllReduce: sym!(ncclAllReduce),
        ncclBroadcast: sym!(ncclBroadcast),
        ncclReduce: sym!(ncclReduce),
        ncclAllGather: sym!(ncclAllGather),
        ncclSend: sym!(ncclSend),
        ncclRecv: sym!(ncclRecv),
        ncclGroupStart: sym!(ncclGroupStart),
        ncclGroupEnd: sym!(ncclGroupEnd),
        ncclCommCount: sym!(ncclCommCount),
        ncclCommUserRank: sym!(ncclCommUserRank),
        ncclCommSplit: unsafe { lib.get(b"ncclCommSplit\0") }.ok().map(|f| *f),
        _lib: lib,
    })
}

fn api() -> Result<&'static Api, String> {
    API.get_or_init(load).as_ref().map_err(|e| e.clone())
}

fn ck(a: &Api, r: c_int, what: &str) -> Result<(), String> {
    if r == 0 {
        return Ok(());
    }
    let p = unsafe { (a.ncclGetErrorString)(r) };
    let s = if p.is_null() {
        "?".to_string()
    } else {
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    };
    Err(format!("{what}: NCCL error {r} ({s})"))
}

/// NCCL's version as "major.minor.patch" and the library file it came from.
pub fn version() -> Result<(String, String), String> {
    let a = api()?;
    let mut v: c_int = 0;
    ck(a, unsafe { (a.ncclGetVersion)(&mut v) }, "ncclGetVersion")?;
    // NCCL_VERSION_CODE: major * 10000 + minor * 100 + patch since 2.9 (major * 1000 + ... before).
    let (major, minor, patch) = if v >= 10000 {
        (v / 10000, (v / 100) % 100, v % 100)
    } else {
        (v / 1000, (v / 100) % 10, v % 100)
    };
    Ok((format!("{major}.{minor}.{patch}"), a.path.clone()))
}

/// Whether this NCCL can split a communicator (ncclCommSplit, 2.18 or later).
pub fn can_split() -> bool {
    api().map(|a| a.ncclCommSplit.is_some()).unwrap_or(false)
}

/// A new unique id (rank 0 makes it; every rank initialises its communicator with it).
pub fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES], String> {
    let a = api()?;
    let mut id = [0u8; UNIQUE_ID_BYTES];
    ck(
        a,
        unsafe { (a.ncclGetUniqueId)(&mut id) },
        "ncclGetUniqueId",
    )?;
    Ok(id)
}

/// One rank's communicator on this process's device (the backend's context is made current).
pub struct Communicator {
    comm: Comm,
    pub rank: i32,
    pub size: i32,
    /// The stream of the reductions started during the backward pass (`start_reduce`), made on
    /// first use: they run beside the kernels enqueued after them on the backend's stream.
    side: Option<cu::CUstream>,
}

unsafe impl Send for Communicator {}

impl Communicator {
    /// Blocks until all `size` ranks have called it with the same id.
    pub fn new(id: [u8; UNIQUE_ID_BYTES], size: i32, rank: i32) -> Result<Self, String> {
        let a = api()?;
        if size < 1 || rank < 0 || rank >= size {
            return Err(format!("ncclCommInitRank: rank {rank} of {size}"));
        }
        device()?;
        let mut comm: Comm = std::ptr::null_mut();
        ck(
            a,
            unsafe { (a.ncclCommInitRank)(&mut comm, size, id, rank) },
            "ncclCommInitRank",
        )?;
        Ok(Communicator {
            comm,
            rank,
            size,
            side: None,
        })
    }

    /// A collective of this communicator's ranks (each calls it once, in the same order as its
    /// other calls): the ranks passing the same `color` (>= 0) form a new communicator, ranked by
    /// their rank here (ncclCommSplit, NCCL 2.18 or later).
    pub fn split(&self, color: i32) -> Result<Communicator, String> {
        let a = api()?;
        let Some(split) = a.ncclCommSplit else {
            return Err(format!(
                "{}: this NCCL has no ncclCommSplit (2.18 or later has): groups of part of the ranks need it",
                a.path
            ));
        };
        if color < 0 {
            return Err(format!("ncclCommSplit: color {color} is not >= 0"));
        }
        device()?;
        let mut comm: Comm = std::ptr::null_mut();
        ck(
            a,
            unsafe { split(self.comm, color, self.rank, &mut comm, std::ptr::null_mut()) },
            "ncclCommSplit",
        )?;
        let (mut rank, mut size): (c_int, c_int) = (0, 0);
        let r = ck(
            a,
            unsafe { (a.ncclCommUserRank)(comm, &mut rank) },
            "ncclCommUserRank",
        )
        .and_then(|_| {
            ck(
                a,
                unsafe { (a.ncclCommCount)(comm, &mut size) },
                "ncclCommCount",
            )
        });
        if let Err(e) = r {
            unsafe { (a.ncclCommDestroy)(comm) };
            return Err(e);
        }
        Ok(Communicator {
            comm,
            rank,
            size,
            side: None,
        })
    }

    /// An event recorded now on `on`, for another stream to wait on (destroyed at once: the driver
    /// releases it once the wait has been enqueued and it has completed).
    fn hand_over(on: cu::CUstream, to: cu::CUstream) -> Result<(), String> {
        let mut ev: cu::CUevent = std::ptr::null_mut();
        let flags = cu::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        cuda_ck(
            unsafe { cu::cuEventCreate(&mut ev, flags) },
            "cuEventCreate",
        )?;
        let r = cuda_ck(unsafe { cu::cuEventRecord(ev, on) }, "cuEventRecord").and_then(|_| {
            cuda_ck(
                unsafe { cu::cuStreamWaitEvent(to, ev, 0) },
                "cuStreamWaitEvent",
            )
        });
        unsafe { cu::cuEventDestroy_v2(ev) };
        r
    }

    /// Starts, on the side stream and after everything enqueued so far on the backend's stream, one
    /// NCCL group of reductions: each (address, elements, root) summed in place on rank `root`
    /// (ncclReduce), or on every rank for root -1 (ncclAllReduce). `join` orders them before what
    /// the backend's stream runs next.
    pub fn start_reduce(&mut self, bufs: &[(u64, usize, i32)], dtype: c_int) -> Result<(), String> {
        let a = api()?;
        let main = super::stream()?;
        let side = match self.side {
            Some(s) => s,
            None => {
                let mut s: cu::CUstream = std::ptr::null_mut();
                let flags = cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
                cuda_ck(
                    unsafe { cu::cuStreamCreate(&mut s, flags) },
                    "cuStreamCreate",
                )?;
                self.side = Some(s);
                s
            }
        };
        Self::hand_over(main, side)?;
        ck(a, unsafe { (a.ncclGroupStart)() }, "ncclGroupStart")?;
        let mut r = Ok(());
        for &(p, n, root) in bufs {
            let (src, dst) = (p as *const c_void, p as *mut c_void);
            let (code, what) = if root < 0 {
                let c = unsafe {
                    (a.ncclAllReduce)(src, dst, n, dtype, NCCL_SUM, self.comm, side as Stream)
                };
                (c, "ncclAllReduce")
            } else {
                let c = unsafe {
                    (a.ncclReduce)(
                        src,
                        dst,
                        n,
                        dtype,
                        NCCL_SUM,
                        root,
                        self.comm,
                        side as Stream,
                    )
                };
                (c, "ncclReduce")
            };
            r = ck(a, code, what);
            if r.is_err() {
                break;
            }
        }
        let end = ck(a, unsafe { (a.ncclGroupEnd)() }, "ncclGroupEnd");
        r.and(end)
    }

    /// The backend's stream waits for every reduction started so far.
    pub fn join(&self) -> Result<(), String> {
        match self.side {
            Some(side) => Self::hand_over(side, super::stream()?),
            None => Ok(()),
        }
    }

    fn stream() -> Result<Stream, String> {
        Ok(super::stream()? as Stream)
    }

    /// Runs `body` (its NCCL calls enqueued on the backend's stream) between ncclGroupStart and
    /// ncclGroupEnd: the first failing call ends the body, and the group is closed either way.
    fn in_group(
        &self,
        body: impl FnOnce(&Api, Comm, Stream) -> Result<(), String>,
    ) -> Result<(), String> {
        let a = api()?;
        let s = Self::stream()?;
        ck(a, unsafe { (a.ncclGroupStart)() }, "ncclGroupStart")?;
        let r = body(a, self.comm, s);
        let end = ck(a, unsafe { (a.ncclGroupEnd)() }, "ncclGroupEnd");
        r.and(end)
    }

    /// In place on each (device address, element count) of one dtype, as one NCCL group.
    pub fn all_reduce_sum(&self, bufs: &[(u64, usize)], dtype: c_int) -> Result<(), String> {
        self.in_group(|a, comm, s| {
            for &(p, n) in bufs {
                let (src, dst) = (p as *const c_void, p as *mut c_void);
                let r = unsafe { (a.ncclAllReduce)(src, dst, n, dtype, NCCL_SUM, comm, s) };
                ck(a, r, "ncclAllReduce")?;
            }
            Ok(())
        })
    }

    /// In place: each buffer becomes rank `root`'s (element counts as all_reduce_sum).
    pub fn broadcast(&self, bufs: &[(u64, usize, i32)], dtype: c_int) -> Result<(), String> {
        self.in_group(|a, comm, s| {
            for &(p, n, root) in bufs {
                let (src, dst) = (p as *const c_void, p as *mut c_void);
                let r = unsafe { (a.ncclBroadcast)(src, dst, n, dtype, root, comm, s) };
                ck(a, r, "ncclBroadcast")?;
            }
            Ok(())
        })
    }

    /// In place on rank `root` only: each buffer becomes the sum over the ranks (the other ranks'
    /// buffers are sent, not written).
    pub fn reduce_sum(&self, bufs: &[(u64, usize, i32)], dtype: c_int) -> Result<(), String> {
        self.in_group(|a, comm, s| {
            for &(p, n, root) in bufs {
                let (src, dst) = (p as *const c_void, p as *mut c_void);
                let r = unsafe { (a.ncclReduce)(src, dst, n, dtype, NCCL_SUM, root, comm, s) };
                ck(a, r, "ncclReduce")?;
            }
            Ok(())
        })
    }

    /// recv (size x n elements) gets every rank's n elements of send, in rank order.
    pub fn all_gather(&self, send: u64, recv: u64, n: usize, dtype: c_int) -> Result<(), String> {
        let a = api()?;
        let s = Self::stream()?;
        let (src, dst) = (send as *const c_void, recv as *mut c_void);
        ck(
            a,
            unsafe { (a.ncclAllGather)(src, dst, n, dtype, self.comm, s) },
            "ncclAllGather",
        )
    }

    /// Point-to-point in one group: sends[q] = (address, elements) to rank q, recvs[q] from rank q
    /// (0 elements: nothing exchanged with that rank; this rank's own pair is copied by the caller).
    pub fn exchange(
        &self,
        sends: &[(u64, usize)],
        recvs: &[(u64, usize)],
        dtype: c_int,
    ) -> Result<(), String> {
        self.in_group(|a, comm, s| {
            for q in (0..self.size).filter(|&q| q != self.rank) {
                if let Some(&(p, n)) = sends.get(q as usize).filter(|&&(_, n)| n > 0) {
                    let r = unsafe { (a.ncclSend)(p as *const c_void, n, dtype, q, comm, s) };
                    ck(a, r, "ncclSend")?;
                }
                if let Some(&(p, n)) = recvs.get(q as usize).filter(|&&(_, n)| n > 0) {
                    let r = unsafe { (a.ncclRecv)(p as *mut c_void, n, dtype, q, comm, s) };
                    ck(a, r, "ncclRecv")?;
                }
            }
            Ok(())
        })
    }

    /// Ends the communicator without waiting for the other ranks (a rank is gone): pending and
    /// later operations of this rank fail instead of waiting for ever.
    pub fn abort(&mut self) -> Result<(), String> {
        if self.comm.is_null() {
            return Ok(());
        }
        let a = api()?;
        let r = unsafe { (a.ncclCommAbort)(self.comm) };
        self.comm = std::ptr::null_mut();
        ck(a, r, "ncclCommAbort")
    }

    /// Frees the communicator once its operations are done.
    pub fn destroy(&mut self) -> Result<(), String> {
        if let Some(side) = self.side.take() {
            // (Destroying a stream with work pending releases it once that work is done.)
            unsafe { cu::cuStreamDestroy_v2(side) };
        }
        if self.comm.is_null() {
            return Ok(());
        }
        let a = api()?;
        let r = unsafe { (a.ncclCommDestroy)(self.comm) };
        self.comm = std::ptr::null_mut();
        ck(a, r, "ncclCommDestroy")
    }

    pub fn live(&self) -> bool {
        !self.comm.is_null()
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        let _ = self.destroy();
    }
}

// --- napi: what the TypeScript NcclCollectives calls (packages/kernels/src/cuda-backend/nccl.ts) ---

pub mod js {
    use super::{
        can_split, unique_id, version, Communicator, NCCL_FLOAT32, NCCL_INT32, UNIQUE_ID_BYTES,
    };
    use napi::bindgen_prelude::Buffer;
    use napi::{Error, Result, Status};
    use napi_derive::napi;
    use std::ffi::c_int;

    fn napi_err(msg: String) -> Error {
        Error::new(Status::GenericFailure, msg)
    }

    /// NCCL's version and library file, or why it cannot be loaded.
    #[napi(object)]
    pub struct NcclInfo {
        pub available: bool,
        pub version: Option<String>,
        pub path: Option<String>,
        pub reason: Option<String>,
        /// Whether it splits communicators (ncclCommSplit): what `--expert-parallel P` below the
        /// rank count needs.
        pub split: bool,
    }

    #[napi]
    pub fn nccl_info() -> NcclInfo {
        match version() {
            Ok((v, p)) => NcclInfo {
                available: true,
                version: Some(v),
                path: Some(p),
                reason: None,
                split: can_split(),
            },
            Err(r) => NcclInfo {
                available: false,
                version: None,
                path: None,
                reason: Some(r),
                split: false,
            },
        }
    }

    /// A new ncclUniqueId's 128 bytes.
    #[napi]
    pub fn nccl_unique_id() -> Result<Buffer> {
        Ok(unique_id().map_err(napi_err)?.to_vec().into())
    }

    fn dtype_of(d: String) -> Result<c_int> {
        match d.as_str() {
            "f32" => Ok(NCCL_FLOAT32),
            "i32" => Ok(NCCL_INT32),
            _ => Err(napi_err(format!(
                "NCCL collectives move f32 or i32, not {d}"
            ))),
        }
    }

    fn count(n: f64, what: &str) -> Result<usize> {
        if n.is_nan() || n < 0.0 || n.fract() != 0.0 {
            return Err(napi_err(format!("{what}: bad element count {n}")));
        }
        Ok(n as usize)
    }

    /// (device address, element count, root rank) per buffer, from the JavaScript arrays.
    fn rooted(
        ptrs: &[f64],
        counts: &[f64],
        roots: &[i32],
        what: &str,
    ) -> Result<Vec<(u64, usize, i32)>> {
        ptrs.iter()
            .zip(counts)
            .zip(roots)
            .map(|((&p, &n), &r)| Ok((p as u64, count(n, what)?, r)))
            .collect()
    }

    /// One rank's NCCL communicator (`dispose()` frees it; `abort()` ends it when a rank is gone).
    #[napi]
    pub struct NcclComm {
        inner: Communicator,
    }

    #[napi]
    impl NcclComm {
        /// Joins the group: blocks until every rank has called it with the same id.
        #[napi(constructor)]
        pub fn new(id: Buffer, size: i32, rank: i32) -> Result<Self> {
            let bytes: &[u8] = &id;
            let id: [u8; UNIQUE_ID_BYTES] = bytes.try_into().map_err(|_| {
                napi_err(format!(
                    "NcclComm: the unique id has {} bytes, not {UNIQUE_ID_BYTES}",
                    bytes.len()
                ))
            })?;
            Ok(NcclComm {
                inner: Communicator::new(id, size, rank).map_err(napi_err)?,
            })
        }

        /// The communicator of the ranks that pass the same color (every rank calls it).
        #[napi]
        pub fn split(&self, color: i32) -> Result<NcclComm> {
            Ok(NcclComm {
                inner: self.inner.split(color).map_err(napi_err)?,
            })
        }

        #[napi(getter)]
        pub fn rank(&self) -> i32 {
            self.inner.rank
        }

        #[napi(getter)]
        pub fn size(&self) -> i32 {
            self.inner.size
        }

        /// In place: buffer i (device address ptrs[i], counts[i] elements of dtype) summed over the ranks.
        #[napi]
        pub fn all_reduce_sum(
            &self,
            ptrs: Vec<f64>,
            counts: Vec<f64>,
            dtype: String,
        ) -> Result<()> {
            let bufs = ptrs
                .iter()
                .zip(&counts)
                .map(|(&p, &n)| Ok((p as u64, count(n, "allReduceSum")?)))
                .collect::<Result<Vec<_>>>()?;
            self.inner
                .all_reduce_sum(&bufs, dtype_of(dtype)?)
                .map_err(napi_err)
        }

        /// In place: buffer i becomes rank roots[i]'s.
        #[napi]
        pub fn broadcast(
            &self,
            ptrs: Vec<f64>,
            counts: Vec<f64>,
            roots: Vec<i32>,
            dtype: String,
        ) -> Result<()> {
            let bufs = rooted(&ptrs, &counts, &roots, "broadcast")?;
            self.inner
                .broadcast(&bufs, dtype_of(dtype)?)
                .map_err(napi_err)
        }

        /// In place on rank roots[i] only: buffer i summed over the ranks.
        #[napi]
        pub fn reduce_sum(
            &self,
            ptrs: Vec<f64>,
            counts: Vec<f64>,
            roots: Vec<i32>,
            dtype: String,
        ) -> Result<()> {
            let bufs = rooted(&ptrs, &counts, &roots, "reduceSum")?;
            self.inner
                .reduce_sum(&bufs, dtype_of(dtype)?)
                .map_err(napi_err)
        }

        /// Starts buffer i's sum over the ranks on rank roots[i] (every rank for -1) on the side
        /// stream, after the work enqueued so far; `join` waits for them on the backend's stream.
        #[napi]
        pub fn start_reduce(
            &mut self,
            ptrs: Vec<f64>,
            counts: Vec<f64>,
            roots: Vec<i32>,
            dtype: String,
        ) -> Result<()> {
            let bufs = rooted(&ptrs, &counts, &roots, "startReduce")?;
            self.inner
                .start_reduce(&bufs, dtype_of(dtype)?)
                .map_err(napi_err)
        }

        /// The backend's stream waits for the reductions started so far.
        #[napi]
        pub fn join(&self) -> Result<()> {
            self.inner.join().map_err(napi_err)
        }

        /// recv (size x n elements) gets every rank's n elements of send, in rank order.
        #[napi]
        pub fn all_gather(&self, send: f64, recv: f64, n: f64, dtype: String) -> Result<()> {
            self.inner
                .all_gather(
                    send as u64,
                    recv as u64,
                    count(n, "allGather")?,
                    dtype_of(dtype)?,
                )
                .map_err(napi_err)
        }

        /// Send (address, elements) pair q to rank q and receive pair q from it, as one group.
        #[napi]
        pub fn exchange(
            &self,
            send_ptrs: Vec<f64>,
            send_counts: Vec<f64>,
            recv_ptrs: Vec<f64>,
            recv_counts: Vec<f64>,
            dtype: String,
        ) -> Result<()> {
            let pairs = |ps: &[f64], ns: &[f64]| {
                ps.iter()
                    .zip(ns)
                    .map(|(&p, &n)| Ok((p as u64, count(n, "exchange")?)))
                    .collect::<Result<Vec<_>>>()
            };
            let (s, r) = (
                pairs(&send_ptrs, &send_counts)?,
                pairs(&recv_ptrs, &recv_counts)?,
            );
            self.inner
                .exchange(&s, &r, dtype_of(dtype)?)
                .map_err(napi_err)
        }

        #[napi]
        pub fn abort(&mut self) -> Result<()> {
            self.inner.abort().map_err(napi_err)
        }

        #[napi]
        pub fn dispose(&mut self) -> Result<()> {
            self.inner.destroy().map_err(napi_err)
        }

        #[napi(getter)]
        pub fn disposed(&self) -> bool {
            !self.inner.live()
        }
    }
}
