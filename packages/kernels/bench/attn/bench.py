#!/usr/bin/env python3
"""Standalone check and benchmark of the Hopper attention kernels (src/cuda/kernels/flash_sm90.cu)
against the mma.sync kernels (flash.cu) and PyTorch's SDPA (cuDNN and FlashAttention-2 backends),
in one process per stage on one GPU, at small's shape and longer sequences.

Each moe8 kernel is compiled by NVRTC exactly as the addon does (scripts/nvrtc-check.py's
module_source and options), loaded with the driver API on PyTorch's context (ctypes), checked against
an f32 PyTorch reference of the same BF16 inputs (forward o and lse; backward dq, dk, dv, with
outputs poisoned with NaN first), then timed with CUDA events (median of --reps).

Usage (device): python3 bench.py [--out DIR] [--reps 20] [--cases small,t4096,...]
Usage (here):   python3 bench.py --compile-only
"""
import argparse
import ctypes
import importlib.util
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
KDIR = os.path.join(ROOT, "packages", "kernels", "src", "cuda", "kernels")
_spec = importlib.util.spec_from_file_location("sm90bench", os.path.join(HERE, "..", "sm90", "bench.py"))
sm90 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sm90)

# name: (batch, heads, T, dqk, dv)
CASES = {
    "small": (8, 16, 2048, 96, 64),
    "ragged": (2, 4, 1000, 96, 64),
    "short": (3, 2, 77, 96, 64),
    "d64": (4, 8, 1024, 64, 64),
    "t4096": (4, 16, 4096, 96, 64),
    "t8192": (2, 16, 8192, 96, 64),
}


def defines():
    import re

    out = {}
    with open(os.path.join(KDIR, "flash_sm90.cu")) as f:
        for m in re.finditer(r"^#define (\w+) (\d+)", f.read(), re.M):
            out[m.group(1)] = int(m.group(2))
    return out


class Maps:
    def __init__(self, drv):
        self.drv = drv

    def bf16_64b(self, ptr, inner, rows, box_rows):
        """[rows, inner] BF16 row-major, 64-byte swizzle, box {32, box_rows}."""
        cu = self.drv.cu
        buf = ctypes.create_string_buffer(128 + 64)
        addr = (ctypes.addressof(buf) + 63) & ~63
        dims = (ctypes.c_uint64 * 2)(inner, rows)
        strides = (ctypes.c_uint64 * 1)(inner * 2)
        box = (ctypes.c_uint32 * 2)(32, box_rows)
        estr = (ctypes.c_uint32 * 2)(1, 1)
        # BFLOAT16 = 9, interleave none, swizzle 64B = 2, L2 promotion 128B = 2, OOB fill zeros
        self.drv.check(cu.cuTensorMapEncodeTiled(addr, 9, 2, ctypes.c_void_p(ptr), dims, strides, box, estr, 0, 2, 2, 0),
                       "cuTensorMapEncodeTiled")
        self.drv.keep.append(buf)
        return (ctypes.c_uint64 * 16).from_address(addr)


VARIANT_KEYS = {"s": "FA3_STAGES", "pp": "FA3_PINGPONG", "bq": "FA3_BQ"}


def variant_defines(spec):
    """"bq128+s2" -> {"FA3_BQ": 128, "FA3_STAGES": 2}: the source's #defines a variant overrides."""
    import re

    out = {}
    for part in spec.split("+"):
        m = re.fullmatch(r"([a-z]+)(\d+)", part)
        if not m or m.group(1) not in VARIANT_KEYS:
            raise SystemExit(f"bench: variant {spec!r}: parts are s<stages>, pp<0|1>, bq<64|128>")
        out[VARIANT_KEYS[m.group(1)]] = int(m.group(2))
    return out


def variant_source(spec):
    """flash_sm90.cu with the variant's #defines (its static_asserts on the default's shared-memory
    sizes dropped), written next to this script; returns its path."""
    import re

    with open(os.path.join(KDIR, "flash_sm90.cu")) as f:
        src = f.read()
    for name, value in variant_defines(spec).items():
        src, n = re.subn(rf"^#define {name} \d+", f"#define {name} {value}", src, flags=re.M)
        if n == 0:  # defined under #ifndef: define it first
            src = f"#define {name} {value}\n" + src
    src = "\n".join(l for l in src.split("\n") if "static_assert(Fa3" not in l)
    os.makedirs(os.path.join(HERE, ".variants"), exist_ok=True)
    path = os.path.join(HERE, ".variants", f"flash_sm90_{spec.replace('+', '_')}.cu")
    with open(path, "w") as f:
        f.write(src)
    return path


