#!/usr/bin/env bash
# Installs what building (and, with --test, testing) needs on Debian 12.
# Everything comes from Debian's packages; CUDA, when wanted, is the toolkit
# in /usr/local/cuda (the build enables it when nvcc is there).
set -euo pipefail

build_pkgs=(cmake ninja-build g++ pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev prometheus-cpp-dev libpcre2-dev nlohmann-json3-dev libssl-dev)
test_pkgs=(libgtest-dev libgmock-dev libbenchmark-dev
  python3-torch python3-numpy clang libclang-rt-14-dev clang-format openssl)

want=("${build_pkgs[@]}")
if [[ "${1:-}" == "--test" ]]; then
  want+=("${test_pkgs[@]}")
  # Node runs the reference tokenizer; keep an existing Node install.
  command -v node >/dev/null && command -v npm >/dev/null || want+=(nodejs npm)
fi

SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep "install ok installed" >/dev/null || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# promtool checks the Prometheus config, alerting rules and our metrics
# exposition (tests/deploy). It is taken out of Debian's prometheus package
# into /usr/local/bin: installing the package would also start a Prometheus
# server as a system service.
if [[ "${1:-}" == "--test" ]] && ! command -v promtool >/dev/null; then
  echo "installing: promtool (from Debian's prometheus package)"
  tmp=$(mktemp -d)
  chmod 755 "$tmp"  # apt's download sandbox user writes there
  if ! (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null); then
    $SUDO apt-get update -qq
    (cd "$tmp" && apt-get download -qq prometheus)
  fi
  dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
  $SUDO install -m 0755 "$tmp/usr/bin/promtool" /usr/local/bin/promtool
  rm -rf "$tmp"
fi
