#!/usr/bin/env bash
# ctest driver of the Node interop test: starts `sae-server --demo` on a free
# loopback port (--port_file), runs sae_interop.js against it, stops the server.
# With "mtls" the server requires mutual TLS (certificates from
# tests/testing/make_certs.sh) and the Node client presents its certificate.
#   run_interop.sh SAE_SERVER_BIN DEMO_DIR SCRATCH_DIR [mtls]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
server_bin=$1
demo_dir=$2
scratch=$3
mode=${4:-plaintext}

if ! command -v node >/dev/null; then
  echo "FAIL: node (Node.js >= 18) is not on PATH; install it, then run 'npm ci' in $here" >&2
  exit 1
fi
if [[ ! -d "$here/node_modules/@grpc/grpc-js" || ! -d "$here/node_modules/@grpc/proto-loader" ]]; then
  echo "FAIL: $here/node_modules is missing; run: (cd $here && npm ci --no-audit --no-fund)" >&2
  exit 1
fi

rm -rf "$scratch"
mkdir -p "$scratch"
server_tls=()
client_tls=()
if [[ $mode == mtls ]]; then
  bash "$here/../testing/make_certs.sh" "$scratch" t
  server_tls=(--tls_cert_file="$scratch/t-server.pem" --tls_key_file="$scratch/t-server.key"
    --tls_client_ca_file="$scratch/t-ca.pem")
  client_tls=("$scratch/t-ca.pem" "$scratch/t-client.pem" "$scratch/t-client.key")
fi
"$server_bin" --demo --demo_dir="$demo_dir" --listen=127.0.0.1:0 --port_file="$scratch/port" "${server_tls[@]}" \
  >"$scratch/server.log" 2>&1 &
server_pid=$!
stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
}
trap stop_server EXIT

for _ in $(seq 1 400); do  # 20 s
  [[ -s "$scratch/port" ]] && break
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "FAIL: sae-server exited early:" >&2
    cat "$scratch/server.log" >&2
    exit 1
  fi
  sleep 0.05
done
if [[ ! -s "$scratch/port" ]]; then
  echo "FAIL: sae-server wrote no port file in 20 s:" >&2
  cat "$scratch/server.log" >&2
  exit 1
fi

status=0
node "$here/sae_interop.js" "127.0.0.1:$(cat "$scratch/port")" "${client_tls[@]}" || status=$?
if [[ $status -ne 0 ]]; then
  echo "--- sae-server log ---" >&2
  cat "$scratch/server.log" >&2
fi
exit $status
