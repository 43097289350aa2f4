#!/usr/bin/env bash
# Expert balance against the embedding's init std and the balancing speed (issue 23), in one device
# call: run from the repository root by `bash scripts/gpu-session.sh balance` (which puts bun and
# node_modules in place). small on cuda for SMALL_STEPS steps per std in SMALL_STDS or per
# SMALL_VARIANTS entry (one after another, or SMALL_PARALLEL at once on the one GPU), and tiny's
# default run on the cpu backend for each std in TINY_STDS and seed in TINY_SEEDS (in parallel, two
# rayon threads each; TINY_STDS=none skips them). One JSON line per run on stdout and in $OUT/balance.jsonl: the worst MoE layer's load
# max/mean at step 1 and from step 50 on (mean, max, steps above 1.5 and 2.0), idle experts from step
# 50 on, the final training and validation losses.
set -u
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
SMALL_STEPS="${SMALL_STEPS:-300}"
SMALL_STDS="${SMALL_STDS:-0.006 0.1 1.0}"
TINY_STDS="${TINY_STDS:-0.006 0.1 1.0}"
TINY_SEEDS="${TINY_SEEDS:-0 1 2}"
summary() { # RUN_DIR TAG
  python3 - "$1/metrics.jsonl" "$2" <<'PY'
import json, sys
m = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
late = [r["load_max_over_mean"] for r in m if r.get("step", 0) >= 50 and "load_max_over_mean" in r]
idle = [r.get("load_idle_experts", 0) for r in m if r.get("step", 0) >= 50]
val = [r["val_loss"] for r in m if "val_loss" in r]
# The validation batches' loads: routing without the router noise (absent in runs before it was logged).
vload = [(r["step"], round(r["val_load_max_over_mean"], 2), r.get("val_load_idle_experts")) for r in m if "val_load_max_over_mean" in r]
# Where the worst steps are: per MoE layer, the steps from 50 above 2.0, and the first and last such.
by = [r["load_max_over_mean_by_layer"] for r in m if r.get("step", 0) >= 50 and "load_max_over_mean_by_layer" in r]
spikes = [r["step"] for r in m if r.get("step", 0) >= 50 and r.get("load_max_over_mean", 0) > 2.0]
print(json.dumps({"run": sys.argv[2], "steps": len(m), "load_step1": round(m[0]["load_max_over_mean"], 2),
                  "load_from50_mean": round(sum(late) / max(len(late), 1), 3), "load_from50_max": round(max(late, default=0), 2),
                  "above_1_5": sum(x > 1.5 for x in late), "above_2": sum(x > 2.0 for x in late),
                  "idle_from50_max": max(idle, default=0), "idle_from50_steps": sum(i > 0 for i in idle),
                  "above_2_by_layer": [sum(x[l] > 2.0 for x in by) for l in range(len(by[0]))] if by else [],
                  "above_2_first_last": [spikes[0], spikes[-1]] if spikes else None,
                  "loss": round(m[-1]["loss"], 4), "val_loss": round(val[-1], 4) if val else None,
                  "val_load_step_max_idle": vload}))
PY
}
pids=()
for std in ${TINY_STDS/none/}; do
  for seed in $TINY_SEEDS; do
    echo "{\"model\": {\"base\": \"tiny\", \"embedding_init_std\": $std}}" > "/tmp/tiny-$std.json"
    ( RAYON_NUM_THREADS=2 timeout 500 bun apps/trainer/src/cli.ts train --config "/tmp/tiny-$std.json" --backend cpu \
        --seed "$seed" --out "/tmp/bal-tiny-$std-$seed" > "/tmp/bal-tiny-$std-$seed.log" 2>&1 ) &
    pids+=($!)
  done
done
# SMALL_VARIANTS: "std:gamma:rule:router_std:noise:noise_until:alpha:seed" entries (gamma, rule,
# noise, noise_until, alpha and seed as --balance.gamma/--balance.rule/--balance.noise/
# --balance.noise-until/--balance.alpha/--seed, router_std as --model.router_init_std; empty or
# missing fields keep the defaults), e.g. "0.1::", "0.1:0.02:error", "0.1:::0.018", "0.1::::2:0.5",
# "0.1::::2:1:0.1" or "0.1:::::::2" (the preset's settings, seed 2).
SMALL_VARIANTS="${SMALL_VARIANTS:-$(for s in $SMALL_STDS; do printf '%s:: ' "$s"; done)}"
# One small run (a SMALL_VARIANTS entry) and its summary line.
small_run() {
  local v=$1 std gamma rule rstd noise until alpha seed
  IFS=: read -r std gamma rule rstd noise until alpha seed <<<"$v"
  local bal=()
  [ -n "$gamma" ] && bal+=(--balance.gamma "$gamma")
  [ -n "$rule" ] && bal+=(--balance.rule "$rule")
  [ -n "$rstd" ] && bal+=(--model.router_init_std "$rstd")
  [ -n "$noise" ] && bal+=(--balance.noise "$noise")
  [ -n "$until" ] && bal+=(--balance.noise-until "$until")
  [ -n "$alpha" ] && bal+=(--balance.alpha "$alpha")
  [ -n "$seed" ] && bal+=(--seed "$seed")
  echo "{\"model\": {\"base\": \"small\", \"embedding_init_std\": $std}}" > "/tmp/small-$std.json"
  timeout "$SMALL_TIMEOUT" bun apps/trainer/src/cli.ts train --config "/tmp/small-$std.json" --backend cuda --batch-size 8 \
    --seq-len 2048 --steps "$SMALL_STEPS" --eval-every 100 --save-every 100000 "${bal[@]}" --out "/tmp/bal-small-$v" \
    > "/tmp/bal-small-$v.log" 2>&1
  summary "/tmp/bal-small-$v" "small emb $std gamma ${gamma:-default} rule ${rule:-default} router ${rstd:-default} noise ${noise:-default} until ${until:-default} alpha ${alpha:-default} seed ${seed:-default}" |
    tee -a "$OUT/balance.jsonl"
  cp "/tmp/bal-small-$v/metrics.jsonl" "$OUT/small-${v//:/_}-metrics.jsonl" 2>/dev/null
}
# SMALL_PARALLEL runs share the GPU at once (default 1): a 300-step run is ~15 s of GPU work in ~60 s
# (start, compile cache, evaluations), so several side by side take little longer than one. Each
# holds ~15 GB of device memory; their tokens/s are not measurements.
SMALL_PARALLEL="${SMALL_PARALLEL:-1}"
SMALL_TIMEOUT="${SMALL_TIMEOUT:-$((200 * SMALL_PARALLEL))}"
smalls=()
for v in $SMALL_VARIANTS; do
  small_run "$v" &
  smalls+=($!)
  if [ ${#smalls[@]} -ge "$SMALL_PARALLEL" ]; then
    wait "${smalls[0]}"
    smalls=("${smalls[@]:1}")
  fi
done
[ ${#smalls[@]} -gt 0 ] && wait "${smalls[@]}"
[ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"
for std in ${TINY_STDS/none/}; do
  for seed in $TINY_SEEDS; do
    summary "/tmp/bal-tiny-$std-$seed" "tiny emb $std seed $seed" | tee -a "$OUT/balance.jsonl"
    tail -2 "/tmp/bal-tiny-$std-$seed.log" >> "$OUT/tiny-logs.txt"
  done
done
