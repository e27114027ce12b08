#!/usr/bin/env bash
# ctest deploy.prometheus: the shipped Prometheus files against promtool and a
# live server.
#   bash tests/deploy/prometheus_check.sh BUILD_DIR
# 1. deploy/prometheus-rules.yml is valid, and the rule files that
#    deploy/prometheus.yml names exist (promtool check config cannot read the
#    config itself: Debian's promtool is built without Kubernetes discovery).
# 2. The rules' unit tests pass (tests/deploy/prometheus_rules_test.yml).
# 3. A real sae-server's /metrics (TLS on) passes promtool check metrics
#    (exposition format and naming conventions), and exports every sae_*
#    metric and process_start_time_seconds that the rules query.
set -euo pipefail
build=$(cd "${1:?usage: prometheus_check.sh BUILD_DIR}" && pwd)
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

if ! command -v promtool >/dev/null; then
  echo "FAIL: promtool not found (bash deploy/install_deps.sh --test installs it)" >&2
  exit 1
fi

promtool check rules deploy/prometheus-rules.yml
# The rule_files list: the "  - FILE" lines after "rule_files:".
rule_files=$(awk '/^rule_files:/ {in_list = 1; next} in_list && /^  - / {print $2; next} {in_list = 0}' \
  deploy/prometheus.yml)
[[ -n "$rule_files" ]] || { echo "FAIL: deploy/prometheus.yml loads no rule files" >&2; exit 1; }
for f in $rule_files; do
  [[ -f "deploy/$f" ]] || { echo "FAIL: deploy/prometheus.yml names rule file $f, not in deploy/" >&2; exit 1; }
done
promtool test rules tests/deploy/prometheus_rules_test.yml

work=$(mktemp -d)
server_pid=""
cleanup() {
  [[ -n "$server_pid" ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
# With TLS on, so that the TLS series exist too.
bash tests/testing/make_certs.sh "$work" m
"$build/server/rpc/sae-server" --demo --demo_dir="$work/demo" --listen=127.0.0.1:0 --port_file="$work/port" \
  --metrics_listen=127.0.0.1:0 --metrics_port_file="$work/metrics_port" --tls_cert_file="$work/m-server.pem" \
  --tls_key_file="$work/m-server.key" >"$work/log" 2>&1 &
server_pid=$!
serving=0
for _ in $(seq 100); do
  if [[ -s "$work/port" ]] && "$build/client/sae-client" --addr "127.0.0.1:$(cat "$work/port")" \
    --tls-ca "$work/m-ca.pem" --timeout 2 health >/dev/null 2>&1; then
    serving=1
    break
  fi
  sleep 0.2
done
((serving)) || { echo "FAIL: sae-server did not get to SERVING:" >&2; cat "$work/log" >&2; exit 1; }
python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())' \
  "http://127.0.0.1:$(cat "$work/metrics_port")/metrics" >"$work/metrics.txt"
echo "promtool check metrics (sae-server --demo, $(grep -c '^# TYPE' "$work/metrics.txt") metrics)"
promtool check metrics <"$work/metrics.txt"

missing=0
for name in $(grep -o -E '\b(sae_[a-z_]+|process_start_time_seconds)\b' deploy/prometheus-rules.yml | sort -u); do
  base=$name
  for suffix in _bucket _count _sum; do
    if [[ $name == *$suffix ]] && grep -q "^# TYPE ${name%"$suffix"} histogram" "$work/metrics.txt"; then
      base=${name%"$suffix"}
    fi
  done
  if ! grep -q "^# TYPE $base " "$work/metrics.txt"; then
    echo "FAIL: deploy/prometheus-rules.yml queries $name, which sae-server does not export" >&2
    missing=1
  fi
done
((missing == 0))
echo "PASS"
