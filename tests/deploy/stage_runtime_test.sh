#!/usr/bin/env bash
# Checks what deploy/stage_runtime.sh collects for the Docker images from a
# build tree, and that the collected files run on their own:
#   bash tests/deploy/stage_runtime_test.sh BUILD_DIR
# - the four binaries are there; a build with the CUDA backend also stages
#   libsae_cuda.so with the cuBLAS it links, found through its $ORIGIN runpath;
# - the Debian package list names runtime libraries only (no -dev package);
# - the staged sae-make-demo and sae-extract produce the demo's features;
# - the staged sae-extract --backend=cuda loads the staged libsae_cuda.so and
#   its cuBLAS (not the build tree's, not /usr/local/cuda), then either runs
#   (a GPU) or fails naming the CUDA error (no GPU), never "cannot load";
# - the Dockerfile's runtime stages put the staged tree where their
#   ENTRYPOINT and HEALTHCHECK look;
# - staging fails on a binary that would load a library from outside the
#   image, and when dpkg-query fails.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=$(cd "$1" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() {
  echo "FAIL: $*" >&2
  exit 1
}

cuda_flag=()
[[ -f "$build/server/core/cuda/libsae_cuda.so" ]] && cuda_flag=(--cuda)
bash "$root/deploy/stage_runtime.sh" "${cuda_flag[@]}" "$build" "$tmp/stage"
stage=$tmp/stage

for b in sae-server sae-client sae-extract sae-make-demo; do
  [[ -x "$stage/bin/$b" ]] || fail "bin/$b not staged"
done
pkgs=$stage/debian-packages
for p in libgrpc++1.51 libprotobuf32 libabsl20220623 libprometheus-cpp-pull1.0 libpcre2-8-0; do
  grep -qx "$p" "$pkgs" || fail "debian-packages lacks $p: $(tr '\n' ' ' <"$pkgs")"
done
if grep -- '-dev$' "$pkgs"; then fail "debian-packages names development packages"; fi

# The staged tree runs without the build tree: make the demo and extract.
"$stage/bin/sae-make-demo" "$tmp/demo" >/dev/null
printf '{"text": "The cat sat on the red mat."}\n' >"$tmp/in.jsonl"
"$stage/bin/sae-extract" --model "$tmp/demo/model" --sae "$tmp/demo/saes/L1R-8x" \
  --input "$tmp/in.jsonl" --output "$tmp/out.jsonl" 2>"$tmp/extract.log" || {
  cat "$tmp/extract.log" >&2
  fail "staged sae-extract failed"
}
[[ $(wc -l <"$tmp/out.jsonl") == 1 ]] || fail "expected one output line"
# " cat" fires concept feature 3 first on L1R-8x (README, the demo model).
grep -q '"piece":" cat","offset":\[[0-9]*,[0-9]*\],"features":{"L1R-8x":\[\[3,' "$tmp/out.jsonl" ||
  fail "\" cat\" does not lead with feature 3: $(head -c 600 "$tmp/out.jsonl")"