def fa3_smem(kind, dqk, dv, d):
    """Shared memory of an entry point under the #defines d (FA3_STAGES, FA3_BQ)."""
    BM = BN = 128
    S, BQ = d["FA3_STAGES"], d["FA3_BQ"]
    if kind == "FWD":
        return 1024 + BM * dqk * 2 + S * (BN * dqk * 2 + BN * dv * 2) + (1 + 3 * S) * 8
    if kind == "DQ":
        return fa3_smem("FWD", dqk, dv, d) + BM * dv * 2
    return 1024 + BN * dqk * 2 + BN * dv * 2 + S * (BQ * dqk * 2 + BQ * dv * 2 + 2 * BQ * 4) + (1 + 2 * S) * 8


def make_inputs(case, torch, seed=0):
    B, H, T, dqk, dv = CASES[case]
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda d: torch.randn(B * T, H * d, device="cuda", generator=g).to(torch.bfloat16)
    return dict(B=B, H=H, T=T, dqk=dqk, dv=dv, q=mk(dqk), k=mk(dqk), v=mk(dv), do=mk(dv), scale=dqk ** -0.5)


def heads(x, B, T, H, d):
    return x.view(B, T, H, d).permute(0, 2, 1, 3)  # [B, H, T, d]


def reference(c, torch):
    """f32 forward and backward of the BF16 inputs, per batch (the T x T scores of one batch at once)."""
    B, H, T, dqk, dv = c["B"], c["H"], c["T"], c["dqk"], c["dv"]
    o = torch.empty(B * T, H * dv, device="cuda")
    lse = torch.empty(B * H * T, device="cuda")
    dq = torch.empty(B * T, H * dqk, device="cuda")
    dk = torch.empty_like(dq)
    dvv = torch.empty(B * T, H * dv, device="cuda")
    mask = torch.ones(T, T, device="cuda", dtype=torch.bool).tril()
    for b in range(B):
        rows = slice(b * T, (b + 1) * T)
        q = heads(c["q"][rows].float(), 1, T, H, dqk)[0].requires_grad_()
        k = heads(c["k"][rows].float(), 1, T, H, dqk)[0].requires_grad_()
        v = heads(c["v"][rows].float(), 1, T, H, dv)[0].requires_grad_()
        s = (q @ k.transpose(1, 2)) * c["scale"]
        s = s.masked_fill(~mask, float("-inf"))
        l = torch.logsumexp(s, -1)
        out = torch.softmax(s, -1) @ v
        out.backward(heads(c["do"][rows].float(), 1, T, H, dv)[0])
        o[rows] = out.detach().permute(1, 0, 2).reshape(T, H * dv)
        lse.view(B, H, T)[b] = l.detach()
        dq[rows] = q.grad.permute(1, 0, 2).reshape(T, H * dqk)
        dk[rows] = k.grad.permute(1, 0, 2).reshape(T, H * dqk)
        dvv[rows] = v.grad.permute(1, 0, 2).reshape(T, H * dv)
        del s, out
    D = (c["do"].float() * o).view(B, T, H, dv).sum(-1).permute(0, 2, 1).reshape(-1).contiguous()
    return dict(o=o, lse=lse, dq=dq, dk=dk, dv=dvv, D=D)


def rel(a, b):
    bad = int((~torch_isfinite(a)).sum())
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)), bad


def torch_isfinite(x):
    import torch

    return torch.isfinite(x)


def time_it(torch, fn, reps, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def stage_torch(args, emit):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for case in args.cases:
        c = make_inputs(case, torch)
        B, H, T, dqk, dv = c["B"], c["H"], c["T"], c["dqk"], c["dv"]
        q = heads(c["q"], B, T, H, dqk).detach().requires_grad_()
        k = heads(c["k"], B, T, H, dqk).detach().requires_grad_()
        v = heads(c["v"], B, T, H, dv).detach().requires_grad_()
        do = heads(c["do"], B, T, H, dv)
        for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash2", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel([be]):
                    vv = v if name == "cudnn" else torch.nn.functional.pad(v.detach(), (0, dqk - dv)).requires_grad_()
                    dd = do if name == "cudnn" else torch.nn.functional.pad(do, (0, dqk - dv))
                    f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, vv, is_causal=True)
                    tf = time_it(torch, f, args.reps)
                    out = f()

                    def fb():
                        o = torch.nn.functional.scaled_dot_product_attention(q, k, vv, is_causal=True)
                        o.backward(dd)

                    tfb = time_it(torch, fb, args.reps)
                emit(dict(stage="torch", case=case, impl=name, fwd_ms=tf, fwdbwd_ms=tfb))
            except Exception as e:  # a backend that refuses the shape
                emit(dict(stage="torch", case=case, impl=name, error=str(e)[:200]))


