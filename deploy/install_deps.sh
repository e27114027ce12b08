#!/usr/bin/env bash
# Installs what building (and, with --test, testing) needs on Debian 12.
# Everything comes from Debian's packages; CUDA, when wanted, is the toolkit
# in /usr/local/cuda (the build enables it when nvcc is there).
set -euo pipefail

build_pkgs=(cmake ninja-build g++ pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev prometheus-cpp-dev libpcre2-dev nlohmann-json3-dev)
test_pkgs=(libgtest-dev libgmock-dev libbenchmark-dev
  python3-torch python3-numpy clang libclang-rt-14-dev clang-format openssl)

want=("${build_pkgs[@]}")
if [[ "${1:-}" == "--test" ]]; then
  want+=("${test_pkgs[@]}")
  # Node runs the reference tokenizer; keep an existing Node install.
  command -v node >/dev/null && command -v npm >/dev/null || want+=(nodejs npm)
fi

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep "install ok installed" >/dev/null || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
