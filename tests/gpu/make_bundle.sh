#!/usr/bin/env bash
# Packs the CUDA tests and benchmark (and the server binaries with their
# end-to-end test) into one folder that runs on an x86-64
# Linux GPU machine without this project's build dependencies (no Debian
# packages, no compiler): the binaries, libsae_cuda.so (cudart linked in),
# the CUDA emulator library, every shared library they need beyond glibc,
# libstdc++ and cuBLAS, and run.sh (tests/gpu/run_bundle.sh).
#   bash tests/gpu/make_bundle.sh [DIR]     (default: .gpu-bundle)
# Needs a build with CUDA (build/; nvcc present). See tests/gpu/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-.gpu-bundle}
if [[ ! -x /usr/local/cuda/bin/nvcc ]]; then
  echo "make_bundle.sh: needs nvcc (/usr/local/cuda) to build libsae_cuda.so" >&2
  exit 2
fi
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j "$(nproc)" --target sae_cuda sae_cuda_emu backend_ops_test cuda_engine_test sae-bench-cuda \
  sae-bench-serving e2e_binaries_test sae-server sae-client sae-extract

rm -rf "$dir"
mkdir -p "$dir/bin" "$dir/lib"
bins=(build/tests/core/backend_ops_test build/tests/core/cuda_engine_test build/server/bench/sae-bench-cuda
  build/tests/e2e/sae-bench-serving build/tests/e2e/e2e_binaries_test build/server/rpc/sae-server
  build/client/sae-client build/server/rpc/sae-extract)
libs=(build/server/core/cuda/libsae_cuda.so build/tests/cuda_emu/libsae_cuda_emu.so)
for f in "${bins[@]}"; do strip --strip-debug -o "$dir/bin/$(basename "$f")" "$f"; done
for f in "${libs[@]}"; do strip --strip-debug -o "$dir/lib/$(basename "$f")" "$f"; done
# Shared libraries the machine may lack: everything but the C/C++ runtime and
# the CUDA libraries (those must come from the machine's driver and toolkit).
system='^(linux-vdso|ld-linux|libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|libcuda|libcublas|libcublasLt)\.so'
for f in "${bins[@]}" "${libs[@]}"; do
  ldd "$f" | awk '$3 ~ /^\// {print $1, $3}' | while read -r name path; do
    [[ "$name" =~ $system ]] && continue
    cp -L -n "$path" "$dir/lib/$name"
  done
done
cp tests/gpu/run_bundle.sh "$dir/run.sh"
{
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(. /etc/os-release && echo "$PRETTY_NAME")"
  echo "nvcc: $(/usr/local/cuda/bin/nvcc --version | tail -n 1)"
  echo "cuda code: $(grep -o -- 'arch=compute_[0-9a-z]*,code=\[[^]]*\]' build/build.ninja | sort -u | tr '\n' ' ')"
} >"$dir/MANIFEST"
size=$(du -sm "$dir" | cut -f1)
echo "bundle: $dir ($size MiB, $(find "$dir/lib" -type f | wc -l) libraries)"
if ((size > 60)); then
  echo "make_bundle.sh: $size MiB is over the 60 MiB budget" >&2
  exit 1
fi
