#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine and runs the whole test suite:
#   bash tests/run_all.sh
# Installs packages (apt) and the reference tokenizer (npm), builds in
# build/, runs ctest, then the Docker runtime-stage check, then the tokenizer
# fuzzers briefly when clang is there, then the emulated CUDA tests under
# AddressSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
jobs=$(nproc)

bash deploy/install_deps.sh --test

# Independent references used by the tests (npm packages pinned by package-lock.json).
(cd tests/tokenizer/reference && npm ci --no-audit --no-fund --loglevel=error)
(cd tests/interop && npm ci --no-audit --no-fund --loglevel=error)

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build build -j "$jobs"
(cd build && ctest --output-on-failure -j "$jobs" --timeout 900)

# The Docker runtime stage played in a minimal Debian 12 root (root and
# Debian's mirror needed; it says SKIP without them).
if [[ "${SAE_SKIP_IMAGE:-0}" != "1" ]]; then
  bash tests/deploy/runtime_image_check.sh build
fi
if [[ "${SAE_SKIP_FUZZ:-0}" != "1" ]] && command -v clang++ >/dev/null; then
  bash tests/tokenizer/run_fuzz.sh
fi
# The CUDA backend's kernels and host code on the CPU emulator under
# AddressSanitizer (a second build in build-asan/; tests/cuda_emu/README.md).
if [[ "${SAE_SKIP_ASAN:-0}" != "1" ]]; then
  bash tests/cuda_emu/run_asan.sh
fi
echo "all tests passed"
