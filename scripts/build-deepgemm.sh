#!/usr/bin/env bash
# DeepGEMM (deepseek-ai/DeepGEMM), the second anchor of the expert GEMMs: DeepSeek's own Hopper FP8
# kernels for the recipe moe8 follows. Not part of moe8 and never in the repository: timed only, by
# packages/kernels/bench/deepgemm_expert_roles.py (IL_DEEPGEMM=1 in scripts/gpu-sm90.sh).
#   here:     bash scripts/build-deepgemm.sh pack DIR   DIR: a DeepGEMM checkout with its submodules
#             (third-party/cutlass, third-party/fmt; only their include/ is packed) -> .gpu-bundle/deepgemm.tar.xz
#             (measured with DeepGEMM 54e2261, cutlass f3fde58, fmt 553ec11: git clone --recursive, or
#             the three repositories at those commits with cutlass and fmt under DIR/third-party/)
#   the GPU:  bash scripts/build-deepgemm.sh build DST  unpacks it into DST and builds deep_gemm/_C
#             in place (torch's C++ extension, nvcc from the machine's CUDA); kernels are JIT-compiled
#             by DeepGEMM at first use (DG_JIT_CACHE_DIR).
set -euo pipefail
case "${1:-}" in
  pack)
    src=$(cd "$2" && pwd)
    [ -d "$src/third-party/cutlass/include/cute" ] || { echo "$src: third-party/cutlass/include missing" >&2; exit 2; }
    cd "$(git rev-parse --show-toplevel)" && mkdir -p .gpu-bundle
    (cd "$src" && { find . -path ./.git -prune -o -path ./third-party -prune -o -type f -print
      find third-party/cutlass/include third-party/fmt/include -type f; }) > /tmp/deepgemm-files
    tar -C "$src" -cf - -T /tmp/deepgemm-files | xz -T0 -6 > .gpu-bundle/deepgemm.tar.xz
    du -sh .gpu-bundle/deepgemm.tar.xz ;;
  build)
    dst=$2
    mkdir -p "$dst" && xz -dc .gpu-bundle/deepgemm.tar.xz | tar -xf - -C "$dst"
    cd "$dst"
    ln -sfn "$dst/third-party/cutlass/include/cute" deep_gemm/include/cute
    ln -sfn "$dst/third-party/cutlass/include/cutlass" deep_gemm/include/cutlass
    # (A _C built by an earlier call, carried as .gpu-bundle/deepgemm-_C.so, saves the ~100 s build.)
    if [ -f "$OLDPWD/.gpu-bundle/deepgemm-_C.so" ]; then
      cp "$OLDPWD/.gpu-bundle/deepgemm-_C.so" "deep_gemm/_C.$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("SOABI"))').so"
      echo "prebuilt _C" > build.log
    else
      MAX_JOBS=16 python3 setup.py build_ext --inplace > build.log 2>&1 || { tail -40 build.log; exit 1; }
    fi
    python3 -c "import sys; sys.path.insert(0, '$dst'); import deep_gemm; print('deep_gemm', deep_gemm.__version__, 'built')" ;;
  preload)
    # The C++ runtime g++ links against, for LD_PRELOAD: without it _C crashed in its first
    # iostream call on the device image (a segfault inside std::ostream, seen 2026-12-04: two C++
    # runtimes in one process); preloaded, that one is the first and the only one.
    cxx=${CXX:-g++}
    "${cxx%% *}" -print-file-name=libstdc++.so.6 ;;
  *) echo "usage: build-deepgemm.sh pack DIR | build DST | preload" >&2; exit 2 ;;
esac
