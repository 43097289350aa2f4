#!/usr/bin/env bash
# The CPU step against PyTorch fp32 eager on the same machine, back to back (issue 20's measurement):
# ROUNDS rounds (2) of `bench step --config tiny --backend cpu` under fp8, bf16 and fp32, each followed
# by the PyTorch reference (`torch_ref_moe.py tiny --device cpu --dtype fp32 --moe loop --threads T`)
# under every Python in TORCH_PYTHONS (default: `python3`; Debian's python3-torch, built on the
# system BLAS, gives the OpenBLAS baseline as /usr/bin/python3 with libopenblas0-pthread installed).
# THREADS (2) threads for both. One JSON line per run, then a table of tokens/s and ratios.
#   bash scripts/cpu-vs-torch.sh            REF=path/to/torch_ref_moe.py (default ../shared/reference)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
ROUNDS="${ROUNDS:-2}"
THREADS="${THREADS:-2}"
STEPS="${STEPS:-20}"
REF="${REF:-../shared/reference/torch_ref_moe.py}"
TORCH_PYTHONS="${TORCH_PYTHONS:-python3}"
[ -f "$REF" ] || { echo "cpu-vs-torch: $REF not found (set REF)" >&2; exit 2; }
for py in $TORCH_PYTHONS; do
  "$py" -c 'import torch' 2>/dev/null ||
    { echo "cpu-vs-torch: $py cannot import torch (TORCH_PYTHONS names the Pythons to compare with)" >&2; exit 2; }
done
out=$(mktemp)
for r in $(seq 1 "$ROUNDS"); do
  for p in fp8 bf16 fp32; do
    RAYON_NUM_THREADS="$THREADS" bun apps/trainer/src/cli.ts bench step --config tiny --backend cpu --precision "$p" \
      --steps "$STEPS" --json | grep '^{' | sed "s/^{/{\"round\":$r,\"run\":\"moe8 $p\",/" | tee -a "$out"
  done
  for py in $TORCH_PYTHONS; do
    "$py" "$REF" tiny --device cpu --dtype fp32 --moe loop --threads "$THREADS" --steps "$STEPS" 2>/dev/null |
      grep '^{' | sed "s|^{|{\"round\":$r,\"run\":\"PyTorch fp32 eager ($py)\",|" | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"\n{'round':>5}  {'run':<44} {'tokens/s':>9}  ratio to each PyTorch")
for r in sorted({x['round'] for x in rows}):
    rr = [x for x in rows if x['round'] == r]
    torch = [x for x in rr if x['run'].startswith('PyTorch')]
    for x in rr:
        ratios = ", ".join(f"{x['tokens_per_s'] / t['tokens_per_s']:.2f}x (torch {t.get('torch', '?')})" for t in torch)
        print(f"{r:>5}  {x['run']:<44} {x['tokens_per_s']:>9.0f}  {ratios if not x['run'].startswith('PyTorch') else ''}")
PY
rm -f "$out"
