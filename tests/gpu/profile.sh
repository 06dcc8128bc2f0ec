# usage: bash tests/gpu/profile.sh [preset:M ...]   per-kernel device times of one layer forward (ncu, no clock control)
#        bash tests/gpu/profile.sh stalls            where the wide GEMM's warps wait: ncu's full set on one 4096-row chunk
#                                                    of fp8_scaled_mm 8192^3 (built with -lineinfo), a report plus its
#                                                    details page and the source page (SASS with stall samples)
if [ "${1:-}" = stalls ]; then
  ncu --clock-control none --set full --import-source yes --kernel-name regex:grouped_gemm --launch-count 1 \
    -o "$OUT/wide" deno run -A bench/mm.ts > "$OUT/ncu-stalls.log" 2>&1
  ncu -i "$OUT/wide.ncu-rep" --page details > "$OUT/wide-details.txt" 2>&1
  ncu -i "$OUT/wide.ncu-rep" --page source --csv --print-source sass > "$OUT/wide-source.csv" 2>&1
  grep -iE "stall|warp cycles|issued|eligible" "$OUT/wide-details.txt" | head -40
  exit 0
fi
for cfg in ${@:-mixtral-8x7b:1 mixtral-8x7b:16 qwen3-30b-a3b:1 deepseek-v3-ep8:16 mixtral-8x7b:4096 qwen3-30b-a3b:4096}; do
  p=${cfg%:*}; m=${cfg#*:}
  MOEFFI_BENCH_PRESETS=$p MOEFFI_BENCH_M=$m MOEFFI_BENCH_REPS=1 MOEFFI_BENCH_BACKENDS=hopper_fp8 \
    ncu --clock-control none --print-units base --metrics gpu__time_duration.sum --csv deno run -A bench/gpu.ts > $OUT/ncu-$p-$m.csv 2>&1
  echo "== $p M=$m"
  python3 tests/gpu/ncu_times.py "$OUT/ncu-$p-$m.csv"
done
