# PyTorch's BF16 grouped GEMM (torch._grouped_mm) in every role of small's expert GEMMs, the
# baseline of issue 16's per-role target ("at least 1.3x PyTorch's BF16 grouped GEMM at the same
# shape"). ../shared/reference/torch_op_anchors.py times the two Fprops; this adds the Dgrads and
# the Wgrads (2-D x 2-D with the offsets along K, output [E, M, N]). 64 experts, 98,304 rows
# (16,384 tokens x top-6), balanced, and with --offsets FILE also on the groups of `bench gemm
# --shape experts --json` (its "expert_offsets": the uneven loads our kernels are timed on), so that
# every ratio compares the same groups. One JSON line per role and grouping ("groups": "balanced" or
# "bench"): ms (median of CUDA-event timings) and TFLOP/s = 2 M N K / time. Run on the GPU:
# python3 packages/kernels/bench/torch_expert_roles.py [--offsets /tmp/bench-gemm.json]
import argparse
import importlib.util
import json
import os

import torch

# The CUDA-event median timer of the attention harness (packages/kernels/bench/attn/bench.py).
_spec = importlib.util.spec_from_file_location(
    "attnbench", os.path.join(os.path.dirname(os.path.abspath(__file__)), "attn", "bench.py"))
_attn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_attn)

E, R, D, I = 64, 98304, 1024, 256
dev = "cuda"
ap = argparse.ArgumentParser()
ap.add_argument("--offsets", help="a bench gemm --json output whose expert_offsets to time as well")
args = ap.parse_args()
groupings = [("balanced", torch.arange(1, E + 1, device=dev, dtype=torch.int32) * (R // E))]
if args.offsets:
    bench = json.loads(open(args.offsets).read().strip().splitlines()[-1])
    off = bench["expert_offsets"]
    if len(off) != E + 1 or off[0] != 0 or off[-1] != R:
        raise SystemExit(f"{args.offsets}: expert_offsets must be {E + 1} offsets from 0 to {R}")
    # torch._grouped_mm takes each group's end.
    groupings.append(("bench", torch.tensor(off[1:], device=dev, dtype=torch.int32)))


def rnd(*shape):
    return torch.randn(*shape, device=dev, dtype=torch.bfloat16)


# (gemm, role, call, M, N, K): Fprop/Dgrad over row segments, Wgrad A^T [M, R] x B [R, N] per expert.
x, gu, h, y = rnd(R, D), rnd(R, 2 * I), rnd(R, I), rnd(R, D)
w_gu = rnd(E, 2 * I, D)  # [E, out, in] as the model stores it
w_dn = rnd(E, D, I)
for groups, offs in groupings:
    cases = [
        ("gate_up", "fprop", lambda: torch._grouped_mm(x, w_gu.transpose(1, 2), offs=offs), R, 2 * I, D),
        ("gate_up", "dgrad", lambda: torch._grouped_mm(gu, w_gu, offs=offs), R, D, 2 * I),
        ("gate_up", "wgrad", lambda: torch._grouped_mm(gu.t(), x, offs=offs), 2 * I, D, R),
        ("down", "fprop", lambda: torch._grouped_mm(h, w_dn.transpose(1, 2), offs=offs), R, D, I),
        ("down", "dgrad", lambda: torch._grouped_mm(y, w_dn, offs=offs), R, I, D),
        ("down", "wgrad", lambda: torch._grouped_mm(y.t(), h, offs=offs), D, I, R),
    ]
    for gemm, role, fn, M, N, K in cases:
        try:
            out = fn()
            t = _attn.time_it(torch, fn, reps=20)
            print(json.dumps({"torch_grouped_bf16": gemm, "role": role, "groups": groups, "shape": list(out.shape),
                              "ms": round(t, 4), "tflops": round(2 * M * N * K / t / 1e9, 1)}))
        except Exception as ex:  # a role this torch build's grouped GEMM does not take
            print(json.dumps({"torch_grouped_bf16": gemm, "role": role, "groups": groups, "error": str(ex)[:200]}))
