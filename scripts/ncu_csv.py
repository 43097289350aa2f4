"""Reading `ncu --csv --page raw` output, for scripts/ncu-bytes.py and scripts/ncu-times.py.

The raw page is a header row of column names, a row of units, then one row per profiled launch;
numbers may carry thousands separators. Values come back in base units (bytes, seconds).
"""
import csv

SCALE = {"": 1, "byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9,
         "nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1, "ns": 1e-9, "us": 1e-6, "ms": 1e-3}


class Launches:
    """The launches of one ncu CSV: `rows` (one list of cells per launch), `col` (column index by
    name) and `value(row, metric)` in base units."""

    def __init__(self, path: str) -> None:
        rows = list(csv.reader(line for line in open(path, errors="replace") if line.startswith('"')))
        head, self.units = (rows[0], rows[1]) if len(rows) >= 2 else ([], [])
        self.col = {name: i for i, name in enumerate(head)}
        self.rows = rows[2:]

    def value(self, row: list, metric: str) -> float:
        i = self.col[metric]
        return float(row[i].replace(",", "")) * SCALE.get(self.units[i], 1)
