# DeepGEMM (deepseek-ai/DeepGEMM: DeepSeek's own Hopper kernels for the FP8 recipe moe8 follows) in
# every role of small's expert GEMMs, as a second anchor beside torch_expert_roles.py: the same
# roles, shapes and groups, FP8 codes with 1x128 / 128x128 scales (Fprop, Dgrad: the 1D2D m-grouped
# kernel, BF16 out) and 128x1 column tiles on both operands (Wgrad: the 1D1D k-grouped kernel, f32
# accumulated into C, as moe8's Wgrad does into the weight gradient). It answers whether a role's
# ratio to PyTorch's BF16 is a limit of our kernels or of the recipe on this GPU at these shapes.
#
# Not part of the project: DeepGEMM is built from a checkout outside the repository (DEEPGEMM_SRC,
# with its cutlass and fmt submodules; scripts/gpu-deepgemm.sh builds it) and only timed here.
# DeepGEMM's contiguous layouts need every group padded to a multiple of 128 rows (Fprop, Dgrad) or
# tokens (Wgrad); TFLOP/s count the real rows (2 M N K over the groups' own sizes), so padding is
# DeepGEMM's cost, as it would be in a model. Kernel time only (torch's profiler over 30 back-to-back
# calls, no L2 flush, the scale-layout transforms DeepGEMM launches beside excluded), each result
# checked against the BF16 product of the dequantised operands (DeepGEMM's calc_diff).
# python3 packages/kernels/bench/deepgemm_expert_roles.py [--offsets bench-gemm.json]
import argparse
import json
import os
import sys

import torch

src = os.environ.get("DEEPGEMM_SRC")
if not src:
    raise SystemExit("DEEPGEMM_SRC: unset (a DeepGEMM checkout with deep_gemm/_C built in place)")
sys.path.insert(0, src)
sys.path.insert(0, os.path.join(src, "tests"))
import deep_gemm  # noqa: E402
from deep_gemm.testing import bench_kineto, calc_diff  # noqa: E402
from generators import (  # noqa: E402
    MajorTypeAB,
    cast_fp8_fp4_with_major,
    generate_k_grouped_contiguous,
    grouped_cast_fp8_fp4_with_major,
)

E, R, D, I = 64, 98304, 1024, 256
ap = argparse.ArgumentParser()
ap.add_argument("--offsets", help="a bench gemm --json output whose expert_offsets to time as well")
ap.add_argument("--roles", default="fprop,dgrad,wgrad", help="the roles to time (comma-separated)")
# What each of DeepGEMM's own choices is worth: its tile width limited to multiples of N (128: the
# 128-column tiles moe8's Fprop and Dgrad use), or its grid to N SMs (an odd count rules out its
# 2-CTA clusters, which share one operand's loads by TMA multicast).
ap.add_argument("--block-n-multiple-of", type=int, help="deep_gemm.set_block_size_multiple_of")
ap.add_argument("--sms", type=int, help="deep_gemm.set_num_sms")
args = ap.parse_args()
variant = {}
if args.block_n_multiple_of:
    deep_gemm.set_block_size_multiple_of(args.block_n_multiple_of)
    variant["block_n_multiple_of"] = args.block_n_multiple_of
if args.sms:
    deep_gemm.set_num_sms(args.sms)
    variant["sms"] = args.sms
# Balanced groups, or only the bench's (the ones the round's other two anchors time) when given.
groupings = [("balanced", [R // E] * E)]
if args.offsets:
    off = json.loads(open(args.offsets).read().strip().splitlines()[-1])["expert_offsets"]
    if len(off) != E + 1 or off[0] != 0 or off[-1] != R:
        raise SystemExit(f"{args.offsets}: expert_offsets must be {E + 1} offsets from 0 to {R}")
    groupings = [("bench", [off[e + 1] - off[e] for e in range(E)])]


def align(x, a=128):
    return (x + a - 1) // a * a


def m_grouped(sizes, n, k):
    """Fprop / Dgrad: A [rows, k] in expert segments padded to 128 rows, B [E, n, k] (128x128 blocks)."""
    padded = [align(s) for s in sizes]
    rows = sum(padded)
    a = torch.randn((rows, k), device="cuda", dtype=torch.bfloat16)
    b = torch.randn((E, n, k), device="cuda", dtype=torch.bfloat16)
    layout = torch.empty(rows, device="cuda", dtype=torch.int32)
    start = 0
    for e, (s, p) in enumerate(zip(sizes, padded)):
        layout[start:start + s] = e
        layout[start + s:start + p] = -1
        a[start + s:start + p] = 0
        start += p
    a8 = cast_fp8_fp4_with_major(a, MajorTypeAB.KMajor, 128, False, False)
    b8 = grouped_cast_fp8_fp4_with_major(b, MajorTypeAB.KMajor, 128, False, False, use_block_cast_for_fp8=True)
    d = torch.empty((rows, n), device="cuda", dtype=torch.bfloat16)

    def run():
        deep_gemm.m_grouped_fp8_gemm_nt_contiguous(a8, b8, d, layout)

    def check():
        run()
        ref = torch.empty_like(d)
        start = 0
        for e, p in enumerate(padded):
            ref[start:start + p] = a[start:start + p] @ b[e].t()
            start += p
        return calc_diff(d, ref)

    return run, check, "fp8_gemm_1d2d"


def k_grouped(sizes, m, n):
    """Wgrad: dW[e] += A_e^T B_e over each expert's tokens (padded to 128), f32 accumulated."""
    ks = [align(s) for s in sizes]
    _, a8, b8, c, d, ref, layout, _ = generate_k_grouped_contiguous(
        E, m, n, MajorTypeAB.KMajor, MajorTypeAB.KMajor, ks, use_ue8m0=False)
    c0 = c.clone()

    def run():
        deep_gemm.k_grouped_fp8_gemm_nt_contiguous(a8, b8, d, ks, layout, c)

    def check():
        c.copy_(c0)
        run()
        return calc_diff(d, ref)

    return run, check, "fp8_gemm_1d1d"


for groups, sizes in groupings:
    cases = [
        ("gate_up", "fprop", lambda: m_grouped(sizes, 2 * I, D), R, 2 * I, D),
        ("gate_up", "dgrad", lambda: m_grouped(sizes, D, 2 * I), R, D, 2 * I),
        ("gate_up", "wgrad", lambda: k_grouped(sizes, 2 * I, D), 2 * I, D, R),
        ("down", "fprop", lambda: m_grouped(sizes, D, I), R, D, I),
        ("down", "dgrad", lambda: m_grouped(sizes, I, D), R, I, D),
        ("down", "wgrad", lambda: k_grouped(sizes, D, I), D, I, R),
    ]
    for gemm, role, make, M, N, K in cases:
        if role not in args.roles.split(","):
            continue
        try:
            run, check, kernel = make()
            diff = check()
            t = bench_kineto(run, kernel, num_tests=30, suppress_kineto_output=True, flush_l2=False)
            print(json.dumps({"deepgemm_fp8": gemm, "role": role, "groups": groups, "ms": round(t * 1e3, 4),
                              "tflops": round(2 * M * N * K / t / 1e12, 1), "diff": float(f"{diff:.3g}"), **variant}),
                  flush=True)
        except Exception as ex:  # a role this build does not take: say so and go on
            print(json.dumps({"deepgemm_fp8": gemm, "role": role, "groups": groups, "error": str(ex)[:300]}),
                  flush=True)
        torch.cuda.empty_cache()
