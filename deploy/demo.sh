#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine, builds the service, starts it on the
# embedded tiny demo model and queries it with the client:
#   bash deploy/demo.sh
# KEEP_RUNNING=1 leaves the server running afterwards; PORT (default 50051)
# picks the port, DEMO_DIR (default /tmp/sae-demo) where the demo model is
# written; the build goes to build-demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
port="${PORT:-50051}"
build="build-demo"

bash deploy/install_deps.sh
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSAE_BUILD_TESTS=OFF >/dev/null
cmake --build "$build" -j "$(nproc)" --target sae-server sae-client sae-extract sae-make-demo

client="$build/client/sae-client --addr=127.0.0.1:$port"
"$build/server/rpc/sae-server" --demo --demo_dir="${DEMO_DIR:-/tmp/sae-demo}" --listen="127.0.0.1:$port" &
server_pid=$!
[[ "${KEEP_RUNNING:-0}" == "1" ]] || trap 'kill $server_pid 2>/dev/null; wait $server_pid 2>/dev/null || true' EXIT

# grpc.health.v1 turns SERVING once the model and SAEs are loaded.
serving=0
for _ in $(seq 1 120); do
  if $client health >/dev/null 2>&1; then
    serving=1
    break
  fi
  kill -0 $server_pid 2>/dev/null || { echo "sae-server exited" >&2; exit 1; }
  sleep 0.5
done
if [[ "$serving" != "1" ]]; then
  kill $server_pid 2>/dev/null || true
  echo "sae-server is not SERVING after 60 s on 127.0.0.1:$port (is the port taken? PORT=... picks another)" >&2
  exit 1
fi

set -x
$client info
$client list-saes
$client extract "The cat sat on the red mat in Paris with one dog." --sae=L1R-8x --sae=L3R-32x --k=3
set +x
echo
echo "Concept features of the demo SAEs (see README): 3 = animals, 17 = colours, 42 = cities, 101 = numbers."
if [[ "${KEEP_RUNNING:-0}" == "1" ]]; then
  echo "sae-server (pid $server_pid) keeps serving on 127.0.0.1:$port"
fi
