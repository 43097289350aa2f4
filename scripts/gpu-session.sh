#!/usr/bin/env bash
# One GPU-machine session (see README "GPU"): unpack bun and the production node_modules carried in
# .gpu-bundle, run the cuda checks (scripts/gpu-check.sh) and the Hugging Face checkpoint check.
set -u
xz -dc .gpu-bundle/bun.xz > /tmp/bun && chmod +x /tmp/bun && export PATH=/tmp:$PATH
[ -f .gpu-bundle/nm.tar.xz ] && xz -dc .gpu-bundle/nm.tar.xz | tar -xf -
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
bash scripts/gpu-check.sh; rc=$?
echo; echo "=== Hugging Face transformers loads a checkpoint (cpu backend run, fp32 eval) ==="
ck="$OUT/run-cpu"
bun apps/trainer/src/cli.ts train --backend cpu --steps 30 --batch-size 4 --seq-len 64 --eval-every 0 --out "$ck" > "$OUT/hf-train.txt" 2>&1
dir=$(ls -d "$ck"/checkpoints/step-* | tail -1)
bun scripts/dump-windows.ts datasets/default 64 4 "$OUT/windows.bin"
bun apps/trainer/src/cli.ts eval --checkpoint "$dir" --data datasets/default --batches 1 --batch-size 4 --precision fp32 --backend cpu --json | tee "$OUT/eval-moe8.json"
python3 scripts/hf_check.py "$dir" "$OUT/windows.bin" 64 2>"$OUT/hf-stderr.txt" | tee "$OUT/eval-hf.json"
exit $rc
