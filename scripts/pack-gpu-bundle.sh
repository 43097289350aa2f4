#!/usr/bin/env bash
# Packs what a GPU machine without Node, Bun or a registry needs to run moe8 from this checkout into
# .gpu-bundle/ (ignored by git): the Bun binary (bun.xz) and the runtime node_modules (nm.tar.xz:
# the workspace links plus the packages the CLI and the tests import; build tools, linters and type
# checkers are left out). scripts/gpu-session.sh unpacks both. Carry `.gpu-bundle`, `.gpu-cache` (the
# compiled kernels, when NVRTC is installed here) and the built addon
# (packages/kernels/kernels.linux-x64-gnu.node, native.cjs) with the call.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
# The addon embeds the CUDA sources: rebuild it when any changed (a no-op when its stamp is current),
# or the GPU runs the kernels of the last build.
(cd packages/kernels && node ../../scripts/build-native.mjs --required)
mkdir -p .gpu-bundle
bin=$(readlink -f "$(command -v bun)")
if [ ! -f .gpu-bundle/bun.xz ] || [ "$(cat .gpu-bundle/bun.version 2>/dev/null)" != "$("$bin" --version)" ]; then
  xz -T0 -6 -c "$bin" > .gpu-bundle/bun.xz
  "$bin" --version > .gpu-bundle/bun.version
fi
skip='biomejs|turbo|typescript|esbuild|rolldown|lightningcss|napi-rs|octokit|bun-types|@types|tsx@|es-toolkit'
find node_modules packages/*/node_modules apps/*/node_modules tests/node_modules -mindepth 1 -maxdepth 1 \
  -name '.bun' -prune -o -print > /tmp/moe8-nm-list
ls -d node_modules/.bun/*/ | grep -Ev "$skip" >> /tmp/moe8-nm-list
tar -cf - -T /tmp/moe8-nm-list | xz -T0 -6 > .gpu-bundle/nm.tar.xz
# Every kernel module compiled for sm_90a by this machine's NVRTC (the nvidia-cuda-nvrtc wheel, when
# installed), packed: .gpu-cache/cubins.tar.xz, which scripts/gpu-sm90.sh unpacks into its cache.
if python3 -c 'import nvidia' 2>/dev/null; then
  rm -rf /tmp/moe8-gpu-cache .gpu-cache && mkdir -p .gpu-cache
  python3 scripts/nvrtc-check.py --write-cache /tmp/moe8-gpu-cache | tail -1
  tar -cf - -C /tmp/moe8-gpu-cache . | xz -T0 -6 > .gpu-cache/cubins.tar.xz
fi
cp ../shared/reference/torch_ref_moe.py ../shared/reference/torch_op_anchors.py .gpu-bundle/ 2>/dev/null || true
du -sh .gpu-bundle/*
