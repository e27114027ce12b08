#!/usr/bin/env bash
# Plays a Dockerfile runtime stage without Docker: a minimal Debian 12 root
# (debootstrap --variant=minbase, what debian:12-slim is), the staged tree in
# /opt/sae, its debian-packages installed the way the stage installs them,
# then, as an unprivileged user, sae-server --demo answering sae-client over
# gRPC over TLS, and --backend=cuda failing with the CUDA error where no GPU
# is.
# Needs root, chroot with a /proc mount, and Debian's mirror; where one is
# missing it says SKIP and exits 0, and it fails only on what the image
# would hold. tests/run_all.sh runs it (SAE_SKIP_IMAGE=1 skips it); not in
# ctest, as it takes minutes and the network:
#   bash tests/deploy/runtime_image_check.sh BUILD_DIR [ROOTFS]
set -euo pipefail
skip() {
  echo "runtime_image_check: SKIP: $*"
  exit 0
}
((EUID == 0)) || skip "needs root (chroot, mount)"
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$(cd "$1" && pwd)
rootfs=${2:-/tmp/sae-runtime-rootfs}
work=""
r=""
server=""
cleanup() {
  if [[ -n "$server" ]]; then
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  if [[ -n "$r" ]] && mountpoint -q "$r/proc"; then umount "$r/proc" || umount -l "$r/proc"; fi
  # Never delete through a mount.
  if [[ -n "$work" ]] && ! findmnt -rn -o TARGET | grep "^$work/" >/dev/null; then rm -rf "$work"; fi
}
trap cleanup EXIT

if [[ ! -f "$rootfs/.sae-debootstrap-done" ]]; then
  # debootstrap mounts /proc and /sys inside the root and may leave them
  # mounted when it is stopped.
  if findmnt -rn -o TARGET | grep "^$rootfs/" >/dev/null; then
    echo "FAIL: $rootfs has mounts inside; unmount them first" >&2
    exit 1
  fi
  rm -rf "$rootfs"
  command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null || skip "cannot install debootstrap"
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null ||
    skip "debootstrap of Debian 12 failed (network?)"
  touch "$rootfs/.sae-debootstrap-done"
fi
work=$(mktemp -d)
cp -a "$rootfs" "$work/root"
r=$work/root

cuda=()
[[ -f "$build/server/core/cuda/libsae_cuda.so" ]] && cuda=(--cuda)
bash "$root/deploy/stage_runtime.sh" "${cuda[@]}" "$build" "$r/opt/sae"
cp /etc/resolv.conf "$r/etc/resolv.conf"
mount -t proc proc "$r/proc" || skip "cannot mount /proc in the root"
chroot "$r" apt-get update -qq || skip "apt-get update in the root failed (network?)"
# The runtime stage's RUN, as in the Dockerfile; from here on a failure is the image's.
chroot "$r" /bin/sh -c 'DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
  --no-install-recommends ca-certificates $(cat /opt/sae/debian-packages) >/dev/null \
  && rm -rf /var/lib/apt/lists/* && useradd --system --create-home sae'
as_sae() { chroot --userspec=sae:sae "$r" env HOME=/home/sae PATH=/opt/sae/bin:/usr/bin:/bin "$@"; }
fail() {
  echo "FAIL: $*" >&2
  exit 1
}

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Served over TLS, as production is: the image's libssl, and the in-memory
# files gRPC's watcher reads through /proc/self/fd (server/rpc/tls.h).
mkdir -p "$r/home/sae/tls"
bash "$root/tests/testing/make_certs.sh" "$r/home/sae/tls" image
chroot "$r" chown -R sae:sae /home/sae/tls
tls=(--tls-ca /home/sae/tls/image-ca.pem)
# exec: $! is then sae-server itself, which cleanup stops.
(exec chroot --userspec=sae:sae "$r" env HOME=/home/sae /opt/sae/bin/sae-server --demo \
  --demo_dir=/home/sae/demo --listen="127.0.0.1:$port" --tls_cert_file=/home/sae/tls/image-server.pem \
  --tls_key_file=/home/sae/tls/image-server.key >"$work/server.log" 2>&1) &
server=$!
healthy=0
for _ in $(seq 1 240); do
  kill -0 "$server" 2>/dev/null || fail "sae-server exited: $(tail -n 5 "$work/server.log")"
  if as_sae sae-client --addr "127.0.0.1:$port" "${tls[@]}" --timeout 2 health >/dev/null 2>&1; then
    healthy=1
    break
  fi
  sleep 0.5
done
((healthy)) || fail "sae-server not SERVING after 120 s: $(tail -n 5 "$work/server.log")"
grep -q ', TLS, files re-read every' "$work/server.log" || fail "not serving TLS: $(cat "$work/server.log")"
as_sae sae-client --addr "127.0.0.1:$port" "${tls[@]}" extract "The cat sat on the red mat." --sae L1R-8x --k 3 |
  tee "$work/extract.txt"
grep -q '" cat" *L1R-8x *3:' "$work/extract.txt" || fail "no feature 3 on \" cat\": $(cat "$work/server.log")"
if ((${#cuda[@]})); then
  # Without a GPU the CUDA backend must load and name the CUDA error; with one, run.
  printf '{"text": "The cat sat."}\n' >"$r/home/sae/in.jsonl"
  set +e
  timeout 600 chroot --userspec=sae:sae "$r" env HOME=/home/sae /opt/sae/bin/sae-extract --backend cuda \
    --model /home/sae/demo/model --sae /home/sae/demo/saes/L1R-8x --input /home/sae/in.jsonl \
    --output /home/sae/out.jsonl >"$work/cuda.log" 2>&1
  rc=$?
  set -e
  tail -n 1 "$work/cuda.log"
  grep -q 'cannot load libsae_cuda.so' "$work/cuda.log" && fail "$(cat "$work/cuda.log")"
  ((rc == 0)) || grep -q 'backend "cuda": ' "$work/cuda.log" || fail "sae-extract --backend cuda: $(cat "$work/cuda.log")"
fi
echo "PASS: the runtime stage serves the demo over TLS (installed: $(tr '\n' ' ' <"$r/opt/sae/debian-packages"))"
