//! Run-time compilation of the kernels (`kernels/*.cu`, each prefixed with `kernels/common.cuh`)
//! with NVRTC for the GPU present: a CUBIN for `sm_<major><minor>` (`sm_90a` on Hopper, so
//! arch-specific instructions are available). The options are those of `kernels/nvrtc-options.txt`
//! (shared with `scripts/nvrtc-check.py`, the CI compile check). Results are cached on disk by the
//! SHA-256 of (source, options, architecture, NVRTC version) under `$MOE8_CACHE_DIR` or
//! `~/.cache/moe8/kernels`, as DeepGEMM does, and modules and functions in the process.

use super::{ck, device, nvrtc_version, sha256::sha256_hex, timer};
use cudarc::driver::sys as cu;
use cudarc::nvrtc::sys as nv;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::sync::Mutex;

pub const COMMON: &str = include_str!("kernels/common.cuh");
/// Headers a module may `#include "<name>"`: replaced by their text (see `full_source`).
pub const HEADERS: &[(&str, &str)] = &[
    ("sm90.cuh", include_str!("kernels/sm90.cuh")),
    (
        "gemm_sm90_parts.cuh",
        include_str!("kernels/gemm_sm90_parts.cuh"),
    ),
];
pub const OPTIONS: &str = include_str!("kernels/nvrtc-options.txt");

/// Every kernel source, by module name.
pub const SOURCES: &[(&str, &str)] = &[
    ("elementwise", include_str!("kernels/elementwise.cu")),
    ("quant", include_str!("kernels/quant.cu")),
    ("gemm", include_str!("kernels/gemm.cu")),
    ("gemm16", include_str!("kernels/gemm16.cu")),
    ("nn", include_str!("kernels/nn.cu")),
    ("attention", include_str!("kernels/attention.cu")),
    ("flash", include_str!("kernels/flash.cu")),
    ("moe", include_str!("kernels/moe.cu")),
    ("optim", include_str!("kernels/optim.cu")),
    // Hopper only (wgmma, TMA, setmaxnreg: sm_90a): the backend asks for its kernels only on a
    // compute-capability-9.0 GPU, and modules compile on first use, so other GPUs never build it.
    ("gemm_sm90", include_str!("kernels/gemm_sm90.cu")),
    ("flash_sm90", include_str!("kernels/flash_sm90.cu")),
];

/// The full text NVRTC compiles for a module: common.cuh, then the module with each
/// `#include "<header>"` line of HEADERS replaced by that header's text (so the text hashed for the
/// kernel cache is everything compiled; NVRTC itself is given no include path).
pub fn full_source(name: &str) -> Option<String> {
    let src = SOURCES.iter().find(|(n, _)| *n == name)?.1;
    let mut out = format!("{COMMON}\n#line 1 \"{name}.cu\"\n");
    for (i, line) in src.lines().enumerate() {
        let header = HEADERS
            .iter()
            .find(|(h, _)| line.trim() == format!("#include \"{h}\""));
        match header {
            Some((h, text)) => out.push_str(&format!(
                "#line 1 \"{h}\"\n{text}\n#line {} \"{name}.cu\"\n",
                i + 2
            )),
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    Some(out)
}

/// The compiler options for an architecture such as `sm_90a`.
pub fn options(arch: &str) -> Vec<String> {
    let mut o = vec![format!("--gpu-architecture={arch}")];
    o.extend(
        OPTIONS
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from),
    );
    o
}

/// The architecture to compile for: `sm_90a` on Hopper, `sm_XY` elsewhere.
pub fn arch() -> Result<String, String> {
    let d = device()?;
    let a = if d.cc_major == 9 && d.cc_minor == 0 {
        "a"
    } else {
        ""
    };
    Ok(format!("sm_{}{}{a}", d.cc_major, d.cc_minor))
}

fn cache_dir() -> std::path::PathBuf {
    if let Ok(d) = std::env::var("MOE8_CACHE_DIR") {
        return std::path::PathBuf::from(d);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/tmp".into());
    std::path::PathBuf::from(home).join(".cache/moe8/kernels")
}

fn nvck(r: nv::nvrtcResult, what: &str) -> Result<(), String> {
    if r == nv::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what}: {r:?}"))
    }
}

