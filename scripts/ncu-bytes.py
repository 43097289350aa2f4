#!/usr/bin/env python3
"""Per kernel name, from `ncu --csv --page raw --metrics gpu__time_duration.sum,dram__bytes_read.sum,
dram__bytes_write.sum`: launches, time, DRAM bytes and achieved bandwidth, largest time first.

Used by scripts/gpu-sm90.sh (step ncu-bytes) to tell which memory-bound kernels of the training
step are far from the HBM's bandwidth. Usage: python3 scripts/ncu-bytes.py ncu.csv
"""
import sys
from collections import defaultdict

from ncu_csv import Launches


def main(path: str) -> None:
    ncu = Launches(path)
    if not ncu.rows:
        print(f"no kernels in {path}")
        return
    name_col, value = ncu.col["Kernel Name"], ncu.value

    acc = defaultdict(lambda: [0, 0.0, 0.0])
    for r in ncu.rows:
        try:
            t = value(r, "gpu__time_duration.sum")
            b = value(r, "dram__bytes_read.sum") + value(r, "dram__bytes_write.sum")
        except (ValueError, IndexError):
            continue
        a = acc[r[name_col][:60]]
        a[0] += 1
        a[1] += t
        a[2] += b
    total = sum(a[1] for a in acc.values())
    print(f"{'kernel':<60} {'launches':>8} {'ms':>8} {'ms/launch':>9} {'MB/launch':>9} {'TB/s':>6}")
    for name, (n, t, b) in sorted(acc.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:<60} {n:>8} {t * 1e3:>8.3f} {t * 1e3 / n:>9.4f} {b / n / 1e6:>9.2f} {b / t / 1e12:>6.2f}")
    print(f"{'all':<60} {sum(a[0] for a in acc.values()):>8} {total * 1e3:>8.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
