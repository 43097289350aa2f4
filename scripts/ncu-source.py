"""Where a kernel's warps spend their time, from Nsight Compute's source page as CSV
(`ncu --import R.ncu-rep --page source --csv --print-source sass`): the warp-stall samples summed
per opcode, and the instructions with the most samples with their leading stall reasons.

Usage: python3 scripts/ncu-source.py wgrad-source.csv [--top 40]

The page has one row per SASS instruction: its address, its text, the sample counts (all samples,
and those where the warp issued nothing) and, where the ncu version reports them, one column per
stall reason. Column names differ between versions, so they are found by what they contain, and
the header is printed first so that a new version's names can be read off.
"""
import argparse
import csv
import re
from collections import defaultdict


def number(cell: str) -> float:
    try:
        return float(cell.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    rows = list(csv.reader(open(args.csv, errors="replace")))
    head_at = next((i for i, r in enumerate(rows) if any("Source" in c for c in r) and len(r) > 3), None)
    if head_at is None:
        raise SystemExit(f"{args.csv}: no header row with a Source column (is it --page source --csv?)")
    head, body = rows[head_at], [r for r in rows[head_at + 1 :] if len(r) == len(rows[head_at])]
    print("columns:", " | ".join(head))
    src = next(i for i, c in enumerate(head) if "Source" in c)
    addr = next((i for i, c in enumerate(head) if "Address" in c), None)
    all_s = next((i for i, c in enumerate(head) if "Sampling (All" in c), None)
    if all_s is None:
        raise SystemExit(f"{args.csv}: no 'Warp Stall Sampling (All Samples)' column")
    reasons = [i for i, c in enumerate(head) if re.match(r"(?i)stall[_ ]", c) or c.lower().startswith("smsp__pcsamp")]
    samples = [number(r[all_s]) for r in body]
    total = sum(samples) or 1.0
    print(f"{len(body)} instructions, {total:.0f} samples")

    def opcode(text: str) -> str:
        t = re.sub(r"^@!?U?P\w+\s+", "", text.strip())
        return t.split(" ")[0].split(".")[0] if t else "?"

    by_op = defaultdict(float)
    by_reason = defaultdict(float)
    for r, n in zip(body, samples):
        by_op[opcode(r[src])] += n
        for i in reasons:
            by_reason[head[i]] += number(r[i])
    print("\nsamples by opcode:")
    for op, n in sorted(by_op.items(), key=lambda x: -x[1])[:25]:
        print(f"  {op:<14} {n:>9.0f} {100 * n / total:5.1f}%")
    if by_reason:
        print("\nsamples by stall reason:")
        for name, n in sorted(by_reason.items(), key=lambda x: -x[1])[:20]:
            print(f"  {name:<48} {n:>9.0f} {100 * n / total:5.1f}%")
    print(f"\nthe {args.top} instructions with the most samples (in address order):")
    top = sorted(range(len(body)), key=lambda k: -samples[k])[: args.top]
    for k in sorted(top):
        r, n = body[k], samples[k]
        lead = sorted(((number(r[i]), head[i]) for i in reasons), reverse=True)[:3]
        why = ", ".join(f"{name} {m:.0f}" for m, name in lead if m > 0)
        where = r[addr] if addr is not None else ""
        print(f"  {where:>8} {n:>7.0f} {100 * n / total:5.1f}%  {r[src].strip()[:70]:<70} {why}")


if __name__ == "__main__":
    main()
