#!/usr/bin/env bash
# GPU check and measurement of the Hopper grouped FP8 GEMM (gemm_sm90.cu, issue 16) in one device
# call: run from the repository root on the H200 by `bash scripts/gpu-session.sh sm90` (which puts
# bun and node_modules in place). Steps, most important first, each bounded so that the whole stays
# under BUDGET_S seconds (default 540; a step that no longer fits is reported as skipped):
#   1 doctor (which grouped-GEMM path runs)
#   2 the cuda op suite with poisoned buffers (MOE8_POISON=1), including both grouped FP8 paths
#     against the reference (test/cuda-op-suite.test.ts)
#   3 attn-bench: the attention kernels against PyTorch's SDPA (cuDNN, FlashAttention-2); bench gemm
#     --shape experts: per-role TFLOP/s of the expert GEMMs, sm90 and mma.sync; bench-quant: the FP8 quantisers at small's shapes against a device copy
#   4 bench step small: fp8 with the sm90 GEMM, fp8 with MOE8_SM90_KMAJOR=0 (kt: transposed column
#     tiles), MOE8_SM90_BN=128 (bn128), MOE8_SM90_GEMM=0 (mma), bf16; bench-gemm-bn128: the
#     experts' GEMMs on the 128 x 128 entries; ring4 and bench-gemm-ring4: MOE8_SM90_RING=4;
#     bench-gemm-bn256: every role on 128 x 256 tiles; nopp and bench-gemm-nopp: MOE8_SM90_PINGPONG=0
#     (bench-gemm-nopp on 128 x 256 tiles too); loaded and bench-gemm-loaded:
#     MOE8_SM90_WGRAD_STAGED=0 (the Wgrad's entry before the staged one); racecheck-checked: =checked
#     (racecheck-checked-experts: in expert order too; racecheck-checked-3ctas: on 3 CTAs);
#     step-variant: the small step under STEP_VARIANT="VAR=value ..." (profiled);
#     halves, bench-gemm-halves, memcheck-halves: =halves (the staged Wgrad's epilogue by halves, the
#     default before the strips); experts, bench-gemm-experts: MOE8_SM90_WGRAD_ORDER=experts; ncu-wgrad-{default,halves,loaded}:
#     Nsight Compute; ncu-wgrad-src: its stall samples per SASS instruction; ncu-times: every launch's time (NCU_TIMES);
#     ncu-vs-profile: the profile's time a launch per kernel against Nsight's (NCU_VS_PROFILE_ENV)
#   5 compute-sanitizer on the sm90 kernels (both entry points, through the op suite's sm90 tests):
#     racecheck and memcheck filtered to gemm_sm90, then to flash_sm90's fa3 kernels (racecheck-fa3,
#     memcheck-fa3); memcheck of one whole tiny training step
#   6 sample-kv: greedy cuda samples with and without the KV cache are the same text; a 300-step
#     small training run: its expert balance (issue 23)
#   7 PyTorch in the same call: grouped-GEMM anchors, then the small step eager and compiled
# STEPS="op-suite bench-gemm ..." runs only the named steps (names as in the table);
# roles-interleaved runs rounds roles-interleaved-1 .. -ROUNDS of bench gemm and PyTorch's grouped
# GEMM alternated (ROUNDS=3; IL_VARIANT="VAR=value": bench gemm under that environment in each round
# too; IL_VARIANT2 .. IL_VARIANT5: more of them; IL_GROUPS=balanced: both sides on 64 groups of 1,536 rows instead of
# the uneven ones; IL_DEEPGEMM=1: DeepGEMM's FP8 kernels as well, scripts/build-deepgemm.sh).
# Everything goes to $OUT/log.txt; JSON results to $OUT/results.jsonl; the table to $OUT/summary.txt
# and last on stdout. A prebuilt kernel cache in .gpu-cache/ (cubins.tar.xz, which
# scripts/pack-gpu-bundle.sh writes, or the cubins of python3 scripts/nvrtc-check.py --write-cache
# .gpu-cache) saves the NVRTC compile when the machine's NVRTC has the same version.
set -u
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
BUDGET_S="${BUDGET_S:-540}"
LOG="$OUT/log.txt"
RES="$OUT/results.jsonl"
: >"$LOG"
: >"$RES"
export MOE8_CACHE_DIR=/tmp/moe8-kernel-cache
mkdir -p "$MOE8_CACHE_DIR"
[ -d .gpu-cache ] && cp .gpu-cache/*.cubin "$MOE8_CACHE_DIR/" 2>/dev/null
# The same cache packed by scripts/pack-gpu-bundle.sh (a tenth of the bytes a call carries).
[ -f .gpu-cache/cubins.tar.xz ] && xz -dc .gpu-cache/cubins.tar.xz | tar -xf - -C "$MOE8_CACHE_DIR"
if [ -z "${MOE8_CUDA_LIB_DIR:-}" ]; then
  dirs=$(find / -xdev \( -name 'libnvrtc.so.13' -o -name 'libcublasLt.so.13' \) -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ':')
  export MOE8_CUDA_LIB_DIR="${dirs%:}" LD_LIBRARY_PATH="${dirs%:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
moe8() { bun apps/trainer/src/cli.ts "$@"; }
left() { echo $((BUDGET_S - SECONDS)); }
STEPS="${STEPS:-}"
picked() { [ -z "$STEPS" ] || [[ " $STEPS " == *" $1 "* ]]; }
# step NAME CAP_S MIN_S CMD...: runs CMD under a timeout of min(CAP_S, time left - 5), logging it;
# skipped when less than MIN_S seconds are left. Records {"step", "rc", "s"} in results.jsonl.
step() {
  local name=$1 cap=$2 min=$3
  shift 3
  picked "$name" || return 0
  local l
  l=$(left)
  if [ "$l" -lt "$min" ]; then
    echo "{\"step\":\"$name\",\"rc\":\"skipped\",\"s\":0}" >>"$RES"
    echo "=== $name: skipped ($l s left) ===" | tee -a "$LOG"
    return 0
  fi
  local t=$((l - 5 < cap ? l - 5 : cap)) t0=$SECONDS
  echo "=== $name (timeout $t s) ===" | tee -a "$LOG"
  timeout "$t" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "{\"step\":\"$name\",\"rc\":$rc,\"s\":$((SECONDS - t0))}" >>"$RES"
  echo "    rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
  return 0
}
# JSON lines a command printed (its output's lines starting with "{"), tagged, into results.jsonl.
# json_of FILE TAG [ROUND]: FILE's JSON lines into results.jsonl, tagged (and numbered by round).
json_of() { grep -h '^{' "$1" 2>/dev/null | sed "s/^{/{\"tag\":\"$2\",${3:+\"round\":$3,}/" >>"$RES"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$LOG" 2>&1
step doctor 30 10 bun apps/trainer/src/cli.ts doctor
moe8 doctor --json >/tmp/doctor.json 2>>"$LOG" && json_of /tmp/doctor.json doctor
# A different NVRTC than the one that built .gpu-cache: compile every module in parallel now (the
# addon would compile them one at a time as they are first used).
if ! grep -q '"nvrtc":"13.0"' /tmp/doctor.json; then
  step nvrtc-cache 150 60 python3 scripts/nvrtc-check.py --write-cache "$MOE8_CACHE_DIR"
fi

# OP_SUITE_FILTER="Quantized|quantize" runs only the tests whose names match (bun test -t): a
# verification of one kernel family in seconds instead of the whole suite's two minutes.
step op-suite 240 60 env MOE8_POISON=1 MOE8_REQUIRE_CUDA=1 \
  bun test --timeout 300000 ${OP_SUITE_FILTER:+-t "$OP_SUITE_FILTER"} packages/kernels/test/cuda-op-suite.test.ts

# The attention kernels alone (flash_sm90.cu's wgmma, flash.cu's mma.sync) against PyTorch's SDPA
# (cuDNN, FlashAttention-2) at small's shape and T = 4096, 8192 (packages/kernels/bench/attn).
step attn-bench 150 40 python3 packages/kernels/bench/attn/bench.py --out "$OUT" --reps 15
# bench_gemm NAME [VAR=VALUE ...]: step NAME runs `bench gemm --shape experts` (the experts' GEMMs,
# per role) under those environment variables; its JSON goes to the log and the results.
bench_gemm() {
  local name=$1
  shift
  step "$name" 150 40 env "$@" sh -c "bun apps/trainer/src/cli.ts bench gemm --backend cuda --shape experts --json > /tmp/$name.json"
  cat "/tmp/$name.json" >>"$LOG" 2>/dev/null
  json_of "/tmp/$name.json" "$name"
}
bench_gemm bench-gemm
# The experts' GEMMs on the 128 x 128 entries instead (two buffers; deferred epilogues along M).
bench_gemm bench-gemm-bn128 MOE8_SM90_BN=128 MOE8_SM90_WGRAD_BN=128
# The Fprop and Dgrad on the 4-stage 128 x 128 entry instead of the deep rings (6 stages storing
# BF16, 5 otherwise; MOE8_SM90_RING=4): the two measured against each other in one call.
bench_gemm bench-gemm-ring4 MOE8_SM90_RING=4
# Every role on the 128 x 256 entries, the two consumer warpgroups taking turns (bench-gemm-bn256)
# and issuing together (bench-gemm-nopp, MOE8_SM90_PINGPONG=0): measured against each other in one call.
bench_gemm bench-gemm-bn256 MOE8_SM90_BN=256
bench_gemm bench-gemm-nopp MOE8_SM90_BN=256 MOE8_SM90_PINGPONG=0 MOE8_SM90_WGRAD_STAGED=0
# The Wgrad with the consumers loading the scales (MOE8_SM90_WGRAD_STAGED=0, the entry before the
# staged one) against the default.
bench_gemm bench-gemm-loaded MOE8_SM90_WGRAD_STAGED=0
# The staged Wgrad's epilogue by halves (the default before the strips) against the default.
bench_gemm bench-gemm-halves MOE8_SM90_WGRAD_STAGED=halves
# The Wgrad's tiles taken round robin in expert order (MOE8_SM90_WGRAD_ORDER=experts, the order
# before the largest experts went first) against the default.
bench_gemm bench-gemm-experts MOE8_SM90_WGRAD_ORDER=experts
# Where the host's time per step goes (the step is bound by the host once the GPU is faster): a CPU
# profile of five small fp8 steps, as markdown (bun --cpu-prof-md) in $OUT/cpuprof.
step cpu-prof 120 40 bun --cpu-prof-md --cpu-prof-dir="$OUT/cpuprof" --cpu-prof-interval=200 \
  apps/trainer/src/cli.ts bench step --config small --backend cuda --precision fp8 --steps 5 --json
# The FP8 quantisers at small's shapes: ms and effective bandwidth against a device copy (issue 18).
step bench-quant 90 20 sh -c 'bun apps/trainer/src/cli.ts bench quant --backend cuda > /tmp/quant.txt'
cat /tmp/quant.txt >>"$LOG" 2>/dev/null
# The dense shapes of small: BF16 (cuBLASLt) and FP8 on each Hopper path (cuBLASLt, sm90), per role.
step bench-dense 150 40 sh -c 'bun apps/trainer/src/cli.ts bench gemm --backend cuda --json > /tmp/gemm-dense.json'
cat /tmp/gemm-dense.json >>"$LOG" 2>/dev/null
json_of /tmp/gemm-dense.json bench-dense
# PyTorch's BF16 grouped GEMM in every expert role (the per-role baseline of issue 16): balanced
# groups, and bench-gemm's own uneven groups when it ran (the ratios compare the same groups).
offsets=$([ -s /tmp/bench-gemm.json ] && echo "--offsets /tmp/bench-gemm.json")
step torch-roles 60 20 sh -c "python3 packages/kernels/bench/torch_expert_roles.py $offsets > /tmp/torch-roles.txt"
cat /tmp/torch-roles.txt >>"$LOG" 2>/dev/null
json_of /tmp/torch-roles.txt torch-roles
# The same two, alternated ROUNDS times (default 3): our kernels and PyTorch's run minutes apart in
# the steps above, and PyTorch's grouped GEMM moves up to ~13% from call to call while ours moves
# ~5%, so a ratio of two single runs carries the GPU's state between them. Here each round times
# ours then PyTorch's on our groups, and the summary gives per role the ratio of the medians and
# the range of the rounds' ratios.
experts_bench="bun apps/trainer/src/cli.ts bench gemm --backend cuda --shape experts --groups ${IL_GROUPS:-uneven} --json"
# IL_DEEPGEMM=1: DeepGEMM's FP8 kernels too, on the same groups in each round (the second anchor:
# packages/kernels/bench/deepgemm_expert_roles.py), built first from .gpu-bundle/deepgemm.tar.xz
# (scripts/build-deepgemm.sh); its kernels compiled by nvcc at first use (its NVRTC path could not
# find CUDA's cccl headers there).
if [ "${IL_DEEPGEMM:-0}" = 1 ] && picked roles-interleaved; then
  export DEEPGEMM_SRC=/tmp/deepgemm DG_JIT_CACHE_DIR=/tmp/deepgemm-jit DG_JIT_USE_NVRTC=0
  (STEPS="" && step deepgemm-build 300 60 bash scripts/build-deepgemm.sh build "$DEEPGEMM_SRC")
  # The _C it built comes back (stripped of debug info, ~3 MB): copied to .gpu-bundle/deepgemm-_C.so,
  # the next call skips the build.
  [ -f .gpu-bundle/deepgemm-_C.so ] || for so in "$DEEPGEMM_SRC"/deep_gemm/_C*.so; do
    [ -f "$so" ] && cp "$so" "$OUT/deepgemm-_C.so" && strip --strip-debug "$OUT/deepgemm-_C.so"
  done
fi
picked roles-interleaved && for i in $(seq 1 "${ROUNDS:-3}"); do
  (STEPS="" && step "roles-interleaved-$i" 60 20 sh -c "$experts_bench > /tmp/il-ours-$i.json &&
    python3 packages/kernels/bench/torch_expert_roles.py --offsets /tmp/il-ours-$i.json > /tmp/il-torch-$i.txt")
  json_of "/tmp/il-ours-$i.json" il-ours "$i"
  json_of "/tmp/il-torch-$i.txt" il-torch "$i"
  if [ "${IL_DEEPGEMM:-0}" = 1 ] && [ -f "$DEEPGEMM_SRC/build.log" ]; then
    (STEPS="" && step "roles-interleaved-deepgemm-$i" 240 30 env LD_PRELOAD="$(bash scripts/build-deepgemm.sh preload)" \
      sh -c "python3 packages/kernels/bench/deepgemm_expert_roles.py \
      --offsets /tmp/il-ours-$i.json > /tmp/il-deepgemm-$i.txt")
    json_of "/tmp/il-deepgemm-$i.txt" il-deepgemm "$i"
  fi
  # IL_VARIANT="VAR=value ...": our kernels under that environment too, in the same rounds (and
  # under IL_VARIANT2's, a second column).
  for n in "" 2 3 4 5; do
    var="IL_VARIANT$n"
    [ -n "${!var:-}" ] || continue
    (STEPS="" && step "roles-interleaved-variant$n-$i" 60 20 env ${!var} sh -c "$experts_bench > /tmp/il-variant$n-$i.json")
    json_of "/tmp/il-variant$n-$i.json" "il-variant$n" "$i"
  done
done

# NCCL from PyTorch's install: its version, and a communicator of one rank through every collective
# on the cuda backend (issue 22; one GPU cannot hold two NCCL ranks).
step nccl-test 240 30 env MOE8_REQUIRE_NCCL=1 bun test --timeout 300000 packages/kernels/test/nccl.test.ts tests/gpus.test.ts
# The training step replayed from a CUDA graph equals the uncaptured step bit for bit (issue 18).
step graph-test 180 40 env MOE8_REQUIRE_CUDA=1 bun test --timeout 300000 tests/cuda-graph.test.ts

for v in sm90 variant nograph kt bn128 ring4 nopp loaded halves experts mma fa2 bf16 bf16nograph; do
  picked "step-$v" || continue
  case $v in
    sm90) env=(MOE8_SM90_GEMM=1) p=fp8 prof=--profile ;;
    variant) read -ra env <<<"${STEP_VARIANT:-MOE8_SM90_GEMM=1}" && p=fp8 prof=--profile ;;
    nograph) env=(MOE8_CUDA_GRAPH=0) p=fp8 prof= ;;
    bf16nograph) env=(MOE8_CUDA_GRAPH=0) p=bf16 prof= ;;
    mma) env=(MOE8_SM90_GEMM=0) p=fp8 prof=--profile ;;
    kt) env=(MOE8_SM90_KMAJOR=0) p=fp8 prof=--profile ;;
    bn128) env=(MOE8_SM90_BN=128) p=fp8 prof=--profile ;;
    ring4) env=(MOE8_SM90_RING=4) p=fp8 prof=--profile ;;
    nopp) env=(MOE8_SM90_PINGPONG=0 MOE8_SM90_WGRAD_STAGED=0) p=fp8 prof=--profile ;;
    loaded) env=(MOE8_SM90_WGRAD_STAGED=0) p=fp8 prof=--profile ;;
    halves) env=(MOE8_SM90_WGRAD_STAGED=halves) p=fp8 prof=--profile ;;
    experts) env=(MOE8_SM90_WGRAD_ORDER=experts) p=fp8 prof=--profile ;;
    fa2) env=(MOE8_SM90_ATTENTION=0) p=fp8 prof=--profile ;;
    bf16) env=() p=bf16 prof= ;;
  esac
  step "step-$v" 150 40 env "${env[@]}" sh -c "bun apps/trainer/src/cli.ts bench step --config small --backend cuda --precision $p --steps 3 $prof --json > /tmp/step-$v.json"
  cat "/tmp/step-$v.json" >>"$LOG" 2>/dev/null
  json_of "/tmp/step-$v.json" "step-$v"
  # GPU ms per kernel class of the profiled step (the expert GEMMs, all GEMMs).
  [ -f bench-profile-small-cuda-fp8.json ] && [ "$p" = fp8 ] && python3 - "$v" bench-profile-small-cuda-fp8.json >>"$RES" <<'PY'
import json, sys
k = json.load(open(sys.argv[2]))["gpu"]["kernels"]
ms = lambda f: round(sum(x["ms"] for x in k if f(x["name"])), 2)
experts = lambda n: n.startswith(("gemm_sm90.", "gemm.gemm_fp8_tn", "gemm.gemm_fp8_tt"))
gemm = lambda n: n.startswith(("gemm", "cublasLt"))
attn = lambda n: n.startswith(("flash", "attention."))
print(json.dumps({"tag": "kernels-" + sys.argv[1], "expert_gemm_ms": ms(experts), "all_gemm_ms": ms(gemm),
                  "attention_ms": ms(attn),
                  "busy_ms": round(sum(x["ms"] for x in k), 1),
                  "top": [[x["name"], round(x["ms"], 2)] for x in sorted(k, key=lambda x: -x["ms"])[:8]]}))
# The recorded part replayed from a timed graph: per kernel, us a launch there and uncaptured.
rep = (json.load(open(sys.argv[2])).get("gpuReplayed") or {}).get("kernels", [])
eager = {x["name"]: x for x in k}
print(json.dumps({"tag": "replayed-" + sys.argv[1], "kernels": [
    [x["name"], round(1000 * x["ms"] / max(1, x["launches"]), 1),
     round(1000 * eager[x["name"]]["ms"] / max(1, eager[x["name"]]["launches"]), 1) if x["name"] in eager else None]
    for x in rep[:12]]}))
PY
  [ -f bench-profile-small-cuda-fp8.json ] && cp bench-profile-small-cuda-fp8.json "$OUT/profile-$v.json"
  rm -f bench-profile-small-cuda-fp8.json
done

if command -v compute-sanitizer >/dev/null 2>&1; then
  # The op suite's default sm90 path launches every entry point it takes (the 6- and 5-stage rings,
  # the 4-stage one for 130 groups, both Wgrads) on groups of 0, 1, 127, 128, 129 rows: about 50 s
  # under racecheck. SANITIZE_FILTER="sm90 wgmma" adds the forced paths (KMAJOR=0, BN=256, RING=4:
  # ~50 s each, more than one step's timeout).
  # racecheck takes the path with the Wgrad's former entry (MOE8_SM90_WGRAD_STAGED=0: every other
  # entry point as the default path launches it), and the default staged Wgrad through its checked
  # twin (racecheck-checked: the same protocol with every order spelled in named barriers and the
  # scales stored rather than bulk-copied), because racecheck follows neither the staged entry's
  # bar.arrive releases nor the bulk copies' completion on the full mbarrier and reports them as
  # hazards (notes/sm90-gemm.md, fifteenth and twentieth sessions). memcheck takes the default path.
  for tool in racecheck memcheck; do
    filter="sm90 wgmma equals"
    [ "$tool" = racecheck ] && filter="MOE8_SM90_WGRAD_STAGED=0 equals"
    step "$tool-sm90" 180 40 env MOE8_CUDA_CACHE=0 compute-sanitizer --tool "$tool" --kernel-name kns=sm90 \
      --error-exitcode 3 bun test --timeout 300000 -t "${SANITIZE_FILTER:-$filter}" packages/kernels/test/cuda-op-suite.test.ts
  done
  # The staged Wgrad's epilogue by halves (MOE8_SM90_WGRAD_STAGED=halves), and taking turns (=turns,
  # the default before the lag), on 3 CTAs.
  for v in halves turns; do
    step "memcheck-$v" 180 40 env MOE8_CUDA_CACHE=0 compute-sanitizer --tool memcheck --kernel-name kns=sm90 \
      --error-exitcode 3 bun test --timeout 300000 -t "MOE8_SM90_WGRAD_STAGED=$v on 3 CTAs equals" \
      packages/kernels/test/cuda-op-suite.test.ts
  done
  step racecheck-checked 180 40 env MOE8_CUDA_CACHE=0 compute-sanitizer --tool racecheck --kernel-name kns=sm90 \
    --error-exitcode 3 bun test --timeout 300000 -t "MOE8_SM90_WGRAD_STAGED=checked equals" \
    packages/kernels/test/cuda-op-suite.test.ts
  # The same on 3 CTAs: each CTA refills every stage many times (notes/sm90-gemm.md: with bulk copies
  # of the scales, the twin before the twentieth session, racecheck reported 11-14 hazards here).
  step racecheck-checked-3ctas 180 40 env MOE8_CUDA_CACHE=0 MOE8_SM90_CTAS=3 compute-sanitizer --tool racecheck \
    --kernel-name kns=sm90 --error-exitcode 3 bun test --timeout 300000 \
    -t "MOE8_SM90_WGRAD_STAGED=checked equals" packages/kernels/test/cuda-op-suite.test.ts
  # The same with the Wgrad's tiles in expert order (the order before the largest experts went first).
  step racecheck-checked-experts 180 40 env MOE8_CUDA_CACHE=0 MOE8_SM90_WGRAD_ORDER=experts compute-sanitizer \
    --tool racecheck --kernel-name kns=sm90 --error-exitcode 3 bun test --timeout 300000 \
    -t "MOE8_SM90_WGRAD_STAGED=checked equals" packages/kernels/test/cuda-op-suite.test.ts
  # Nsight Compute on one launch of the experts' gate_up Dgrad (bench gemm's 66th sm90 Fprop/Dgrad
  # launch: its Fprop takes 60): speed of light, memory, warp stalls.
  if command -v ncu >/dev/null 2>&1; then
    step ncu-dgrad 120 40 ncu --kernel-name regex:gemm_sm90_fp8_grouped --launch-skip 65 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
      --section LaunchStats --section Occupancy bun apps/trainer/src/cli.ts bench gemm --backend cuda --shape experts
  fi
  # The same on one launch of the experts' down Fprop (the 271st: gate_up's four Fprop/Dgrad
  # timings take 240), with the warp stalls per source line (SourceCounters).
  if command -v ncu >/dev/null 2>&1; then
    step ncu-down-fprop 120 40 ncu --kernel-name regex:gemm_sm90_fp8_grouped --launch-skip 270 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
      --section SourceCounters --section LaunchStats bun apps/trainer/src/cli.ts bench gemm --backend cuda --shape experts
  fi
  # The same on one launch of the experts' gate_up Wgrad (the 31st sm90 Wgrad launch: bench gemm
  # times gate_up first, 60 launches a role): the default (staged scales), by halves and loaded.
  if command -v ncu >/dev/null 2>&1; then
    for v in default:MOE8_SM90_WGRAD_STAGED=1 halves:MOE8_SM90_WGRAD_STAGED=halves loaded:MOE8_SM90_WGRAD_STAGED=0; do
      step "ncu-wgrad-${v%%:*}" 120 40 env "${v#*:}" ncu --kernel-name regex:gemm_sm90_fp8_wgrad --launch-skip 30 \
        --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section SchedulerStats --section ComputeWorkloadAnalysis --section LaunchStats --section SourceCounters \
        bun apps/trainer/src/cli.ts bench gemm --backend cuda --shape experts
    done
  fi
  # The default gate_up Wgrad's warp-stall samples per SASS instruction (Nsight's source page, the
  # 31st Wgrad launch as above; NCU_SRC_ENV="VAR=value" for another entry): $OUT/wgrad-source.csv,
  # summed by scripts/ncu-source.py.
  if command -v ncu >/dev/null 2>&1; then
    step ncu-wgrad-src 150 40 env ${NCU_SRC_ENV:-MOE8_SM90_WGRAD_STAGED=1} sh -c "ncu --kernel-name regex:gemm_sm90_fp8_wgrad --launch-skip 30 --launch-count 1 \
      --section SourceCounters --section WarpStateStats -f --export /tmp/wgrad-src \
      bun apps/trainer/src/cli.ts bench gemm --backend cuda --shape experts > /dev/null &&
      ncu --import /tmp/wgrad-src.ncu-rep --page source --csv --print-source sass > '$OUT/wgrad-source.csv' &&
      python3 scripts/ncu-source.py '$OUT/wgrad-source.csv' | tee '$OUT/wgrad-source.txt'"
  fi
  # Nsight Compute on the quantisers at the experts' shapes (bench quant: the 70th quant_tile128
  # launch is a 98,304 x 1,024 tile quantisation; the 6th requant_tile_kmajor, the experts' xs).
  if command -v ncu >/dev/null 2>&1; then
    for k in quant_tile128:70 requant_tile_kmajor:5; do
      step "ncu-${k%%:*}" 90 30 ncu --kernel-name "regex:${k%%:*}" --launch-skip "${k##*:}" --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
        --section LaunchStats bun apps/trainer/src/cli.ts bench quant --backend cuda
    done
  fi
  # Nsight Compute on one launch each of kernels of the small fp8 training step: NCU_STEP="name:skip
  # ..." runs step ncu-step-<name> (ask for it in STEPS) on the (skip+1)-th launch of <name>.
  if command -v ncu >/dev/null 2>&1; then
    for k in ${NCU_STEP:-}; do
      step "ncu-step-${k%%:*}" 120 40 ncu --kernel-name "regex:${k%%:*}" --launch-skip "${k##*:}" --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
        --section LaunchStats --section ComputeWorkloadAnalysis \
        bun apps/trainer/src/cli.ts bench step --config small --backend cuda --precision fp8 --steps 1
    done
  fi
  # The GPU time of every launch of the kernels named by the regex NCU_TIMES in one uncaptured small
  # fp8 step (after the bench's warm-up step), at the GPU's own clocks: whether some launches of a
  # kernel take much longer than others (the profile sums them per name), under NCU_TIMES_ENV
  # ("NAME=value ..."). $OUT/ncu-times.txt.
  if command -v ncu >/dev/null 2>&1 && [ -n "${NCU_TIMES:-}" ]; then
    step ncu-times 150 40 env ${NCU_TIMES_ENV:-} sh -c "MOE8_CUDA_GRAPH=0 ncu --csv --page raw --clock-control none --cache-control none \
      --metrics gpu__time_duration.sum --kernel-name 'regex:$NCU_TIMES' \
      bun apps/trainer/src/cli.ts bench step --config small --backend cuda --precision fp8 --steps 1 \
      > /tmp/ncu-times.csv 2>/dev/null; python3 scripts/ncu-times.py /tmp/ncu-times.csv | tee '$OUT/ncu-times.txt'"
  fi
  # Per kernel, the GPU time a launch takes in the profiled step (CUDA events around each launch)
  # against Nsight Compute's duration of its launches in uncaptured small fp8 steps, under
  # NCU_VS_PROFILE_ENV ("NAME=value ..."): which kernels the profile puts above their own time (the
  # two runs time different steps: a grouped GEMM follows each step's expert loads; notes/sm90-gemm.md,
  # twenty-sixth session).
  # $OUT/ncu-vs-profile.txt. Only when STEPS names it (it takes a minute or two).
  if command -v ncu >/dev/null 2>&1 && [[ " $STEPS " == *" ncu-vs-profile "* ]]; then
    step ncu-vs-profile 240 60 env ${NCU_VS_PROFILE_ENV:-} sh -c "bun apps/trainer/src/cli.ts bench step --config small \
      --backend cuda --precision fp8 --steps 3 --profile --json > /dev/null && cp bench-profile-small-cuda-fp8.json /tmp/nvp.json &&
      MOE8_CUDA_GRAPH=0 ncu --csv --page raw --clock-control none --cache-control none --metrics gpu__time_duration.sum \
      bun apps/trainer/src/cli.ts bench step --config small --backend cuda --precision fp8 --steps 1 > /tmp/nvp.csv 2>/dev/null;
      python3 scripts/ncu-vs-profile.py /tmp/nvp.csv /tmp/nvp.json | tee '$OUT/ncu-vs-profile.txt'"
  fi
  # Every kernel of one uncaptured small fp8 step (the first, after a warm-up step outside the
  # profile): its time and DRAM bytes, as achieved bandwidth per kernel name (which of the
  # memory-bound kernels are far from the HBM's ~4.8 TB/s). Table in $OUT/ncu-bytes.txt.
  if command -v ncu >/dev/null 2>&1; then
    step ncu-bytes 240 90 sh -c 'MOE8_CUDA_GRAPH=0 ncu --csv --page raw --cache-control all \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
      --launch-skip 900 --launch-count 1400 \
      bun apps/trainer/src/cli.ts bench step --config small --backend cuda --precision fp8 --steps 2 \
      > /tmp/ncu-bytes.csv 2>/tmp/ncu-bytes.err; python3 scripts/ncu-bytes.py /tmp/ncu-bytes.csv > "$OUT/ncu-bytes.txt";
      cat "$OUT/ncu-bytes.txt"'
  fi
  # Nsight Compute's detailed sections on the first NCU_COUNT launches (40) of the kernels named by
  # the regex NCU_KERNELS in one uncaptured small fp8 step: $OUT/ncu-kernels.txt.
  if command -v ncu >/dev/null 2>&1 && [ -n "${NCU_KERNELS:-}" ]; then
    step ncu-kernels 300 90 sh -c "MOE8_CUDA_GRAPH=0 ncu --kernel-name 'regex:$NCU_KERNELS' --launch-count ${NCU_COUNT:-40} \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
      --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
      bun apps/trainer/src/cli.ts bench step --config small --backend cuda --precision fp8 --steps 1 \
      > '$OUT/ncu-kernels.txt' 2>&1; tail -5 '$OUT/ncu-kernels.txt'"
  fi
  # The Hopper attention kernels (flash_sm90.cu), through the op suite's tensor-core attention cases.
  attn_tests=(bun test --timeout 300000 -t "tensor-core head sizes" packages/kernels/test/cuda-op-suite.test.ts)
  for tool in racecheck memcheck; do
    step "$tool-fa3" 120 40 env MOE8_CUDA_CACHE=0 compute-sanitizer --tool "$tool" --kernel-name kns=fa3 \
      --error-exitcode 3 "${attn_tests[@]}"
  done
  step memcheck-step 150 60 env MOE8_CUDA_CACHE=0 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 3 \
    bun apps/trainer/src/cli.ts train --backend cuda --steps 1 --out /tmp/run-memcheck
  # Shared-memory hazards in every kernel one tiny training step launches but cuBLAS's own (nvjet_*:
  # racecheck reports its warp-specialised kernels' barrier-ordered accesses as races). Filtered in
  # the report, not by --kernel-name-exclude: with that the sanitizer itself faulted (call 5).
  step racecheck-step 150 60 sh -c 'env MOE8_CUDA_CACHE=0 compute-sanitizer --tool racecheck \
    bun apps/trainer/src/cli.ts train --backend cuda --steps 1 --out /tmp/run-racecheck > /tmp/racecheck.txt 2>&1;
    cat /tmp/racecheck.txt; grep -q "done at step 1" /tmp/racecheck.txt &&
    ! grep "Race reported" /tmp/racecheck.txt | grep -v nvjet_ | grep -q .'

else
  echo '{"step":"sanitizer","rc":"not installed","s":0}' >>"$RES"
fi

# KV-cache decode on cuda (RoPE from a start position, attention with fewer queries than keys):
# greedy samples of a briefly trained tiny model with and without the cache must be the same text.
step sample-kv 120 40 sh -c "bun apps/trainer/src/cli.ts train --backend cuda --steps 30 --save-every 30 \
  --eval-every 30 --out /tmp/run-kv > /tmp/kv-train.txt 2>&1 && ck=\$(ls -d /tmp/run-kv/checkpoints/step-* | tail -1) && \
  for c in '' --no-kv-cache; do bun apps/trainer/src/cli.ts sample --backend cuda --checkpoint \$ck \
  --prompt 'The ' --tokens 100 --num-samples 3 --temperature 0 \$c > /tmp/kv-sample\$c.txt 2>>/tmp/kv-err.txt || { cat /tmp/kv-err.txt; exit 1; }; done; \
  tail -5 /tmp/kv-sample.txt; cmp /tmp/kv-sample.txt /tmp/kv-sample--no-kv-cache.txt && echo 'sample-kv: identical'"

# Expert balance of a 300-step small run with the default balancing (issue 23): the worst MoE
# layer's load max/mean and the idle experts from step 50 on, from its metrics.jsonl.
step balance-small 200 90 sh -c "bun apps/trainer/src/cli.ts train --config small --backend cuda --steps 300 \
  --eval-every 100 --save-every 300 --out /tmp/run-balance > /tmp/balance.txt 2>&1"
if [ -f /tmp/run-balance/metrics.jsonl ]; then
  cp /tmp/run-balance/metrics.jsonl "$OUT/balance-small-metrics.jsonl"
  cp /tmp/run-balance/*.svg "$OUT/" 2>/dev/null
  python3 - /tmp/run-balance/metrics.jsonl >>"$RES" <<'PY'
import json, sys
m = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
late = [r for r in m if r.get("step", 0) >= 50 and "load_max_over_mean" in r]
val = [r["val_loss"] for r in m if "val_loss" in r]
print(json.dumps({"tag": "balance-small", "steps": len(m),
                  "load_max_over_mean_step1": m[0].get("load_max_over_mean") if m else None,
                  "worst_from_50": max((r["load_max_over_mean"] for r in late), default=None),
                  "mean_from_50": round(sum(r["load_max_over_mean"] for r in late) / max(len(late), 1), 3),
                  "idle_from_50": max((r.get("load_idle_experts", 0) for r in late), default=None),
                  "final_loss": m[-1].get("loss") if m else None, "val_loss": val[-1] if val else None}))
PY
fi

ref=$(ls .gpu-bundle/torch_ref_moe.py 2>/dev/null)
if [ -f .gpu-bundle/torch_op_anchors.py ] && picked torch-anchors; then
  step torch-anchors 90 30 sh -c 'python3 .gpu-bundle/torch_op_anchors.py > /tmp/anchors.txt'
  cat /tmp/anchors.txt >>"$LOG" 2>/dev/null
  json_of /tmp/anchors.txt torch-anchors
fi
if [ -n "$ref" ]; then
  step torch-eager 120 45 sh -c "python3 $ref small --steps 10 > /tmp/torch-eager.txt"
  json_of /tmp/torch-eager.txt torch-eager
  # It has taken 54-60 s on the H200 (compile included): skipped only when under 90 s are left.
  step torch-compile 300 90 sh -c "python3 $ref small --compile --steps 10 > /tmp/torch-compile.txt"
  json_of /tmp/torch-compile.txt torch-compile
fi

# The table: step status, per-role TFLOP/s of the expert GEMMs, the small step before and after.
python3 - "$RES" <<'PY' | tee "$OUT/summary.txt"
import json, os, sys
from statistics import median
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("\n--- sm90 grouped FP8 GEMM: GPU session summary ---")
for r in rows:
    if "step" in r:
        print(f"step {r['step']:<16} rc {r['rc']!s:<8} {r['s']} s")
doc = next((r for r in rows if r.get("tag") == "doctor"), {})
print("grouped GEMM path:", (doc.get("cuda") or {}).get("groupedGemm"))
for line in open(sys.argv[1].replace("results.jsonl", "log.txt"), errors="replace"):
    if line.startswith("grouped FP8 ") or "SUMMARY" in line or "Sanitizer Error" in line:
        print(line.rstrip()[:200])
# PyTorch on the bench's own groups where it ran them ("bench"), else on balanced ones.
torch_on = {(r["torch_grouped_bf16"], r["role"], r.get("groups", "balanced")): r.get("tflops")
            for r in rows if r.get("tag") == "torch-roles"}
torch = {(g, role): torch_on.get((g, role, "bench")) or v for (g, role, grp), v in torch_on.items() if grp == "balanced"}
tagged = lambda tag: any(r.get("tag") == tag and r.get("rows") for r in rows)
# Tables only for the benches that ran.
if tagged("bench-gemm"):
  # "f32 out": Fprop/Dgrad storing f32; "fp8 out": quantised to FP8 in the epilogue; "acc": the Wgrad adding into the weight gradient, as the step
  # runs it (fp8 / bf16).
  print(f"\n{'expert GEMM':<44} {'role':<6} {'fp8 kernel':<11} {'fp8 TF/s':>8} {'f32 out':>8} {'fp8 out':>8} {'mma TF/s':>8} "
        f"{'bf16 TF/s':>9} {'fp8 ms':>7} {'torch TF/s':>10} {'x torch':>7} {'torch bal':>9} {'acc fp8/bf16':>13}")
for r in rows:
    if r.get("tag") == "bench-gemm":
        for x in r.get("rows", []):
            g = "gate_up" if "512x1024" in x["gemm"] else "down"
            t, bal = torch.get((g, x["role"])), torch_on.get((g, x["role"], "balanced"))
            print(f"{x['gemm'][:44]:<44} {x['role']:<6} {x.get('fp8_kernel', '-'):<11} {x['fp8_tflops']:>8} "
                  f"{x.get('fp8_f32_out_tflops', '-')!s:>8} {x.get('fp8_fp8_out_tflops', '-')!s:>8} "
                  f"{x.get('mma_sync_tflops', '-')!s:>8} {x['bf16_tflops']:>9} "
                  f"{x['fp8_ms']:>7} {t!s:>10} "
                  f"{round(x['fp8_tflops'] / t, 2) if t else '-'!s:>7} {bal!s:>9} "
                  f"{str(x.get('fp8_accumulate_tflops', '-')) + ' / ' + str(x.get('bf16_accumulate_tflops', '-')):>13}")
if tagged("bench-dense"):
  print(f"\n{'dense GEMM':<20} {'role':<6} {'chosen':<11} {'fp8 TF/s':>8} {'cuBLASLt':>8} {'sm90':>8} {'bf16':>8} {'fp8/bf16':>8}")
for r in rows:
    if r.get("tag") == "bench-dense":
        for x in r.get("rows", []):
            if x["gemm"].startswith("experts"):
                continue
            print(f"{x['gemm'][:20]:<20} {x['role']:<6} {x.get('fp8_kernel', '-'):<11} {x['fp8_tflops']:>8} "
                  f"{x.get('fp8_cublaslt_tflops', '-')!s:>8} {x.get('fp8_sm90_tflops', '-')!s:>8} {x['bf16_tflops']:>8} "
                  f"{x['fp8_vs_bf16']:>8}")
# The interleaved rounds: per role the medians of ours and PyTorch's (on our groups) and the
# range of the rounds' own ratios.
# (IL_VARIANT .. IL_VARIANT5: one column each, named by its environment.)
ours_il, torch_il = {}, {}
ours_acc = {}  # our Wgrads accumulating into f32, per round (beside DeepGEMM's, which always does)
variants_il = {f"il-variant{n}": {} for n in ("", "2", "3", "4", "5")}
for r in rows:
    if r.get("tag") == "il-ours" or r.get("tag") in variants_il:
        for x in r.get("rows", []):
            if x["gemm"].startswith("experts"):
                g = "gate_up" if "512x1024" in x["gemm"] else "down"
                into = ours_il if r["tag"] == "il-ours" else variants_il[r["tag"]]
                into.setdefault((g, x["role"]), {})[r["round"]] = x["fp8_tflops"]
                if r["tag"] == "il-ours" and "fp8_accumulate_tflops" in x:
                    ours_acc.setdefault((g, x["role"]), []).append(x["fp8_accumulate_tflops"])
    elif r.get("tag") == "il-torch" and r.get("groups") == "bench" and r.get("tflops"):
        torch_il.setdefault((r["torch_grouped_bf16"], r["role"]), {})[r["round"]] = r["tflops"]
if ours_il and torch_il:
    # (Three decimals: 1.295 is under issue 16's 1.3x, which two would print as 1.30.)
    print(f"\n{'interleaved rounds':<20} {'role':<6} {'rounds':>6} {'moe8 TF/s':>10} {'torch TF/s':>10} {'ratio':>6} "
          f"{'by round':>12} {'>= 1.3':>6}"
          + "".join(f" {'v' + (tag[10:] or '1') + ' TF/s':>9} {'ratio':>6}" for tag, d in variants_il.items() if d))
    for key, o in ours_il.items():
        t = torch_il.get(key, {})
        both = sorted(set(o) & set(t))
        if not both:
            continue
        ratios = [o[i] / t[i] for i in both]
        mo, mt = median(o[i] for i in both), median(t[i] for i in both)
        cols = ""
        for d in (d for d in variants_il.values() if d):
            v = [d.get(key, {})[i] for i in both if i in d.get(key, {})]
            cols += f" {median(v):>9.1f} {median(v) / mt:>6.3f}" if v else f" {'-':>9} {'-':>6}"
        print(f"{key[0]:<20} {key[1]:<6} {len(both):>6} {mo:>10.1f} {mt:>10.1f} {mo / mt:>6.3f} "
              f"{min(ratios):>5.3f}-{max(ratios):.3f} {'yes' if mo / mt >= 1.3 else 'no':>6}" + cols)
    for n in ("", "2", "3", "4", "5"):
        if variants_il[f"il-variant{n}"]:
            print(f"  v{n or '1'}: {os.environ.get('IL_VARIANT' + n, '')}")
# IL_DEEPGEMM=1: DeepGEMM's FP8 kernels on the same groups, per role the medians over the rounds
# (its Wgrad accumulates into f32, so ours is given both storing and accumulating).
dg_il = {}
for r in rows:
    if r.get("tag") == "il-deepgemm" and r.get("groups") == "bench" and r.get("tflops"):
        dg_il.setdefault((r["deepgemm_fp8"], r["role"]), []).append(r["tflops"])
    elif r.get("tag") == "il-deepgemm" and r.get("error"):
        print(f"deepgemm {r['deepgemm_fp8']} {r['role']}: {r['error']}")
if dg_il:
    print(f"\n{'DeepGEMM, same groups':<22} {'role':<6} {'DeepGEMM':>9} {'torch':>7} {'DG/torch':>8} {'moe8':>7} "
          f"{'moe8/DG':>7} {'moe8 acc':>8} {'acc/DG':>6}")
    for key, d in dg_il.items():
        dg = median(d)
        t = median(torch_il.get(key, {}).values()) if torch_il.get(key) else float("nan")
        o = median(ours_il.get(key, {}).values()) if ours_il.get(key) else float("nan")
        a = median(ours_acc[key]) if key in ours_acc else None
        print(f"{key[0]:<22} {key[1]:<6} {dg:>9.1f} {t:>7.1f} {dg / t:>8.3f} {o:>7.1f} {o / dg:>7.3f} "
              + (f"{a:>8.1f} {a / dg:>6.3f}" if a else f"{'-':>8} {'-':>6}"))
print()
for r in rows:
    for tag, what in (("bench-gemm-bn128", "128x128 entries"), ("bench-gemm-ring4", "4-stage ring"),
                      ("bench-gemm-bn256", "128x256 ping-pong"), ("bench-gemm-nopp", "128x256 together"),
                      ("bench-gemm-loaded", "Wgrad loaded scales"), ("bench-gemm-halves", "Wgrad epilogue by halves"),
                      ("bench-gemm-experts", "Wgrad in expert order")):
        if r.get("tag") == tag:
            for x in r.get("rows", []):
                print(f"{what}: {x['gemm'][:44]:<44} {x['role']:<6} {x['fp8_tflops']:>8} TF/s")
for v in ("sm90", "variant", "nograph", "kt", "bn128", "ring4", "nopp", "loaded", "halves", "experts", "mma", "fa2", "bf16",
          "bf16nograph"):
    s = next((r for r in rows if r.get("tag") == f"step-{v}"), None)
    k = next((r for r in rows if r.get("tag") == f"kernels-{v}"), {})
    if s:
        print(f"small step {v:<5} {s.get('tokens_per_s')} tokens/s, {s.get('ms_per_step')} ms/step, "
              f"expert GEMMs {k.get('expert_gemm_ms', '-')} ms, all GEMMs {k.get('all_gemm_ms', '-')} ms of GPU time, "
              f"CUDA graph {s.get('cuda_graph')}, host {s.get('host_ms_per_step')} ms/step, peak {s.get('peak_device_mb')} MB")
        if "expert_load_max_over_mean" in s:
            print(f"    expert load, largest over mean (layers' mean / worst): first step "
                  f"{s.get('expert_load_first_max_over_mean')} / {s.get('expert_load_first_worst')}, profiled step "
                  f"{s['expert_load_max_over_mean']} / {s.get('expert_load_worst')}")
        classes = {key[7:]: val for key, val in s.items() if key.startswith("gpu_ms_")}
        if classes:
            print("    GPU ms by class:", ", ".join(f"{c} {m}" for c, m in classes.items()))
        rep = next((r for r in rows if r.get("tag") == f"replayed-{v}"), {}).get("kernels")
        if rep:
            print("    replayed graph against uncaptured, us a launch:",
                  "; ".join(f"{n.split('.')[-1]} {a} / {b}" for n, a, b in rep[:8]))
        if "gpu_busy_ms" in s:
            print(f"    GPU busy {s['gpu_busy_ms']} ms of a {s.get('gpu_span_ms')} ms span, "
                  f"{s.get('gpu_launches')} launches; host's last launch at {s.get('host_launch_ms', '-')} ms")
for t in ("torch-eager", "torch-compile"):
    for r in rows:
        if r.get("tag") == t:
            print(f"{t:<13} {r.get('tokens_per_s')} tokens/s, {r.get('step_ms')} ms/step, peak "
                  f"{r.get('peak_mem_gib')} GiB (PyTorch {r.get('torch')}, loss {r.get('loss')})")
for r in rows:
    if r.get("tag") == "balance-small":
        print("balance-small", json.dumps({k: v for k, v in r.items() if k != "tag"}))
for r in rows:
    if r.get("tag") == "torch-anchors" and "attn" not in r:
        print("torch-anchors", json.dumps({k: v for k, v in r.items() if k != "tag"})[:200])
# The targets' ratios, from numbers measured in this call only.
tps = {t: next((r.get("tokens_per_s") for r in rows if r.get("tag") == t), None)
       for t in ("step-sm90", "step-bf16", "torch-eager", "torch-compile", "step-nograph", "step-bf16nograph")}
ratio = lambda a, b: f"{tps[a] / tps[b]:.3f}x" if tps[a] and tps[b] else "-"
print(f"\nratios in this call: fp8 / torch.compile {ratio('step-sm90', 'torch-compile')}, fp8 / our bf16 "
      f"{ratio('step-sm90', 'step-bf16')}, our bf16 / eager {ratio('step-bf16', 'torch-eager')}, our bf16 / "
      f"torch.compile {ratio('step-bf16', 'torch-compile')}; CUDA graph / uncaptured: fp8 "
      f"{ratio('step-sm90', 'step-nograph')}, bf16 {ratio('step-bf16', 'step-bf16nograph')}")
mine = next((r.get("peak_device_mb") for r in rows if r.get("tag") == "step-sm90"), None)
theirs = next((r.get("peak_mem_gib") for r in rows if r.get("tag") == "torch-compile"), None)
if mine and theirs:
    print(f"peak device memory: fp8 {mine} MB / torch.compile {theirs} GiB = {mine / (theirs * 1024):.2f}x")
# Last, so that a call read through `| tail` still shows it (a timed-out op suite, rc 124, once passed
# unnoticed for several sessions: notes/sm90-gemm.md, twenty-fifth session).
failed = [f"{r['step']} (rc {r['rc']})" for r in rows if "step" in r and r["rc"] not in (0, "skipped")]
print("steps that failed: " + (", ".join(failed) if failed else "none"))
PY
# The exit code: the op suite's (a call that did not ask for it ends 0).
! picked op-suite || grep -q '"step":"op-suite","rc":0' "$RES"
