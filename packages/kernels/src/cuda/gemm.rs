//! GEMMs through cuBLASLt on the backend's stream: f32 (pure f32, no TF32), BF16 inputs with f32
//! accumulation and output, and FP8 (E4M3/E5M2) with DeepSeek-V3 scaling:
//! `CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F` for the 128x128 weight blocks and
//! `..._VEC128_32F` for the 1x128 activation tiles (or a per-tensor scalar).
//!
//! The caller speaks row-major, as the Backend does: C[M,N] (+)= op(A) op(B), A stored [M,K]
//! ([K,M] with transA), B stored [K,N] ([N,K] with transB). cuBLASLt is column-major, so it is
//! asked for C^T = op(B)^T op(A)^T: its "A" is our B and its "B" is our A. The FP8 TN form Hopper
//! requires is therefore our transB = true, transA = false, i.e. the weight [N,K] as cuBLAS's A.
//! Scale layouts (what cuBLASLt reads on the H200): weight blocks [ceil(N/128)][ceil(K/128)]
//! row-major (the Tensor's own block layout); activation tiles [ceil(K/128)][M] with M contiguous
//! (the transpose of the Tensor's [M][ceil(K/128)] tile layout: the TypeScript side transposes
//! them into a scratch buffer before the call).

use super::{ck, device, timer};
use cudarc::cublaslt::sys as lt;
use cudarc::driver::sys as cu;
use std::collections::HashMap;
use std::sync::Mutex;

struct Lt {
    handle: lt::cublasLtHandle_t,
    workspace: u64,
    workspace_size: usize,
    algos: HashMap<String, Option<lt::cublasLtMatmulAlgo_t>>,
}
unsafe impl Send for Lt {}

static LT: Mutex<Option<Result<Lt, String>>> = Mutex::new(None);

fn lck(r: lt::cublasStatus_t, what: &str) -> Result<(), String> {
    if r == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what}: {r:?}"))
    }
}

fn init() -> Result<Lt, String> {
    device()?;
    super::cublaslt_version()?;
    let mut handle: lt::cublasLtHandle_t = std::ptr::null_mut();
    lck(unsafe { lt::cublasLtCreate(&mut handle) }, "cublasLtCreate")?;
    let workspace_size = 32 << 20;
    let mut ws: cu::CUdeviceptr = 0;
    ck(
        unsafe { cu::cuMemAlloc_v2(&mut ws, workspace_size) },
        "cuMemAlloc (cuBLASLt workspace)",
    )?;
    Ok(Lt {
        handle,
        workspace: ws,
        workspace_size,
        algos: HashMap::new(),
    })
}

/// Element type of a GEMM operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    Bf16,
    E4m3,
    E5m2,
}

impl Elem {
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "f32" => Elem::F32,
            "bf16" => Elem::Bf16,
            "e4m3" => Elem::E4m3,
            "e5m2" => Elem::E5m2,
            _ => return Err(format!("unknown GEMM element type {s}")),
        })
    }
    fn cuda(self) -> lt::cudaDataType_t {
        match self {
            Elem::F32 => lt::cudaDataType_t::CUDA_R_32F,
            Elem::Bf16 => lt::cudaDataType_t::CUDA_R_16BF,
            Elem::E4m3 => lt::cudaDataType_t::CUDA_R_8F_E4M3,
            Elem::E5m2 => lt::cudaDataType_t::CUDA_R_8F_E5M2,
        }
    }
    fn fp8(self) -> bool {
        matches!(self, Elem::E4m3 | Elem::E5m2)
    }
}

/// How an FP8 operand is scaled: none, one f32 for the tensor, 1x128 tiles, 128x128 blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleMode {
    None,
    Scalar,
    Vec128,
    Blk128,
}

impl ScaleMode {
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "" | "none" => ScaleMode::None,
            "scalar" => ScaleMode::Scalar,
            "vec128" => ScaleMode::Vec128,
            "blk128" => ScaleMode::Blk128,
            _ => return Err(format!("unknown scale mode {s}")),
        })
    }
    fn lt(self) -> Option<lt::cublasLtMatmulMatrixScale_t> {
        use lt::cublasLtMatmulMatrixScale_t as S;
        match self {
            ScaleMode::None => None,
            ScaleMode::Scalar => Some(S::CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F),
            ScaleMode::Vec128 => Some(S::CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F),
            ScaleMode::Blk128 => Some(S::CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F),
        }
    }
}

