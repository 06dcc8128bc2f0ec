#!/usr/bin/env bash
# A/B of hopper_fp8 builds on the device, in one call: each round runs every variant in turn on the same machine (its
# library copied over build/lib/libmoeffi_hopper_fp8.so), then prints the median time over rounds per (preset, M) and
# each variant's ratio to the first. Variants are NAME=LIB[,ENV=VALUE...] with LIB a build/var/LIB.so (bench/dev/variant.sh)
# or "main" (the library build/lib holds when the call starts).
# usage (device): bash .gpu/run bash bench/dev/ab.sh main s10=s10 s10-nohmax=s10,MOEFFI_HOPPER_NO_HMAX=1
#   AB_M (default 1,16,4096), AB_PRESETS (default all), AB_ROUNDS (default 2), AB_REPS (default 10),
#   AB_MM_SHAPES (e.g. 8192x8192x8192,128x7168x7168; default none: fp8_scaled_mm skipped)
set -uo pipefail
out=${OUT:-gpu-logs}; mkdir -p "$out"
lib=build/lib/libmoeffi_hopper_fp8.so
mkdir -p build/var && cp "$lib" build/var/main.so
raw="$out/ab-raw.jsonl"; : > "$raw"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/ab.txt"
run() { env "${envs[@]}" MOEFFI_BENCH_NO_REPORT=1 MOEFFI_BENCH_BACKENDS=hopper_fp8 "$@"; } # envs: the variant's settings
for round in $(seq "${AB_ROUNDS:-2}"); do
  for v in "$@"; do
    name=${v%%=*}; spec=${v#*=}; [ "$v" = "$name" ] && spec=$name
    IFS=, read -ra parts <<< "$spec"
    cp "build/var/${parts[0]}.so" "$lib"
    envs=("${parts[@]:1}")
    run MOEFFI_BENCH_M="${AB_M:-1,16,4096}" MOEFFI_BENCH_REPS="${AB_REPS:-10}" ${AB_PRESETS:+MOEFFI_BENCH_PRESETS=$AB_PRESETS} \
      timeout 300 deno run -A bench/gpu.ts 2>&1 | grep '"us"' | sed "s/^{/{\"variant\":\"$name\",\"round\":$round,/" >> "$raw"
    if [ -n "${AB_MM_SHAPES:-}" ]; then
      run MOEFFI_BENCH_MM_SHAPES="$AB_MM_SHAPES" timeout 200 deno run -A bench/mm.ts 2>&1 | grep '^| hopper_fp8' |
        awk -F'|' -v n="$name" -v r="$round" '{gsub(/ /,""); printf "{\"variant\":\"%s\",\"round\":%s,\"preset\":\"mm %sx%sx%s\",\"m\":%s,\"us\":%s}\n", n, r, $3, $4, $5, $3, $6}' >> "$raw"
    fi
  done
done
cp build/var/main.so "$lib"
python3 - "$raw" <<'PY' | tee -a "$out/ab.txt"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
variants = list(dict.fromkeys(r["variant"] for r in rows))
keys = list(dict.fromkeys((r["preset"], r["m"]) for r in rows))
med = {(v, k): statistics.median([r["us"] for r in rows if r["variant"] == v and (r["preset"], r["m"]) == k] or [float("nan")])
       for v in variants for k in keys}
print("| preset | M | " + " | ".join(variants) + " |")
print("|---|---|" + "---|" * len(variants))
for k in keys:
    base = med[(variants[0], k)]
    cells = [f"{med[(v, k)]:.1f}" + ("" if i == 0 else f" ({med[(v, k)] / base:.3f})") for i, v in enumerate(variants)]
    print(f"| {k[0]} | {k[1]} | " + " | ".join(cells) + " |")
PY
