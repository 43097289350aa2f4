#!/usr/bin/env bash
# Several GPUs of one machine (issue 22), in one device call: run from the repository root by
# `bash scripts/gpu-session.sh multi` (which puts bun and node_modules in place) on a kind with two
# or more GPUs. small on cuda for MULTI_STEPS steps (300) as one process, as `--gpus N` (data
# parallel, N = every GPU, or MULTI_GPUS), as `--gpus N --expert-parallel` and, with 4 or more GPUs,
# as `--gpus N --expert-parallel N/2` (two expert groups, the experts' gradients summed over them: an
# NCCL communicator split), one after another,
# then NCCL's tests on N GPUs (tests/gpus.test.ts). One JSON line per run in $OUT/multi.jsonl and a
# summary last: the loss curves against one process's (mean training loss of the last 50 steps,
# final validation loss: relative differences), tokens/s from step 20 on and the data-parallel
# scaling efficiency tokens/s(N) / (N tokens/s(1)) (issue 22's target: 0.9), and under expert
# parallelism the token exchanges' time beside the step's (logged steps: every 10th).
set -u
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
N="${MULTI_GPUS:-$gpus}"
if [ "$N" -lt 2 ]; then
  echo "multi: $gpus GPU(s) here; several GPUs are needed (a kind with two or more)"
  exit 0
fi
STEPS="${MULTI_STEPS:-300}"
export NCCL_NVLS_ENABLE=0
run() { # NAME FLAGS...
  local name=$1
  shift
  echo "=== $name: train small --steps $STEPS $* ==="
  timeout 400 bun apps/trainer/src/cli.ts train --config small --backend cuda --steps "$STEPS" \
    --eval-every "$STEPS" --log-every 10 --save-every 100000 "$@" --out "/tmp/multi-$name" \
    > "/tmp/multi-$name.log" 2>&1
  echo "    rc=$?"
  tail -3 "/tmp/multi-$name.log"
  cp "/tmp/multi-$name/metrics.jsonl" "$OUT/multi-$name-metrics.jsonl" 2>/dev/null
}
run one
run dp --gpus "$N"
run ep --gpus "$N" --expert-parallel
if [ "$N" -ge 4 ]; then run epdp --gpus "$N" --expert-parallel $((N / 2)); fi
echo "=== tests/gpus.test.ts on $N GPUs ==="
MOE8_REQUIRE_NCCL=1 timeout 300 bun test --timeout 300000 tests/gpus.test.ts 2>&1 | tail -8
python3 - "$OUT" "$N" <<'PY' | tee "$OUT/multi.jsonl"
import json, os, sys
out, n = sys.argv[1], int(sys.argv[2])
def load(name):
    p = os.path.join(out, f"multi-{name}-metrics.jsonl")
    return [json.loads(l) for l in open(p) if l.strip()] if os.path.exists(p) else []
runs = {k: load(k) for k in ("one", "dp", "ep", "epdp")}
def summary(m):
    if not m:
        return None
    late = [r["loss"] for r in m[-50:] if r.get("loss") is not None]
    tps = [r["tokens_per_s"] for r in m if r.get("step", 0) >= 20 and "tokens_per_s" in r]
    ms = [r["ms_per_step"] for r in m if r.get("step", 0) >= 20 and "ms_per_step" in r]
    ex = [r["expert_exchange_ms"] for r in m if "expert_exchange_ms" in r]
    val = [r["val_loss"] for r in m if "val_loss" in r]
    return {"steps": len(m), "loss_last50": sum(late) / len(late) if late else None,
            "val_loss": val[-1] if val else None, "tokens_per_s": sum(tps) / len(tps) if tps else None,
            "ms_per_step": sum(ms) / len(ms) if ms else None,
            "exchange_ms": sum(ex) / len(ex) if ex else None}
s = {k: summary(v) for k, v in runs.items()}
one = s["one"]
for k in ("one", "dp", "ep", "epdp"):
    r = s[k]
    if r is None and k == "epdp" and n < 4:
        continue
    if r is None:
        print(json.dumps({"run": k, "missing": True}))
        continue
    row = {"run": k, "gpus": 1 if k == "one" else n, **{x: round(y, 4) if isinstance(y, float) else y for x, y in r.items()}}
    if one and k != "one":
        for x in ("loss_last50", "val_loss"):
            if r[x] is not None and one[x]:
                row[f"{x}_vs_one"] = round(r[x] / one[x] - 1, 5)
        if r["tokens_per_s"] and one["tokens_per_s"]:
            row["scaling_efficiency"] = round(r["tokens_per_s"] / (n * one["tokens_per_s"]), 3)
    print(json.dumps(row))
PY