def stage_moe8(args, emit):
    import torch

    drv = sm90.Driver()
    torch.zeros(1, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    dfs = defines()
    
    fa3_mods = {"": (drv.load(sm90.cached_cubin(os.path.join(KDIR, "flash_sm90.cu"))), dfs)}
    for spec in args.variants:
        fa3_mods[spec] = (drv.load(sm90.cached_cubin(variant_source(spec))), {**dfs, **variant_defines(spec)})
    mod_fa2 = drv.load(sm90.cached_cubin(os.path.join(KDIR, "flash.cu")))
    maps = Maps(drv)
    P = lambda t: ctypes.c_uint64(t.data_ptr())
    for case in args.cases:
        c = make_inputs(case, torch)
        B, H, T, dqk, dv, sc = c["B"], c["H"], c["T"], c["dqk"], c["dv"], c["scale"]
        shape = f"{dqk}_{dv}"
        ref = reference(c, torch) if not args.no_check else None
        D = ref["D"] if ref else torch.zeros(B * H * T, device="cuda")
        out = {n: torch.full_like(c["q" if n != "o" else "v"], float("nan"), dtype=torch.float32) for n in ("o", "dq", "dk")}
        out["dv"] = torch.full((B * T, H * dv), float("nan"), device="cuda")
        out["o"] = torch.full((B * T, H * dv), float("nan"), device="cuda")
        lse = torch.full((B * H * T,), float("nan"), device="cuda")
        impls = {}
        # FA3 (wgmma): forward; backward = dq kernel + dk/dv kernel; one set per stage count
        I = lambda x: ctypes.c_int(x)
        F = lambda x: ctypes.c_float(x)
        lin = lse if not ref else ref["lse"]
        tq128 = maps.bf16_64b(c["q"].data_ptr(), H * dqk, B * T, 128)
        tk = maps.bf16_64b(c["k"].data_ptr(), H * dqk, B * T, 128)
        tv = maps.bf16_64b(c["v"].data_ptr(), H * dv, B * T, 128)
        tdo128 = maps.bf16_64b(c["do"].data_ptr(), H * dv, B * T, 128)
        grid = ((T + 127) // 128, B * H, 1)
        for spec, (mod, d) in fa3_mods.items():
            fsm, qsm, ksm = (fa3_smem(k, dqk, dv, d) for k in ("FWD", "DQ", "DKDV"))
            if not spec:
                assert (fsm, qsm, ksm) == tuple(dfs[f"FA3_{k}_SMEM_{shape}"] for k in ("FWD", "DQ", "DKDV"))
            ffw = drv.function(mod, f"fa3_fwd_{shape}", fsm)
            fdq = drv.function(mod, f"fa3_dq_{shape}", qsm)
            fkv = drv.function(mod, f"fa3_dkdv_{shape}", ksm)
            tqk = maps.bf16_64b(c["q"].data_ptr(), H * dqk, B * T, d["FA3_BQ"])
            tdok = maps.bf16_64b(c["do"].data_ptr(), H * dv, B * T, d["FA3_BQ"])
            fwd_s = drv.launcher(ffw, grid, 384, fsm, stream, [tq128, tk, tv, P(out["o"]), P(lse), I(T), I(H), F(sc)])
            bdq = drv.launcher(fdq, grid, 384, qsm, stream,
                               [tq128, tk, tv, tdo128, P(lin), P(D), P(out["dq"]), I(T), I(H), F(sc)])
            bkv = drv.launcher(fkv, grid, 384, ksm, stream,
                               [tqk, tk, tv, tdok, P(lin), P(D), P(out["dk"]), P(out["dv"]), I(T), I(H), F(sc)])
            name = "fa3" + (f"_{spec}" if spec else "")
            impls[name] = (fwd_s, (lambda a, b: lambda: (a(), b()))(bdq, bkv))
            impls[name + "_dq"] = (fwd_s, bdq)
            impls[name + "_dkdv"] = (fwd_s, bkv)
            if spec and ref:  # each variant's backward against the reference too
                out["dk"].fill_(float("nan"))
                bkv()
                torch.cuda.synchronize()
                emit(dict(stage="check", case=case, variant=spec, dk=rel(out["dk"], ref["dk"])[0],
                          dv=rel(out["dv"], ref["dv"])[0]))
        fwd, bwd = impls["fa3"]

        # FlashAttention-2 style mma.sync kernels (flash.cu)
        f2f = drv.function(mod_fa2, f"flash_fwd_{shape}")
        f2q = drv.function(mod_fa2, f"flash_dq_{shape}")
        f2kv = drv.function(mod_fa2, f"flash_dkdv_{shape}")
        g2 = ((T + 63) // 64, B * H, 1)
        o2 = torch.empty(B * T, H * dv, device="cuda")
        l2 = torch.empty(B * H * T, device="cuda")
        dq2, dk2, dv2 = torch.empty_like(out["dq"]), torch.empty_like(out["dk"]), torch.empty_like(out["dv"])
        lref = ref["lse"] if ref else l2
        fwd2 = drv.launcher(f2f, g2, 128, 0, stream, [P(c["q"]), P(c["k"]), P(c["v"]), P(o2), P(l2), I(T), I(H), F(sc)])
        b2q = drv.launcher(f2q, g2, 128, 0, stream, [P(c["do"]), P(c["q"]), P(c["k"]), P(c["v"]), P(lref), P(D), P(dq2), I(T), I(H), F(sc)])
        b2kv = drv.launcher(f2kv, g2, 128, 0, stream, [P(c["do"]), P(c["q"]), P(c["k"]), P(c["v"]), P(lref), P(D), P(dk2), P(dv2), I(T), I(H), F(sc)])
        impls["fa2"] = (fwd2, lambda: (b2q(), b2kv()))
        if ref:
            fwd()
            torch.cuda.synchronize()
            eo, bo = rel(out["o"], ref["o"])
            el, bl = rel(lse, ref["lse"])
            bwd()
            torch.cuda.synchronize()
            errs = {n: rel(out[n], ref[n]) for n in ("dq", "dk", "dv")}
            dq1 = out["dq"].clone()
            bwd()
            torch.cuda.synchronize()
            errs["deterministic"] = (bool(torch.equal(dq1, out["dq"])), 0)
            fwd2()
            b2q()
            b2kv()
            torch.cuda.synchronize()
            e2 = {n: rel(x, ref[n])[0] for n, x in (("o", o2), ("dq", dq2), ("dk", dk2), ("dv", dv2))}
            emit(dict(stage="check", case=case, fa3=dict(o=eo, lse=el, nonfinite=bo + bl + sum(b for _, b in errs.values()),
                                                          **{n: e for n, (e, _) in errs.items()}), fa2=e2))

        for name, (f, b) in impls.items():
            tf = time_it(torch, f, args.reps)
            tb = time_it(torch, b, args.reps)
            flops = 0.5 * 2 * B * H * T * T * (dqk + dv)
            emit(dict(stage="time", case=case, impl=name, fwd_ms=tf, bwd_ms=tb, fwdbwd_ms=tf + tb,
                      fwd_tflops=flops / tf / 1e9, bwd_tflops=2.5 * flops / tb / 1e9))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--cases", default="short,ragged,d64,small,t4096,t8192")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--variants", default="", help="extra flash_sm90 builds to time, e.g. s2,bq128,bq128+s2 "
                    "(s<FA3_STAGES>, pp<FA3_PINGPONG>, bq<FA3_BQ>)")
    ap.add_argument("--compile-only", action="store_true")
    args = ap.parse_args()
    args.cases = args.cases.split(",")
    args.variants = [v for v in args.variants.split(",") if v]
    if args.compile_only:
        for m in ("flash_sm90.cu", "flash.cu"):
            sm90.cached_cubin(os.path.join(KDIR, m))
            print("compiled", m)
        for spec in args.variants:
            sm90.cached_cubin(variant_source(spec))
            print("compiled variant", spec)
        return
    if args.stage:
        def emit(d):
            print("RESULT " + json.dumps(d), flush=True)

        {"torch": stage_torch, "moe8": stage_moe8}[args.stage](args, emit)
        return
    results = []
    for st in ("moe8", "torch"):
        cmd = [sys.executable, __file__, "--stage", st, "--reps", str(args.reps), "--cases", ",".join(args.cases),
               "--variants", ",".join(args.variants)]
        if args.no_check:
            cmd.append("--no-check")
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
        for line in p.stdout.splitlines():
            if line.startswith("RESULT "):
                results.append(json.loads(line[7:]))
                print(line[7:], flush=True)
        if p.returncode != 0:
            print(f"stage {st} exited {p.returncode}:\n{p.stderr[-3000:]}", flush=True)
    if args.out:
        with open(os.path.join(args.out, "attn-bench.json"), "w") as f:
            json.dump(results, f, indent=1)
    # Summary: per case, fwd+bwd ms of each implementation and the ratios to cuDNN.
    by = {}
    for r in results:
        if "fwdbwd_ms" in r:
            by.setdefault(r["case"], {})[r["impl"]] = r
    print("\ncase      impl    fwd ms  fwd+bwd ms  x cudnn(fwd+bwd)")
    for case, d in by.items():
        base = d.get("cudnn", {}).get("fwdbwd_ms")
        for impl, r in d.items():
            ratio = f"{r['fwdbwd_ms'] / base:.2f}" if base else "-"
            print(f"{case:9} {impl:7} {r['fwd_ms']:7.3f} {r['fwdbwd_ms']:10.3f}  {ratio}")


if __name__ == "__main__":
    main()