if ((${#cuda_flag[@]})); then
  for l in libcublas.so.13 libcublasLt.so.13; do
    [[ -f "$stage/lib/$l" ]] || fail "lib/$l not staged: $(ls "$stage/lib")"
    ldd "$stage/lib/libsae_cuda.so" | grep "$l => $stage/lib/$l" >/dev/null ||
      fail "staged libsae_cuda.so does not resolve $l in its own folder: $(ldd "$stage/lib/libsae_cuda.so")"
  done
  set +e
  env -u SAE_CUDA_BACKEND_LIB -u LD_LIBRARY_PATH LD_DEBUG=files "$stage/bin/sae-extract" --backend cuda \
    --model "$tmp/demo/model" --sae "$tmp/demo/saes/L1R-8x" --input "$tmp/in.jsonl" \
    --output "$tmp/out_cuda.jsonl" >"$tmp/cuda.log" 2>&1
  rc=$?
  set -e
  grep -q "file=$stage/bin/../lib/libsae_cuda.so .*dynamically loaded" "$tmp/cuda.log" ||
    fail "sae-extract --backend cuda did not load the staged libsae_cuda.so: $(grep -v '^ *[0-9]*:' "$tmp/cuda.log" | tail -5)"
  grep -Eq "calling init: $stage/(bin/\.\./)?lib/libcublas\.so\.13\$" "$tmp/cuda.log" ||
    fail "libcublas.so.13 did not come from $stage/lib: $(grep 'libcublas.so.13' "$tmp/cuda.log" | head -5)"
  if grep -q 'cannot load libsae_cuda.so' "$tmp/cuda.log"; then fail "$(grep 'cannot load' "$tmp/cuda.log")"; fi
  if ((rc != 0)); then
    grep -v '^ *[0-9]*:' "$tmp/cuda.log" | grep 'backend "cuda": ' >/dev/null ||
      fail "sae-extract --backend cuda failed without naming the CUDA error: $(grep -v '^ *[0-9]*:' "$tmp/cuda.log" | tail -5)"
  fi
  echo "cuda: staged libsae_cuda.so and cuBLAS loaded; sae-extract exited $rc: $(grep -v '^ *[0-9]*:' "$tmp/cuda.log" | tail -n 1)"
fi

# The Dockerfile's runtime stages copy their own build stage's staged tree
# to the folder whose bin/ their ENTRYPOINT and HEALTHCHECK run; cpu is the
# last stage (the default target) and gpu serves on the GPU.
code=$(grep -v '^[[:space:]]*#' "$root/Dockerfile")
[[ $(grep '^FROM ' <<<"$code" | tail -n 1) == *" AS cpu" ]] || fail "the Dockerfile's last stage (the default target) is not cpu"
block() { awk -v t="$1" '/^FROM /{on = ($NF == t)} on' <<<"$code"; }
runtime_block=$(block runtime)
dir=$(sed -n 's|^ENTRYPOINT \["\(/[^"]*\)/bin/sae-server"\]$|\1|p' <<<"$runtime_block")
[[ -n "$dir" ]] || fail "the Dockerfile's runtime stage has no ENTRYPOINT [\"DIR/bin/sae-server\"]"
grep -q "^HEALTHCHECK .*CMD \[\"$dir/bin/sae-client\", .*\"health\"\]" <<<"$runtime_block" ||
  fail "the Dockerfile's runtime stage: HEALTHCHECK does not run $dir/bin/sae-client health"
for target in cpu gpu; do
  stage_block=$(block "$target")
  [[ -n "$stage_block" ]] || fail "Dockerfile has no stage '$target'"
  [[ $(head -n 1 <<<"$stage_block") == "FROM runtime AS $target" ]] || fail "Dockerfile stage $target is not FROM runtime"
  grep -qx "COPY --from=build-$target /out/ $dir/" <<<"$stage_block" ||
    fail "Dockerfile stage $target does not copy build-$target's /out/ to $dir/"
  grep -q "cat $dir/debian-packages" <<<"$stage_block" || fail "Dockerfile stage $target does not install debian-packages"
done
block gpu | grep '^CMD .*"--backend=cuda"' >/dev/null || fail "the gpu image's CMD does not use --backend=cuda"
block build-gpu | grep 'stage_runtime.sh --cuda /build /out' >/dev/null ||
  fail "Dockerfile build-gpu does not stage with --cuda"

# Staging refuses what would not run: a binary loading a library that no
# Debian package holds and that it would not find beside it, and a package
# database it cannot read.
fake=$tmp/fake
mkdir -p "$fake/server/rpc" "$fake/client" "$fake/server/core" "$fake/elsewhere"
printf 'int foo(void) { return 1; }\n' >"$tmp/foo.c"
printf 'int foo(void);\nint main(void) { return foo() - 1; }\n' >"$tmp/main.c"
cc -shared -fPIC -o "$fake/elsewhere/libfoo.so" "$tmp/foo.c"
cc -o "$fake/server/rpc/sae-server" "$tmp/main.c" -L"$fake/elsewhere" -lfoo -Wl,-rpath,"$fake/elsewhere"
for b in client/sae-client server/rpc/sae-extract server/core/sae-make-demo; do cp /bin/true "$fake/$b"; done
if bash "$root/deploy/stage_runtime.sh" "$fake" "$tmp/fake_stage" 2>"$tmp/fake.log"; then
  fail "staged a binary that loads libfoo.so from outside the image"
fi
grep -q "sae-server loads libfoo.so from $fake/elsewhere/libfoo.so, not the staged copy" "$tmp/fake.log" ||
  fail "unexpected message: $(cat "$tmp/fake.log")"
cp /bin/true "$fake/server/rpc/sae-server"
mkdir -p "$tmp/bin"
printf '#!/bin/sh\necho "dpkg-query: database is locked" >&2\nexit 2\n' >"$tmp/bin/dpkg-query"
chmod +x "$tmp/bin/dpkg-query"
if PATH="$tmp/bin:$PATH" bash "$root/deploy/stage_runtime.sh" "$fake" "$tmp/fake_stage2" 2>"$tmp/fake2.log"; then
  fail "staging went on after dpkg-query failed"
fi
grep -q 'dpkg-query -S failed (status 2)' "$tmp/fake2.log" || fail "unexpected message: $(cat "$tmp/fake2.log")"
bash "$root/deploy/stage_runtime.sh" "$fake" "$tmp/fake_stage3" >/dev/null
grep -qx libc6 "$tmp/fake_stage3/debian-packages" || fail "/bin/true's libc6 not listed"
[[ -z "$(ls "$tmp/fake_stage3/lib")" ]] || fail "libraries copied for /bin/true: $(ls "$tmp/fake_stage3/lib")"

echo "PASS: staged $(ls "$stage/bin" | tr '\n' ' ')+ $(ls "$stage/lib" | tr '\n' ' ')($(wc -l <"$pkgs") Debian packages)"
