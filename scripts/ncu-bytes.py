#!/usr/bin/env python3
"""Per kernel name, from `ncu --csv --page raw --metrics gpu__time_duration.sum,dram__bytes_read.sum,
dram__bytes_write.sum`: launches, time, DRAM bytes and achieved bandwidth, largest time first.

Used by scripts/gpu-sm90.sh (step ncu-bytes) to tell which memory-bound kernels of the training
step are far from the HBM's bandwidth. Usage: python3 scripts/ncu-bytes.py ncu.csv
"""
import csv
import sys
from collections import defaultdict

SCALE = {"": 1, "byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9,
         "nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1, "ns": 1e-9, "us": 1e-6, "ms": 1e-3}


def main(path: str) -> None:
    rows = list(csv.reader(line for line in open(path, errors="replace") if line.startswith('"')))
    if len(rows) < 3:
        print(f"no kernels in {path}")
        return
    head, units = rows[0], rows[1]
    col = {name: i for i, name in enumerate(head)}
    name_col = col["Kernel Name"]

    def value(r, metric):
        i = col[metric]
        return float(r[i].replace(",", "")) * SCALE.get(units[i], 1)

    acc = defaultdict(lambda: [0, 0.0, 0.0])
    for r in rows[2:]:
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
