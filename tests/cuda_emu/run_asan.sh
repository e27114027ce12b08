#!/usr/bin/env bash
# The emulated CUDA tests under AddressSanitizer: GPU buffers are heap
# allocations of their exact size in the emulator (README.md), so a kernel or
# a cuBLAS call that reads or writes past a buffer is reported with its line.
#   bash tests/cuda_emu/run_asan.sh        (builds in build-asan/)
set -euo pipefail
cd "$(dirname "$0")/../.."
jobs=$(nproc)
flags="-fsanitize=address -fno-omit-frame-pointer"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSAE_ENABLE_CUDA=OFF \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address \
  -DCMAKE_MODULE_LINKER_FLAGS=-fsanitize=address -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=address >/dev/null
cmake --build build-asan -j "$jobs" --target sae_cuda_emu backend_ops_test cuda_engine_test
export SAE_CUDA_BACKEND_LIB=$PWD/build-asan/tests/cuda_emu/libsae_cuda_emu.so SAE_TEST_REQUIRE_CUDA=1
export ASAN_OPTIONS=detect_leaks=0  # test fixtures keep engines alive for the process
build-asan/tests/core/cuda_engine_test --gtest_brief=1
# The long-sequence attention cases (~7 min under ASan) add no code path the
# packed cases miss (several query and key tiles per sequence); plain ctest
# runs them.
build-asan/tests/core/backend_ops_test --gtest_filter='*/cuda:-*AttentionLong*' --gtest_brief=1
echo "emulated CUDA tests under AddressSanitizer: passed"