pub struct Operand {
    pub ptr: u64,
    pub elem: Elem,
    pub trans: bool,
    pub scale: u64,
    pub scale_mode: ScaleMode,
}

struct Guard {
    desc: lt::cublasLtMatmulDesc_t,
    layouts: Vec<lt::cublasLtMatrixLayout_t>,
    pref: lt::cublasLtMatmulPreference_t,
}
impl Drop for Guard {
    fn drop(&mut self) {
        unsafe {
            if !self.desc.is_null() {
                lt::cublasLtMatmulDescDestroy(self.desc);
            }
            for l in &self.layouts {
                lt::cublasLtMatrixLayoutDestroy(*l);
            }
            if !self.pref.is_null() {
                lt::cublasLtMatmulPreferenceDestroy(self.pref);
            }
        }
    }
}

unsafe fn set_desc<T>(
    desc: lt::cublasLtMatmulDesc_t,
    attr: lt::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> Result<(), String> {
    lck(
        lt::cublasLtMatmulDescSetAttribute(
            desc,
            attr,
            v as *const T as *const std::ffi::c_void,
            std::mem::size_of::<T>(),
        ),
        &format!("cublasLtMatmulDescSetAttribute({attr:?})"),
    )
}

/// C[M,N] (row-major, f32, or BF16 when `c_elem` says so and not accumulating) = op(A) op(B), or +=
/// with `accumulate`. Errors (among them
/// `CUBLAS_STATUS_NOT_SUPPORTED` for a shape or layout cuBLASLt has no kernel for) are returned so
/// the caller can fall back to its own kernel.
pub fn matmul(
    a: &Operand,
    b: &Operand,
    c: u64,
    c_elem: Elem,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) -> Result<(), String> {
    let c_bf16 = match c_elem {
        Elem::F32 => false,
        Elem::Bf16 if !accumulate => true,
        _ => {
            return Err(format!(
                "cuBLASLt: output type {c_elem:?} (f32, or bf16 without accumulate)"
            ))
        }
    };
    let d = device()?;
    let mut g = LT.lock().unwrap_or_else(|e| e.into_inner());
    let st = g.get_or_insert_with(init).as_mut().map_err(|e| e.clone())?;
    // cublasOperation_t as the int32 the TRANSA/TRANSB attributes take.
    const CUBLAS_OP_N: i32 = 0;
    const CUBLAS_OP_T: i32 = 1;
    // cuBLAS's A is our B, cuBLAS's B is our A (see the module comment).
    let (ca, cb) = (b, a);
    let op_a = if ca.trans { CUBLAS_OP_T } else { CUBLAS_OP_N };
    let op_b = if cb.trans { CUBLAS_OP_T } else { CUBLAS_OP_N };
    // Stored column-major shapes: cuBLAS A is n x k (op N) or k x n (op T); B is k x m or m x k.
    let (ar, ac) = if ca.trans { (k, n) } else { (n, k) };
    let (br, bc) = if cb.trans { (m, k) } else { (k, m) };
    unsafe {
        let mut guard = Guard {
            desc: std::ptr::null_mut(),
            layouts: Vec::new(),
            pref: std::ptr::null_mut(),
        };
        lck(
            lt::cublasLtMatmulDescCreate(
                &mut guard.desc,
                lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                lt::cudaDataType_t::CUDA_R_32F,
            ),
            "cublasLtMatmulDescCreate",
        )?;
        use lt::cublasLtMatmulDescAttributes_t as D;
        set_desc(guard.desc, D::CUBLASLT_MATMUL_DESC_TRANSA, &op_a)?;
        set_desc(guard.desc, D::CUBLASLT_MATMUL_DESC_TRANSB, &op_b)?;
        if let Some(mode) = ca.scale_mode.lt() {
            set_desc(guard.desc, D::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode)?;
            let p = ca.scale as *const std::ffi::c_void;
            set_desc(guard.desc, D::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &p)?;
        }
        if let Some(mode) = cb.scale_mode.lt() {
            set_desc(guard.desc, D::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode)?;
            let p = cb.scale as *const std::ffi::c_void;
            set_desc(guard.desc, D::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &p)?;
        }
        if ca.elem.fp8() {
            // Full-precision accumulation (no fast accumulate): the promotion the recipe asks for.
            let fast: i8 = 0;
            set_desc(guard.desc, D::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast)?;
        }
        let mut layout = |t: lt::cudaDataType_t,
                          r: usize,
                          cc: usize|
         -> Result<lt::cublasLtMatrixLayout_t, String> {
            let mut l: lt::cublasLtMatrixLayout_t = std::ptr::null_mut();
            lck(
                lt::cublasLtMatrixLayoutCreate(&mut l, t, r as u64, cc as u64, r as i64),
                "cublasLtMatrixLayoutCreate",
            )?;
            guard.layouts.push(l);
            Ok(l)
        };
        let la = layout(ca.elem.cuda(), ar, ac)?;
        let lb = layout(cb.elem.cuda(), br, bc)?;
        let lc = layout(c_elem.cuda(), n, m)?;
        let key = format!(
            "{m},{n},{k},{:?},{:?},{},{},{:?},{:?},{accumulate},{c_bf16}",
            ca.elem, cb.elem, ca.trans, cb.trans, ca.scale_mode, cb.scale_mode
        );
        let algo = match st.algos.get(&key) {
            Some(a) => *a,
            None => {
                lck(
                    lt::cublasLtMatmulPreferenceCreate(&mut guard.pref),
                    "cublasLtMatmulPreferenceCreate",
                )?;
                let ws = st.workspace_size as u64;
                lck(
                    lt::cublasLtMatmulPreferenceSetAttribute(
                        guard.pref,
                        lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                        &ws as *const u64 as *const std::ffi::c_void,
                        8,
                    ),
                    "cublasLtMatmulPreferenceSetAttribute",
                )?;
                let mut res: lt::cublasLtMatmulHeuristicResult_t = std::mem::zeroed();
                let mut count = 0;
                let r = lt::cublasLtMatmulAlgoGetHeuristic(
                    st.handle, guard.desc, la, lb, lc, lc, guard.pref, 1, &mut res, &mut count,
                );
                let a = if r == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                    && count > 0
                    && res.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                {
                    Some(res.algo)
                } else {
                    None
                };
                st.algos.insert(key.clone(), a);
                a
            }
        };
        let Some(algo) = algo else {
            return Err(format!(
                "cuBLASLt: CUBLAS_STATUS_NOT_SUPPORTED (no algorithm for {key})"
            ));
        };
        if !accumulate && ca.elem.fp8() {
            // With block-scaled FP8 inputs cuBLASLt reads C even for beta = 0 (seen on the H200: a
            // NaN-poisoned output stayed NaN), so start from zeros rather than whatever C holds.
            if c_bf16 {
                ck(
                    cu::cuMemsetD16Async(c, 0, m * n, d.stream),
                    "cuMemsetD16Async",
                )?;
            } else {
                ck(
                    cu::cuMemsetD32Async(c, 0, m * n, d.stream),
                    "cuMemsetD32Async",
                )?;
            }
        }
        let alpha: f32 = 1.0;
        let beta: f32 = if accumulate { 1.0 } else { 0.0 };
        let mark = timer::start(|| {
            format!(
                "cublasLt.{:?}x{:?}.{:?}x{:?}",
                cb.elem, ca.elem, cb.scale_mode, ca.scale_mode
            )
        })?;
        lck(
            lt::cublasLtMatmul(
                st.handle,
                guard.desc,
                &alpha as *const f32 as *const std::ffi::c_void,
                ca.ptr as *const std::ffi::c_void,
                la,
                cb.ptr as *const std::ffi::c_void,
                lb,
                &beta as *const f32 as *const std::ffi::c_void,
                c as *const std::ffi::c_void,
                lc,
                c as *mut std::ffi::c_void,
                lc,
                &algo,
                st.workspace as *mut std::ffi::c_void,
                st.workspace_size,
                d.stream as lt::cudaStream_t,
            ),
            "cublasLtMatmul",
        )?;
        timer::stop(mark)
    }
}
