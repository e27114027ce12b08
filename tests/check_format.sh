#!/usr/bin/env bash
# Fails when a C++/CUDA source of ours is not clang-formatted (.clang-format:
# Google style, 120 columns). Fix with: tests/check_format.sh --fix
set -euo pipefail
cd "$(dirname "$0")/.."
mode=(--dry-run --Werror)
[[ "${1:-}" == "--fix" ]] && mode=(-i)
files=$(git ls-files '*.cc' '*.h' '*.cu' '*.cuh' 2>/dev/null || find server client tests -name '*.cc' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
clang-format "${mode[@]}" $files
echo "clang-format: $(echo "$files" | wc -l) files checked"