/// Compiles `source` to a CUBIN with NVRTC; the error carries the compiler log.
pub fn compile(name: &str, source: &str, opts: &[String]) -> Result<Vec<u8>, String> {
    nvrtc_version()?;
    let src = CString::new(source).map_err(|e| e.to_string())?;
    let cname = CString::new(format!("{name}.cu")).unwrap();
    let copts: Vec<CString> = opts
        .iter()
        .map(|o| CString::new(o.as_str()).unwrap())
        .collect();
    let ptrs: Vec<*const std::ffi::c_char> = copts.iter().map(|c| c.as_ptr()).collect();
    unsafe {
        let mut prog: nv::nvrtcProgram = std::ptr::null_mut();
        nvck(
            nv::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                cname.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            ),
            "nvrtcCreateProgram",
        )?;
        let r = nv::nvrtcCompileProgram(prog, ptrs.len() as i32, ptrs.as_ptr());
        let mut log_size = 0usize;
        nv::nvrtcGetProgramLogSize(prog, &mut log_size);
        let mut log = vec![0 as std::ffi::c_char; log_size.max(1)];
        nv::nvrtcGetProgramLog(prog, log.as_mut_ptr());
        let log = CStr::from_ptr(log.as_ptr()).to_string_lossy().into_owned();
        if r != nv::nvrtcResult::NVRTC_SUCCESS {
            nv::nvrtcDestroyProgram(&mut prog);
            return Err(format!("NVRTC failed to compile {name}.cu ({r:?}):\n{log}"));
        }
        let mut size = 0usize;
        let out = (|| {
            nvck(nv::nvrtcGetCUBINSize(prog, &mut size), "nvrtcGetCUBINSize")?;
            let mut bin = vec![0u8; size];
            nvck(
                nv::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut std::ffi::c_char),
                "nvrtcGetCUBIN",
            )?;
            Ok::<_, String>(bin)
        })();
        nv::nvrtcDestroyProgram(&mut prog);
        out
    }
}

struct Registry {
    modules: HashMap<String, usize>,
    functions: Vec<(usize, cu::CUfunction)>,
    /// "module.kernel" per function id (the kernel timer's labels).
    names: Vec<String>,
    by_name: HashMap<(String, String), u32>,
    /// Dynamic shared memory each function has been allowed so far.
    max_shared: Vec<u32>,
}

unsafe impl Send for Registry {}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

