#!/usr/bin/env python3
"""Expert balance of training runs, from their metrics.jsonl (docs/model.md, "Balancing").

usage: python3 scripts/load-summary.py RUN_DIR... [--from N]

One line per run: the worst MoE layer's load max/mean per step (`load_max_over_mean`) from step N
on (default 50): its max, mean and 95th percentile and the steps above 1.5; idle experts after
step N (the sum over steps of `load_idle_experts`, and on how many steps); the last validation loss.
"""
import json
import sys

args = sys.argv[1:]
start = 50
if "--from" in args:
    i = args.index("--from")
    start = int(args[i + 1])
    del args[i : i + 2]
if not args:
    sys.exit(__doc__)
for run in args:
    rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl") if line.strip()]
    late = sorted(r["load_max_over_mean"] for r in rows if r["step"] >= start and "load_max_over_mean" in r)
    if not late:
        print(f"{run}: no step from {start} on")
        continue
    idle = [r.get("load_idle_experts", 0) for r in rows if r["step"] > start]
    p95 = late[round(0.95 * (len(late) - 1))]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    val_text = f"val_loss {val[-1]:.4f}" if val else "no val_loss"
    print(
        f"{run}: steps {rows[-1]['step']}, load max/mean from step {start}: max {late[-1]:.2f}"
        f" mean {sum(late) / len(late):.3f} p95 {p95:.2f}, {sum(x > 1.5 for x in late)} steps above 1.5;"
        f" idle experts {sum(idle)} on {sum(i > 0 for i in idle)} steps; {val_text}"
    )
