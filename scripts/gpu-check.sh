#!/usr/bin/env bash
# GPU verification of the cuda backend (issue 9), to run on the NVIDIA machine from the repository
# root with bun on PATH (no Node or npm needed). Everything it writes goes under $OUT (default
# ./gpu-check-out). Each step prints a header; the script exits non-zero if any step failed.
#   bash scripts/gpu-check.sh
set -u
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export MOE8_CACHE_DIR="${MOE8_CACHE_DIR:-$OUT/kernel-cache}"
fail=0
step() { echo; echo "=== $* ==="; }

# CUDA user-space libraries (NVRTC, cuBLASLt) that are not on the loader path: find them.
if [ -z "${MOE8_CUDA_LIB_DIR:-}" ]; then
  dirs=$(find / -xdev \( -name 'libnvrtc.so.13' -o -name 'libcublasLt.so.13' \) -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ':')
  export MOE8_CUDA_LIB_DIR="${dirs%:}"
  export LD_LIBRARY_PATH="${MOE8_CUDA_LIB_DIR}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
echo "MOE8_CUDA_LIB_DIR=$MOE8_CUDA_LIB_DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"

step "doctor"
bun apps/trainer/src/cli.ts doctor 2>&1 | tee "$OUT/doctor.txt" || fail=1
bun apps/trainer/src/cli.ts doctor --json > "$OUT/doctor.json" 2>&1 || true

step "cuda op suite (MOE8_POISON=1, MOE8_REQUIRE_CUDA=1)"
export MOE8_POISON=1 MOE8_REQUIRE_CUDA=1
suite_ok=0
# 1) bun's own runner (it maps `vitest` imports to bun:test); 2) vitest under bun; 3) the smoke script.
if (bun test --timeout 300000 packages/kernels/test/cuda-op-suite.test.ts 2>&1 | tee "$OUT/op-suite-bun-test.txt"; exit "${PIPESTATUS[0]}"); then
  suite_ok=1
else
  echo "bun test failed or unsupported; trying vitest under bun"
  if (cd packages/kernels && bun --bun ./node_modules/.bin/vitest run test/cuda-op-suite.test.ts 2>&1 | tee "$OUT/op-suite-vitest.txt"; exit "${PIPESTATUS[0]}"); then
    suite_ok=1
  fi
fi
if [ "$suite_ok" != 1 ]; then fail=1; fi
step "cuda smoke (independent comparison with ts, bun only)"
bun packages/kernels/test/cuda-smoke.ts 2>&1 | tee "$OUT/smoke.txt" || fail=1
unset MOE8_POISON MOE8_REQUIRE_CUDA

step "train tiny on cuda, 20 steps"
bun apps/trainer/src/cli.ts train --backend cuda --steps 20 --out "$OUT/run-cuda" 2>&1 | tee "$OUT/train.txt" || fail=1

if command -v compute-sanitizer >/dev/null 2>&1; then
  step "compute-sanitizer memcheck, one training step (caching allocator off)"
  MOE8_CUDA_CACHE=0 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 3 \
    bun apps/trainer/src/cli.ts train --backend cuda --steps 1 --out "$OUT/run-sanitizer" 2>&1 | tail -200 | tee "$OUT/sanitizer.txt" || fail=1
else
  echo "compute-sanitizer not found: skipped"
fi

step "summary"
echo "artifacts in $OUT"
[ "$fail" = 0 ] && echo "gpu-check: all steps passed" || echo "gpu-check: some steps FAILED"
exit "$fail"
