#!/usr/bin/env python3
"""Every launch, in order, from `ncu --csv --page raw --metrics gpu__time_duration.sum`: its kernel,
grid and time, then per kernel name the launches' count, sum, median and largest.

Used by scripts/gpu-sm90.sh (step ncu-times, NCU_TIMES="regex") to see whether some launches of a
kernel in the training step take much longer than the others (the step's profile sums them per
name). Usage: python3 scripts/ncu-times.py ncu.csv
"""
import statistics
import sys
from collections import defaultdict

from ncu_csv import Launches


def main(path: str) -> None:
    ncu = Launches(path)
    if not ncu.rows:
        print(f"no launches in {path}")
        return
    name_col, grid_col = ncu.col["Kernel Name"], ncu.col.get("Grid Size")
    per = defaultdict(list)
    print(f"{'launch':>6} {'us':>9}  {'grid':<14} kernel")
    for i, r in enumerate(ncu.rows):
        try:
            us = ncu.value(r, "gpu__time_duration.sum") * 1e6
        except (ValueError, IndexError):
            continue
        name = r[name_col][:70]
        per[name].append(us)
        print(f"{i:>6} {us:>9.1f}  {(r[grid_col] if grid_col is not None else ''):<14} {name}")
    print(f"\n{'launches':>8} {'sum us':>9} {'median':>8} {'largest':>8}  kernel")
    for name, ts in sorted(per.items(), key=lambda kv: -sum(kv[1])):
        print(f"{len(ts):>8} {sum(ts):>9.1f} {statistics.median(ts):>8.1f} {max(ts):>8.1f}  {name}")


if __name__ == "__main__":
    main(sys.argv[1])
