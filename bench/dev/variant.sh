#!/usr/bin/env bash
# A scratch build of the hopper_fp8 library for an A/B on the device: sm_90a only, no -lineinfo (~3.4 MB, so several
# fit in the 64 MiB a device call carries), from the sources at REV with PATCHes applied in a temporary copy (the
# working tree is not touched).
# usage: bash bench/dev/variant.sh NAME [REV [PATCH...]]   ->  build/var/NAME.so   (REV: default HEAD)
#   bash bench/dev/variant.sh base
#   bash bench/dev/variant.sh s10b 10d3e59 bench/dev/hopper_session10b.patch
set -euo pipefail
name=$1 rev=${2:-HEAD}
shift $(($# < 2 ? $# : 2))
root=$(git rev-parse --show-toplevel)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git -C "$root" archive "$rev" backends cuda tests | tar -x -C "$tmp"
for p in "$@"; do patch -s -p1 -d "$tmp" < "$root/$p"; done # (patch skips a header before the diff)
mkdir -p "$root/build/var"
nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
# compileShared's flags (backends/build.ts) less -lineinfo and the PTX fallback: build.ts with MOEFFI_CUDA_ARCHS=90a
# gives 9.3 MB, too large to carry several
"$nvcc" -O3 -std=c++17 -shared -Xcompiler -fPIC,-fvisibility=hidden -Xlinker -z,nodelete \
  -gencode arch=compute_90a,code=sm_90a -I "$tmp/backends" -I "$tmp/cuda" "$tmp/backends/hopper_fp8/hopper_fp8.cu" \
  -o "$root/build/var/$name.so"
echo "build/var/$name.so ($(du -h "$root/build/var/$name.so" | cut -f1)): $rev${*:+ + $*}"
