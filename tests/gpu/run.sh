#!/usr/bin/env bash
# Everything the GPU machine should do in one call, from the project root with the runtimes on PATH
# (bash .gpu/run bash tests/gpu/run.sh [suite] [sanitize] [bench] [nvfp4] [doctor] [bun]). Logs go to $OUT (or ./gpu-logs).
set -uo pipefail
out=${OUT:-gpu-logs}; mkdir -p "$out"
steps=${*:-suite sanitize bench}
tests=${MOEFFI_GPU_TESTS:-tests/gpu/backends.gpu.ts tests/gpu/invariance.gpu.ts tests/gpu/nvfp4.gpu.ts} # suite and sanitize (a subset: fewer libraries to carry)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
status=0
for step in $steps; do
  echo "=== $step"
  case $step in
    suite) # the whole GPU suite under Deno
      deno test -A $tests 2>&1 | tee "$out/suite.log" | grep -vE '^\s+at ' | tail -40 || status=1 ;;
    sanitize) # a few problems of every test under memcheck and racecheck
      for tool in memcheck racecheck; do
        MOEFFI_GPU_PROBLEMS=0.05 compute-sanitizer --tool $tool --error-exitcode 9 --target-processes all \
          deno test -A $tests > "$out/$tool.log" 2>&1
        rc=$?; echo "$tool: exit $rc, $(grep -c '========= ' "$out/$tool.log") sanitizer lines"; tail -3 "$out/$tool.log"
        [ $rc -eq 0 ] || status=1
      done ;;
    bench) # ceilings and the PyTorch peer, then moeffi, in the same run
      python3 bench/peers/torch_moe.py --sustain 5 --out "$out/peer.json" 2> "$out/peer.log" || { status=1; tail -20 "$out/peer.log"; }
      MOEFFI_BENCH_PEER="$out/peer.json" deno run -A bench/gpu.ts > "$out/bench.log" 2>&1 || status=1
      MOEFFI_BENCH_MM_SUSTAIN=5 MOEFFI_BENCH_PEER="$out/peer.json" deno run -A bench/mm.ts >> "$out/bench.log" 2>&1 || status=1
      grep "^|" "$out/bench.log" | tail -60
      tar -czf "$out/results.tgz" bench/results ;; # one file: the device returns at most 8
    nvfp4) # the NVFP4 benchmark, then the 8 x 7168 kernel's device time by ncu (cold caches)
      deno run -A bench/nvfp4.ts > "$out/nvfp4.log" 2>&1 || status=1
      grep -E "^Targets|^\| quant 8x" "$out/nvfp4.log"
      MOEFFI_NVFP4_CASES=8x7168 MOEFFI_NVFP4_VARIANTS=auto,noop MOEFFI_BENCH_REPS=20 ncu --clock-control none --print-units base \
        --metrics gpu__time_duration.sum --csv deno run -A bench/nvfp4.ts > "$out/nvfp4-ncu.csv" 2>&1 || status=1
      { echo "ncu gpu__time_duration.sum, nvfp4_experts_quant 8 x 7168 E=8, cold caches"
        python3 tests/gpu/ncu_times.py "$out/nvfp4-ncu.csv"; } | tee "$out/nvfp4-small-ncu.txt"
      ;;
    doctor) # what a user sees on this machine
      deno run -A tools/doctor.ts 2>&1 | tee "$out/doctor.log" | head -60 || status=1 ;;
    bun) # the Bun path on the GPU: a smoke run of the same suite
      MOEFFI_GPU_PROBLEMS=0.1 bun test --timeout 600000 ./tests/gpu/backends.gpu.ts 2>&1 | tee "$out/bun.log" | tail -25 || status=1 ;;
  esac
done
exit $status
