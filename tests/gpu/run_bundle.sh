#!/usr/bin/env bash
# The GPU checks, run from a bundle made by tests/gpu/make_bundle.sh (as
# run.sh inside it). Writes summary.txt and one log per step to $OUT (or
# <bundle>/out): nvidia-smi, the CUDA cases of backend_ops_test, all of
# cuda_engine_test, sae-bench-cuda at Llama-3.1-8B shapes, and
# compute-sanitizer memcheck and racecheck on the fast op cases. Exits non-zero if any
# step failed. SAE_BUNDLE_EMULATE=1 runs the tests on the CPU emulator
# instead (to check a bundle on a machine without a GPU; no sanitizer or
# benchmark then).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out"
: >"$out/summary.txt"
cublas_dirs=/usr/local/cuda/lib64:/usr/local/cuda/lib
if py_cublas=$(python3 -c 'import os, nvidia.cublas as c; print(os.path.join(list(c.__path__)[0], "lib"))' 2>/dev/null); then
  cublas_dirs=$cublas_dirs:$py_cublas
fi
export LD_LIBRARY_PATH="$here/lib:$cublas_dirs:${LD_LIBRARY_PATH:-}"
export SAE_TEST_REQUIRE_CUDA=1
emulate=${SAE_BUNDLE_EMULATE:-0}
if [[ "$emulate" == 1 ]]; then
  export SAE_CUDA_BACKEND_LIB=$here/lib/libsae_cuda_emu.so
else
  export SAE_CUDA_BACKEND_LIB=$here/lib/libsae_cuda.so
fi

failed=0
step() {
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
  tail -n 4 "$out/$name.log"
  ((rc == 0)) || failed=1
}

tee -a "$out/summary.txt" <"$here/MANIFEST"
if [[ "$emulate" != 1 ]]; then
  step nvidia-smi nvidia-smi
fi
step ops "$here/bin/backend_ops_test" --gtest_filter='*/cuda'
step engine "$here/bin/cuda_engine_test"
if [[ "$emulate" != 1 ]]; then
  # The benchmark before the sanitizers: device time is scarce, and its
  # figures are what a short loan is for. Each sanitizer run is capped
  # (SAE_BUNDLE_SANITIZER_S, default 150 s); a cap hit is rc=124 in summary.txt.
  step bench "$here/bin/sae-bench-cuda" --tokens=8192 --seq_len=1024 --layers=8,16,32 --k=50
  fast='*/cuda:-*AttentionLong*:*ModelShapes*'
  cap=${SAE_BUNDLE_SANITIZER_S:-150}
  if command -v compute-sanitizer >/dev/null; then
    step memcheck timeout "$cap" compute-sanitizer --tool memcheck --error-exitcode 1 "$here/bin/backend_ops_test" \
      --gtest_filter="$fast"
    step racecheck timeout "$cap" compute-sanitizer --tool racecheck --error-exitcode 1 \
      "$here/bin/backend_ops_test" --gtest_filter="$fast"
  else
    echo "compute-sanitizer: not on PATH, skipped" | tee -a "$out/summary.txt"
  fi
fi
echo "failed=$failed" | tee -a "$out/summary.txt"
exit "$failed"
