#!/usr/bin/env python3
"""Per kernel name, the GPU time a launch takes in `bench step --profile` (CUDA events around each
launch of an uncaptured step) against Nsight Compute's duration of the same kernel's launches
(`ncu --csv --page raw --metrics gpu__time_duration.sum` over whole steps), largest total first.

The two agree within a few microseconds a launch for every kernel of small's step. One that reads
far above its Nsight time in the profile ran on other data: the two runs time different steps, so
a grouped GEMM follows the experts' loads of each (the experts' Wgrad read ~30% above while `bench
step` repeated one batch and the router collapsed: packages/kernels/notes/sm90-gemm.md,
"Twenty-sixth session"). Used by
scripts/gpu-sm90.sh (step ncu-vs-profile). Usage: python3 scripts/ncu-vs-profile.py ncu.csv
bench-profile-small-cuda-fp8.json [rows]
"""
import json
import sys
from collections import defaultdict

from ncu_csv import Launches


def main(ncu_path: str, profile_path: str, rows: int = 30) -> None:
    ncu = Launches(ncu_path)
    name_col = ncu.col.get("Kernel Name")
    total, count = defaultdict(float), defaultdict(int)
    for r in ncu.rows if name_col is not None else []:
        name = r[name_col].split("(")[0].strip()
        total[name] += ncu.value(r, "gpu__time_duration.sum") * 1e6
        count[name] += 1
    kernels = json.load(open(profile_path))["gpu"]["kernels"]
    print(f"{'profile us/launch':>17} {'ncu us/launch':>13} {'ratio':>6} {'launches':>9}  kernel (profile's name)")
    for k in sorted(kernels, key=lambda k: -k["ms"])[:rows]:
        short = k["name"].split(".", 1)[-1]  # module.kernel -> kernel; cuBLASLt's have no Nsight twin here
        prof = 1000 * k["ms"] / k["launches"]
        if count.get(short):
            nc = total[short] / count[short]
            print(f"{prof:>17.1f} {nc:>13.1f} {prof / nc:>6.2f} {count[short]:>9}  {k['name']}")
        else:
            print(f"{prof:>17.1f} {'-':>13} {'-':>6} {'-':>9}  {k['name']}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 30)