/// The CUBIN of a module: from the disk cache, or compiled (and cached).
fn cubin(name: &str) -> Result<Vec<u8>, String> {
    let source = full_source(name).ok_or_else(|| format!("no kernel module named {name}"))?;
    let arch = arch()?;
    let opts = options(&arch);
    let (vmaj, vmin) = nvrtc_version()?;
    let key =
        sha256_hex(format!("{source}\0{}\0{arch}\0nvrtc {vmaj}.{vmin}", opts.join(" ")).as_bytes());
    let dir = cache_dir();
    let path = dir.join(format!("{name}-{arch}-{}.cubin", &key[..32]));
    if std::env::var("MOE8_KERNEL_CACHE").as_deref() != Ok("0") {
        if let Ok(bin) = std::fs::read(&path) {
            if !bin.is_empty() {
                return Ok(bin);
            }
        }
    }
    let bin = compile(name, &source, &opts)?;
    // Best effort: a read-only home just means compiling again next time.
    if std::fs::create_dir_all(&dir).is_ok() {
        let tmp = dir.join(format!(".{name}-{}-{}.tmp", &key[..16], std::process::id()));
        if std::fs::write(&tmp, &bin).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(bin)
}

fn load_module(name: &str) -> Result<cu::CUmodule, String> {
    let bin = cubin(name)?;
    let mut m: cu::CUmodule = std::ptr::null_mut();
    ck(
        unsafe { cu::cuModuleLoadData(&mut m, bin.as_ptr() as *const std::ffi::c_void) },
        &format!("cuModuleLoadData({name})"),
    )?;
    Ok(m)
}

/// The id of kernel `func` of module `module` (compiling and loading the module on first use).
pub fn function(module: &str, func: &str) -> Result<u32, String> {
    device()?;
    let mut g = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let reg = g.get_or_insert_with(|| Registry {
        modules: HashMap::new(),
        functions: Vec::new(),
        names: Vec::new(),
        by_name: HashMap::new(),
        max_shared: Vec::new(),
    });
    if let Some(id) = reg.by_name.get(&(module.to_string(), func.to_string())) {
        return Ok(*id);
    }
    let m = match reg.modules.get(module) {
        Some(m) => *m as cu::CUmodule,
        None => {
            let m = load_module(module)?;
            reg.modules.insert(module.to_string(), m as usize);
            m
        }
    };
    let cname = CString::new(func).map_err(|e| e.to_string())?;
    let mut f: cu::CUfunction = std::ptr::null_mut();
    ck(
        unsafe { cu::cuModuleGetFunction(&mut f, m, cname.as_ptr()) },
        &format!("kernel {module}.{func}"),
    )?;
    let id = reg.functions.len() as u32;
    reg.functions.push((m as usize, f));
    reg.names.push(format!("{module}.{func}"));
    reg.max_shared.push(48 * 1024);
    reg.by_name
        .insert((module.to_string(), func.to_string()), id);
    Ok(id)
}

/// Launches kernel `id` on the backend's stream. `args` holds the parameters' bytes: without
/// `offsets`, one 8-byte little-endian slot per kernel parameter (pointers and 64-bit values fill
/// it; 32-bit values sit in its low half); with `offsets`, parameter i starts at byte offsets[i]
/// (a by-value struct such as a 128-byte CUtensorMap takes more than a slot).
pub fn launch(
    id: u32,
    grid: [u32; 3],
    block: [u32; 3],
    shared: u32,
    args: &[u8],
    offsets: Option<&[u32]>,
) -> Result<(), String> {
    let d = device()?;
    let f = {
        let mut g = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        let reg = g.as_mut().ok_or("no kernel loaded")?;
        let (_, f) = *reg.functions.get(id as usize).ok_or("bad kernel id")?;
        if shared > reg.max_shared[id as usize] {
            ck(
                unsafe {
                    cu::cuFuncSetAttribute(
                        f,
                        cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        shared as i32,
                    )
                },
                "cuFuncSetAttribute(max dynamic shared memory)",
            )?;
            reg.max_shared[id as usize] = shared;
        }
        f
    };
    if grid.contains(&0) {
        return Ok(()); // nothing to do
    }
    // A copy of the bytes at a 64-byte-aligned address (the alignment of the widest parameter,
    // a tensor map), so every parameter's source is as aligned as the kernel's own copy will be.
    let mut store = vec![0u8; args.len() + 64];
    let base = store.as_ptr().align_offset(64);
    store[base..base + args.len()].copy_from_slice(args);
    let at = |o: usize| store[base + o..].as_ptr() as *mut std::ffi::c_void;
    let mut params: Vec<*mut std::ffi::c_void> = match offsets {
        None => {
            if !args.len().is_multiple_of(8) {
                return Err("launch: the argument buffer must hold 8-byte slots".into());
            }
            (0..args.len() / 8).map(|i| at(i * 8)).collect()
        }
        Some(offs) => {
            if offs.iter().any(|&o| o as usize >= args.len()) {
                return Err("launch: a parameter offset lies past the argument bytes".into());
            }
            offs.iter().map(|&o| at(o as usize)).collect()
        }
    };
    let mark = timer::start(|| {
        let g = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref()
            .map(|r| r.names[id as usize].clone())
            .unwrap_or_default()
    })?;
    ck(
        unsafe {
            cu::cuLaunchKernel(
                f,
                grid[0],
                grid[1],
                grid[2],
                block[0],
                block[1],
                block[2],
                shared,
                d.stream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        },
        "cuLaunchKernel",
    )?;
    timer::stop(mark)
}
