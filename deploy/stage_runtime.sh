#!/usr/bin/env bash
# Collects what a runtime image needs from a build tree (the Dockerfile's
# build stages run it; tests/deploy/stage_runtime_test.sh checks what it makes):
#   DEST/bin/             sae-server, sae-client, sae-extract, sae-make-demo
#   DEST/lib/             libsae_cuda.so and the libraries it loads that no Debian
#                         package provides (cuBLAS from /usr/local/cuda, and the
#                         NVRTC that cuBLASLt opens by name at run time), when
#                         the build has the CUDA backend
#   DEST/debian-packages  the Debian packages that hold every other shared
#                         library those files load, one per line
# libcuda.so.1 is not collected: it belongs to the driver, which the NVIDIA
# container runtime mounts into the container. Every staged file must find
# what it loads without LD_LIBRARY_PATH: in DEST/lib through an $ORIGIN
# runpath, or in a Debian package; the script fails otherwise.
#   bash deploy/stage_runtime.sh [--cuda] BUILD_DIR DEST
# --cuda fails when the build has no CUDA backend instead of staging without it.
set -euo pipefail

usage() {
  echo "usage: stage_runtime.sh [--cuda] BUILD_DIR DEST" >&2
  exit 2
}
need_cuda=0
if [[ "${1:-}" == "--cuda" ]]; then
  need_cuda=1
  shift
fi
(($# == 2)) || usage
build=$1
dest=$2

bins=(server/rpc/sae-server client/sae-client server/rpc/sae-extract server/core/sae-make-demo)
cuda_lib=server/core/cuda/libsae_cuda.so

mkdir -p "$dest/bin" "$dest/lib"
for b in "${bins[@]}"; do
  if [[ ! -x "$build/$b" ]]; then
    echo "stage_runtime.sh: $build/$b is missing: build the targets sae-server sae-client sae-extract sae-make-demo first" >&2
    exit 1
  fi
  cp "$build/$b" "$dest/bin/"
done
staged=("$dest"/bin/*)
if [[ -f "$build/$cuda_lib" ]]; then
  cp "$build/$cuda_lib" "$dest/lib/"
  staged+=("$dest/lib/libsae_cuda.so")
elif ((need_cuda)); then
  echo "stage_runtime.sh: --cuda, but $build/$cuda_lib is missing (was nvcc found at configure time?)" >&2
  exit 1
fi

# Every path a library may be recorded under: dpkg keeps the paths as
# packages ship them, and on a merged-/usr system ldd may print either form.
variants() {
  local real
  real=$(readlink -f "$1")
  printf '%s\n' "$1" "$real" "${1#/usr}" "${real#/usr}" "/usr$1" "/usr$real"
}

# A library that no package holds is copied to DEST/lib together with the
# libraries it names in its strings that sit beside it (what it dlopens by
# name: cuBLASLt opens libnvrtc.so.13, which opens its builtins).
stage_lib() {
  local src=$1 name=$2 dir n
  [[ -e "$dest/lib/$name" ]] && return 0
  cp -L "$src" "$dest/lib/$name"
  copied_now[$name]=1
  next+=("$dest/lib/$name")
  dir=$(dirname "$src")
  while read -r n; do
    [[ "$n" != "$name" && -e "$dir/$n" ]] && stage_lib "$dir/$n" "$n"
  done < <(strings "$src" | grep -E '^lib[A-Za-z0-9_+-]+\.so(\.[0-9]+)*$' | sort -u)
  return 0
}

# owner: what dpkg says owns each path it was asked about; package_of: the
# package of each library path ldd printed, "" for none (resolved once).
declare -A packages=() owner=() package_of=()
# Breadth-first over the staged files and the libraries copied for them; a
# file whose library was just copied is looked at again, to see that it now
# loads the copy. One dpkg-query per round: each call reads the whole
# package database.
queue=("${staged[@]}")
while ((${#queue[@]})); do
  records=()  # "file|name|path"
  for file in "${queue[@]}"; do
    out=$(env -u LD_LIBRARY_PATH ldd "$file") || {
      echo "stage_runtime.sh: ldd $file failed" >&2
      exit 1
    }
    # ldd lines: "name => /path (addr)", "name => not found", "/path (addr)".
    while read -r name arrow path _; do
      [[ "$arrow" == "=>" ]] || continue
      if [[ "$path" == "not" ]]; then
        [[ "$name" == libcuda.so.* ]] && continue  # the driver's
        echo "stage_runtime.sh: $file needs $name, which is not found" >&2
        exit 1
      fi
      records+=("$file|$name|$path")
    done <<<"$out"
  done
  asked=()
  declare -A fresh=()
  for r in "${records[@]}"; do
    path=${r##*|}
    [[ "$path" == "$dest/lib/"* || -v "package_of[$path]" || -v "fresh[$path]" ]] && continue
    fresh[$path]=1
    mapfile -t -O "${#asked[@]}" asked < <(variants "$path")
  done
  if ((${#asked[@]})); then
    # Status 1 means some path belongs to no package; anything else is a failure.
    dpkg_rc=0
    dpkg_out=$(LC_ALL=C dpkg-query -S "${asked[@]}" 2>/dev/null) || dpkg_rc=$?
    if ((dpkg_rc > 1)); then
      echo "stage_runtime.sh: dpkg-query -S failed (status $dpkg_rc)" >&2
      exit 1
    fi
    # Lines "pkg[:arch][, pkg2...]: /path"; diversions are reported too.
    while IFS= read -r line; do
      [[ -z "$line" || "$line" == *diversion* ]] && continue
      pkg=${line%%: /*}
      pkg=${pkg%%,*}
      owner[${line#*: }]=${pkg%%:*}
    done <<<"$dpkg_out"
  fi
  for path in "${!fresh[@]}"; do
    package_of[$path]=""
    while read -r v; do
      [[ -n "${owner[$v]:-}" ]] && package_of[$path]=${owner[$v]} && break
    done < <(variants "$path")
  done
  next=()
  declare -A copied_now=()
  for r in "${records[@]}"; do
    IFS='|' read -r file name path <<<"$r"
    [[ "$path" == "$dest/lib/"* ]] && continue
    pkg=${package_of[$path]}
    if [[ -n "$pkg" ]]; then
      packages[$pkg]=1
    elif [[ -n "${copied_now[$name]:-}" ]]; then
      next+=("$file")  # copied this round: look again next round
    elif [[ -e "$dest/lib/$name" ]]; then
      echo "stage_runtime.sh: $file loads $name from $path, not the staged copy in $dest/lib:" \
        "it needs a runpath of \$ORIGIN (a library) or \$ORIGIN/../lib (a binary)" >&2
      exit 1
    else
      stage_lib "$path" "$name"
      next+=("$file")
    fi
  done
  mapfile -t queue < <(((${#next[@]})) && printf '%s\n' "${next[@]}" | sort -u)
done
printf '%s\n' "${!packages[@]}" | sort >"$dest/debian-packages"
echo "staged in $dest: $(ls "$dest/bin" | tr '\n' ' ')| lib: $(ls "$dest/lib" | tr '\n' ' ')| $(wc -l <"$dest/debian-packages") Debian packages"
