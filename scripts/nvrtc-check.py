#!/usr/bin/env python3
"""Compile every CUDA kernel source of @moe8/kernels with NVRTC, without a GPU (CI check), and check
every entry point's parameters against the signature table the host launches with.

Each module is packages/kernels/src/cuda/kernels/<name>.cu prefixed with common.cuh, compiled with
the options in nvrtc-options.txt plus --gpu-architecture (default sm_90a), exactly as the addon
does at run time (src/cuda/nvrtc.rs). NVRTC comes from the `nvidia-cuda-nvrtc` PyPI wheel (CUDA 13):

    pip install nvidia-cuda-nvrtc==13.0.88

The table is packages/kernels/src/cuda/kernels.generated.ts, which
packages/kernels/scripts/kernel-signatures.ts generates by reading the .cu declarations as text. The
compiler's view of the same kernels is the PTX: every `.entry` must be in the table, with as many
parameters, each of the width and class (integer or float) of its table kind, and with the table's
__launch_bounds__ (.maxntid); every table kernel must be an entry. So a launch typed from the
table passes the argument slots the compiled kernel reads.

Prints one line per kernel module and exits non-zero on any compile error (with the log) or any
signature mismatch, or with exit code 2 when libnvrtc cannot be found.
Usage: nvrtc-check.py [--arch sm_90a] [--lib PATH] [--ptxas-verbose (registers and spills per kernel)]
                      [--module NAME (only this module, e.g. gemm_sm90; repeatable)]
                      [--write-cache DIR (each CUBIN where the addon's disk cache looks for it, so a
                       GPU machine with the same NVRTC major.minor skips compiling: MOE8_CACHE_DIR=DIR)]
"""
import hashlib
import argparse
import ctypes
import concurrent.futures
import glob
import time
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KDIR = os.path.join(ROOT, "packages", "kernels", "src", "cuda", "kernels")
TABLE = os.path.join(ROOT, "packages", "kernels", "src", "cuda", "kernels.generated.ts")

# The PTX parameter types each table kind may compile to (PTX writes `int` as .u32 or .s32 alike);
# a by-value struct is a byte array with its alignment: `.param .align 64 .b8 tA[128]` reads
# "b8[128]@64", the CUtensorMap of a tmap parameter.
PTX_TYPES = {
    "u64": {"u64", "s64", "b64"},
    "i32": {"u32", "s32", "b32"},
    "u32": {"u32", "s32", "b32"},
    "f32": {"f32"},
    "f64": {"f64"},
    "tmap": {"b8[128]@64"},
}
# Modules that use sm_90a-only instructions (wgmma, TMA, setmaxnreg): compiled for that target only.
SM90A_ONLY = {"gemm_sm90", "flash_sm90"}


def module_source(common, module, text):
    """The text NVRTC compiles (src/cuda/nvrtc.rs full_source): common.cuh, then the module with each
    `#include "<header>"` line naming a file of the kernels folder replaced by that file's text."""
    out = [common, f'#line 1 "{module}.cu"']
    for i, line in enumerate(text.split("\n")):
        m = re.fullmatch(r'\s*#include "([\w.]+)"\s*', line)
        if m and os.path.exists(os.path.join(KDIR, m.group(1))):
            with open(os.path.join(KDIR, m.group(1))) as f:
                out += [f'#line 1 "{m.group(1)}"', f.read(), f'#line {i + 2} "{module}.cu"']
        else:
            out.append(line)
    return "\n".join(out)


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


def read_table():
    """module -> kernel -> (maxThreads or None, [(param, kind)]) from the generated table's lines."""
    line_re = re.compile(
        r'^ {4}(\w+): \{ module: "(\w+)", name: "(\w+)", maxThreads: (\d+|null), params: \[(.*)\] \},$'
    )
    table = {}
    with open(TABLE) as f:
        for line in f:
            m = line_re.match(line.rstrip("\n"))
            if not m:
                continue
            key, module, name, bound, params = m.groups()
            if key != name:
                raise ValueError(f"{TABLE}: entry {key} names kernel {name}")
            pairs = re.findall(r'\["(\w+)", "(\w+)"\]', params)
            table.setdefault(module, {})[name] = (None if bound == "null" else int(bound), pairs)
    if not table:
        raise ValueError(f"{TABLE}: no kernel lines found (regenerate it)")
    return table


