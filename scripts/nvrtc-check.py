#!/usr/bin/env python3
"""Compile every CUDA kernel source of @moe8/kernels with NVRTC, without a GPU (CI check).

Each module is packages/kernels/src/cuda/kernels/<name>.cu prefixed with common.cuh, compiled with
the options in nvrtc-options.txt plus --gpu-architecture (default sm_90a), exactly as the addon
does at run time (src/cuda/nvrtc.rs). NVRTC comes from the `nvidia-cuda-nvrtc` PyPI wheel (CUDA 13):

    pip install nvidia-cuda-nvrtc==13.0.88

Prints one line per kernel module and exits non-zero on any compile error (with the log), or with
exit code 2 when libnvrtc cannot be found.
Usage: nvrtc-check.py [--arch sm_90a] [--lib PATH] [--ptxas-verbose (registers and spills per kernel)]
"""
import argparse
import ctypes
import concurrent.futures
import glob
import time
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KDIR = os.path.join(ROOT, "packages", "kernels", "src", "cuda", "kernels")


def find_nvrtc(explicit):
    cands = [explicit] if explicit else []
    if os.environ.get("MOE8_NVRTC_LIB"):
        cands.append(os.environ["MOE8_NVRTC_LIB"])
    try:
        import nvidia  # namespace package of the NVIDIA wheels

        for base in list(getattr(nvidia, "__path__", [])):
            cands += sorted(glob.glob(os.path.join(base, "cu13", "lib", "libnvrtc.so.13")))
            cands += sorted(glob.glob(os.path.join(base, "cuda_nvrtc", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    cands += ["libnvrtc.so.13", "/usr/local/cuda/lib64/libnvrtc.so.13"]
    errors = []
    for c in cands:
        try:
            # libnvrtc dlopens its builtins library by soname: load it first from the same folder.
            d = os.path.dirname(c)
            for b in sorted(glob.glob(os.path.join(d, "libnvrtc-builtins.so.*"))) if d else []:
                if ".alt." not in b:
                    ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(c, mode=ctypes.RTLD_GLOBAL), c
        except OSError as e:
            errors.append(f"{c}: {e}")
    return None, "\n".join(errors)


def options(arch):
    with open(os.path.join(KDIR, "nvrtc-options.txt")) as f:
        lines = [l.strip() for l in f]
    return [f"--gpu-architecture={arch}"] + [l for l in lines if l and not l.startswith("#")]


def compile_one(job):
    """Compiles one module; returns (ok, the lines to print)."""
    path, common, opts, arch, libpath = job
    lib, _ = find_nvrtc(libpath)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    name = os.path.splitext(os.path.basename(path))[0]
    with open(path) as f:
        src = f'{common}\n#line 1 "{name}.cu"\n{f.read()}'
    t0 = time.monotonic()
    prog = ctypes.c_void_p()
    r = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), f"{name}.cu".encode(), 0, None, None)
    if r != 0:
        return False, f"FAIL {name}.cu: nvrtcCreateProgram: {lib.nvrtcGetErrorString(r).decode()}"
    copts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    r = lib.nvrtcCompileProgram(prog, len(opts), copts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(max(size.value, 1))
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace").strip()
    secs = time.monotonic() - t0
    if r != 0:
        out = (False, f"FAIL {name}.cu: {lib.nvrtcGetErrorString(r).decode()}\n{text}")
    else:
        cubin = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(cubin))
        warn = f" (warnings:\n{text})" if text else ""
        out = (True, f"ok   {name}.cu: {cubin.value} bytes of CUBIN for {arch} in {secs:.1f} s{warn}")
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--lib", default=None)
    ap.add_argument("--ptxas-verbose", action="store_true", help="print registers and spills per kernel")
    args = ap.parse_args()
    lib, where = find_nvrtc(args.lib)
    if lib is None:
        print(f"nvrtc-check: libnvrtc not found (pip install nvidia-cuda-nvrtc==13.0.88):\n{where}")
        return 2
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    print(f"nvrtc-check: NVRTC {major.value}.{minor.value} ({where}), arch {args.arch}")
    with open(os.path.join(KDIR, "common.cuh")) as f:
        common = f.read()
    opts = options(args.arch) + (["--ptxas-options=-v"] if args.ptxas_verbose else [])
    copts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    sources = sorted(glob.glob(os.path.join(KDIR, "*.cu")))
    if not sources:
        print("nvrtc-check: no kernel sources found")
        return 1
    # One process per module (NVRTC compiles a program on one thread; the modules are independent).
    jobs = [(path, common, opts, args.arch, args.lib) for path in sources]
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        results = list(pool.map(compile_one, jobs))
    failed = 0
    for ok, text in results:
        print(text)
        failed += 0 if ok else 1
    print(f"nvrtc-check: {len(sources) - failed} of {len(sources)} kernel modules compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
