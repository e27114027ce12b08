#!/usr/bin/env bash
# Builds the tokenizer fuzzers with clang (-fsanitize=fuzzer,address) in a
# separate build dir (tokenizer-only project, tests/tokenizer/standalone) and
# runs each for FUZZ_SECONDS (default 30). Exits 0 without clang.
#   tests/tokenizer/run_fuzz.sh            # from anywhere
#   FUZZ_SECONDS=300 FUZZ_BUILD_DIR=/tmp/fz tests/tokenizer/run_fuzz.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "${here}/../.." && pwd)"
build="${FUZZ_BUILD_DIR:-${root}/build-fuzz}"
seconds="${FUZZ_SECONDS:-30}"

if ! command -v clang++ > /dev/null || ! command -v clang > /dev/null; then
  echo "run_fuzz.sh: clang not found, fuzzers not run"
  exit 0
fi

CC=clang CXX=clang++ cmake -S "${here}/standalone" -B "${build}" -G Ninja \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSAE_FUZZ=ON \
  -DCMAKE_C_FLAGS="-fsanitize=fuzzer-no-link,address" \
  -DCMAKE_CXX_FLAGS="-fsanitize=fuzzer-no-link,address"
cmake --build "${build}" --target fuzz_encode fuzz_loader write_demo_tokenizer

fuzz_dir="${build}/fuzz"
mkdir -p "${fuzz_dir}/encode_corpus" "${fuzz_dir}/loader_corpus"
# Seeds: corpus lines for encode; the demo tokenizer.json (and a few broken
# variants) for the loader.
split -l 1 -a 4 "${here}/corpus.jsonl" "${fuzz_dir}/encode_corpus/seed_" 2>/dev/null || true
"${build}/tests/tokenizer/write_demo_tokenizer" "${fuzz_dir}/loader_corpus/demo.json"
head -c 2000 "${fuzz_dir}/loader_corpus/demo.json" > "${fuzz_dir}/loader_corpus/truncated.json"
echo '{"model": {"type": "BPE", "vocab": {}, "merges": []}}' > "${fuzz_dir}/loader_corpus/small.json"

run() {
  local name="$1" corpus="$2"
  shift 2
  echo "=== ${name}: ${seconds}s"
  (cd "${fuzz_dir}" && "${build}/tests/tokenizer/${name}" "${corpus}" \
     -max_total_time="${seconds}" -timeout=10 -rss_limit_mb=4096 \
     -print_final_stats=1 "$@")
}
run fuzz_encode "${fuzz_dir}/encode_corpus" -max_len=4096
run fuzz_loader "${fuzz_dir}/loader_corpus" -max_len=65536
echo "run_fuzz.sh: no crashes"
