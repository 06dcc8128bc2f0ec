#!/usr/bin/env bash
# Here (not on the device): everything bench/dev/next_call.sh needs, from a clean checkout of main with node_modules
# installed. Applies bench/dev/hopper_decode_layer.patch to the working tree (undo: git checkout backends cuda tests &&
# rm backends/hopper_fp8/decode.cuh), builds the libraries, the base / cq / s10b / mmq variants and the .gpu bundle, and
# prints the carry list and size. Takes ~3 minutes on two cores.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
[ -z "$(git status --porcelain backends cuda tests)" ] || { echo "backends, cuda or tests have changes: start clean" >&2; exit 1; }
git apply bench/dev/hopper_decode_layer.patch
PATH=$PWD/node_modules/.bin:$PATH deno run -A backends/build.ts
rm -rf build/var
# The variants' patches were written against hopper_fp8.cu before #6 (9240ce2); #6 changed no hopper_fp8 behaviour
# (its edits are the batch-invariant build's), so the variants build from there.
bash bench/dev/variant.sh base 9240ce2
bash bench/dev/variant.sh cq 9240ce2 bench/dev/hopper_decode_cluster_quant.patch
bash bench/dev/variant.sh s10b 10d3e59 bench/dev/hopper_session10.patch bench/dev/hopper_session10b.patch
bash bench/dev/variant.sh mmq 9240ce2 bench/dev/hopper_mm_fused_quant.patch
../shared/tools/gpu-bundle
carry=(.gpu build/var build/lib/libmoeffi_hopper_fp8.so build/lib/libmoeffi_fallback.so build/lib/libmoeffi_reference.so)
echo "carry: [$(printf '"%s", ' "${carry[@]}" | sed 's/, $//')]"
du -csh "${carry[@]}" $(git ls-files) 2>/dev/null | tail -1