def ptx_entries(ptx):
    """entry name -> ([PTX parameter types], .maxntid x or None); a by-value array param reads
    '<type>[<count>]@<alignment>' (e.g. 'b8[128]@64')."""
    entries = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\(([^)]*)\)([^{]*)\{", ptx):
        name, plist, directives = m.groups()
        types = []
        for p in [p.strip() for p in plist.split(",") if p.strip()]:
            words = p.split()
            kind = next((w[1:] for w in words[1:] if w.startswith(".") and w not in (".ptr", ".align")
                         and not w.startswith((".global", ".const", ".shared", ".local"))), "?")
            arr = re.search(r"\[(\d+)\]$", p)
            if arr:
                align = re.search(r"\.align\s+(\d+)", p)
                kind = f"{kind}[{arr.group(1)}]@{align.group(1) if align else '?'}"
            types.append(kind)
        nt = re.search(r"\.maxntid\s+(\d+)", directives)
        entries[name] = (types, int(nt.group(1)) if nt else None)
    return entries


def check_signatures(module, entries, table):
    """The mismatches between a module's PTX entries and its table rows (empty when they agree)."""
    want = table.get(module, {})
    errors = [f"{module}.{n}: in the table but not compiled" for n in want if n not in entries]
    for name, (types, bound) in entries.items():
        if name not in want:
            errors.append(f"{module}.{name}: compiled but not in the table (regenerate it)")
            continue
        tbound, params = want[name]
        if len(types) != len(params):
            errors.append(f"{module}.{name}: {len(types)} parameters compiled, {len(params)} in the table")
        for i, ((pname, kind), t) in enumerate(zip(params, types)):
            if t not in PTX_TYPES[kind]:
                errors.append(f"{module}.{name}: parameter {i} ({pname}) is {kind} in the table, .{t} in PTX")
        if bound != tbound:
            errors.append(f"{module}.{name}: .maxntid {bound} in PTX, maxThreads {tbound} in the table")
    return errors


def compile_one(job):
    """Compiles one module; returns (ok, the lines to print, its PTX entries, the CUBIN or None)."""
    path, common, opts, arch, libpath = job
    lib, _ = find_nvrtc(libpath)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    name = os.path.splitext(os.path.basename(path))[0]
    with open(path) as f:
        src = module_source(common, name, f.read())
    t0 = time.monotonic()
    prog = ctypes.c_void_p()
    r = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), f"{name}.cu".encode(), 0, None, None)
    if r != 0:
        return False, f"FAIL {name}.cu: nvrtcCreateProgram: {lib.nvrtcGetErrorString(r).decode()}", {}, None
    copts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    r = lib.nvrtcCompileProgram(prog, len(opts), copts)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(max(size.value, 1))
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace").strip()
    secs = time.monotonic() - t0
    if r != 0:
        out = (False, f"FAIL {name}.cu: {lib.nvrtcGetErrorString(r).decode()}\n{text}", {}, None)
    else:
        cubin = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(cubin))
        binary = ctypes.create_string_buffer(cubin.value)
        lib.nvrtcGetCUBIN(prog, binary)
        ptx_size = ctypes.c_size_t()
        lib.nvrtcGetPTXSize(prog, ctypes.byref(ptx_size))
        ptx = ctypes.create_string_buffer(ptx_size.value)
        lib.nvrtcGetPTX(prog, ptx)
        entries = ptx_entries(ptx.value.decode(errors="replace"))
        warn = f" (warnings:\n{text})" if text else ""
        out = (True, f"ok   {name}.cu: {cubin.value} bytes of CUBIN for {arch} in {secs:.1f} s{warn}", entries,
               binary.raw)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return out


def write_cache(folder, module, path, common, arch, version, cubin):
    """Stores a CUBIN under the name src/cuda/nvrtc.rs looks up: SHA-256 of (full source, options,
    architecture, NVRTC major.minor), the same text the addon hashes."""
    with open(path) as f:
        source = module_source(common, module, f.read())
    key = hashlib.sha256(
        f"{source}\0{' '.join(options(arch))}\0{arch}\0nvrtc {version[0]}.{version[1]}".encode()
    ).hexdigest()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{module}-{arch}-{key[:32]}.cubin"), "wb") as f:
        f.write(cubin)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--lib", default=None)
    ap.add_argument("--ptxas-verbose", action="store_true", help="print registers and spills per kernel")
    ap.add_argument("--write-cache", default=None, help="write each CUBIN into this addon kernel-cache folder")
    ap.add_argument(
        "--module", action="append", default=None, help="compile only this module (e.g. gemm_sm90; repeatable)"
    )
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
    every = {os.path.splitext(os.path.basename(p))[0] for p in sources}
    if args.module:
        unknown = [m for m in args.module if m not in every]
        if unknown:
            print(f"nvrtc-check: --module {unknown[0]}: no such kernel module (one of {', '.join(sorted(every))})")
            return 2
        sources = [p for p in sources if os.path.splitext(os.path.basename(p))[0] in args.module]
    skipped = [p for p in sources if args.arch != "sm_90a" and os.path.splitext(os.path.basename(p))[0] in SM90A_ONLY]
    sources = [p for p in sources if p not in skipped]
    for p in skipped:
        print(f"skip {os.path.basename(p)}: sm_90a only (the backend loads it on compute capability 9.0 alone)")
    if not sources:
        print("nvrtc-check: no kernel sources found")
        return 1
    table = read_table()
    # One process per module (NVRTC compiles a program on one thread; the modules are independent).
    jobs = [(path, common, opts, args.arch, args.lib) for path in sources]
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        results = list(pool.map(compile_one, jobs))
    failed = 0
    mismatches = []
    checked = 0
    for path, (ok, text, entries, cubin) in zip(sources, results):
        print(text)
        failed += 0 if ok else 1
        if ok:
            module = os.path.splitext(os.path.basename(path))[0]
            mismatches += check_signatures(module, entries, table)
            checked += len(entries)
            if args.write_cache and not args.ptxas_verbose:
                write_cache(args.write_cache, module, path, common, args.arch, (major.value, minor.value), cubin)
    mismatches += [f"{m}: in the table but there is no {m}.cu" for m in table if m not in every]
    print(f"nvrtc-check: {len(sources) - failed} of {len(sources)} kernel modules compiled")
    for m in mismatches:
        print(f"MISMATCH {m}")
    print(
        f"nvrtc-check: {checked} entry points checked against {os.path.relpath(TABLE, ROOT)}: "
        + (f"{len(mismatches)} mismatches (regenerate the table: bun packages/kernels/scripts/kernel-signatures.ts)"
           if mismatches else "all match")
    )
    return 1 if failed or mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
