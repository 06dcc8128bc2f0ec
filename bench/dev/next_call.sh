#!/usr/bin/env bash
# The device calls session 11 prepared and could not run (no machine was lent): the decode layer patch checked and
# measured in one call, the other patches measured in a second. Here first: bash bench/dev/next_prepare.sh (applies the
# patch, builds main + the patch into build/lib, the base, cq and s10b variants into build/var, and the .gpu bundle);
# then run `bash .gpu/run bash bench/dev/next_call.sh [steps]` with carry [".gpu", "build/var",
# "build/lib/libmoeffi_hopper_fp8.so", "build/lib/libmoeffi_fallback.so", "build/lib/libmoeffi_reference.so"].
# Steps (default: suite sanitize decode ncu, ~470 s; then a second call: prefill cq, ~320 s):
#   suite     tests/gpu/run.sh suite on backends.gpu.ts (the decode layer's new cases and the random m = 1, 2 ones)
#   sanitize  tests/gpu/run.sh sanitize on it: memcheck and racecheck (every fixed case, including the new ones)
#   decode    A/B at M = 1, 2, 4: main (the patch), its rings capped at 6 stages, the layer off (the old path)
#   cq        A/B at M = 1, 2, 16: base against the cluster-quant patch (decode x and h rows by clusters of CTAs)
#   ncu       per-kernel device times at M = 1 (qwen3, mixtral), main and base
#   prefill   A/B at M = 4096: base, s10b, s10b with MOEFFI_HOPPER_NO_HMAX=1
# Everything lands in $OUT/logs.tgz and $OUT/summary.txt (the device returns at most 8 files).
set -uo pipefail
R=/tmp/r; mkdir -p $R
trap 'cd /tmp && tar -czf $OUT/logs.tgz r; cp $R/summary.txt $OUT/ 2>/dev/null' EXIT
S=$R/summary.txt
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > $S
step() { local t0=$(date +%s); "$@"; local rc=$?; echo "[$(( $(date +%s) - t0 )) s, rc $rc] $*" | cut -c1-160 >> $S; }
lib=build/lib/libmoeffi_hopper_fp8.so
cp $lib build/var/main.so
for s in ${*:-suite sanitize decode ncu}; do
  case $s in
    suite|sanitize) # tests/gpu/run.sh's steps on the hopper suite alone (the nvfp4 library is not carried)
      step env OUT=$R MOEFFI_GPU_TESTS=tests/gpu/backends.gpu.ts timeout 400 bash tests/gpu/run.sh $s > $R/$s.out 2>&1
      grep -E "passed|FAILED|=> |exit|hazard" $R/$s.out | tail -12 >> $S ;;
    decode) step env OUT=$R/abd AB_M=1,2,4 AB_ROUNDS=2 timeout 240 bash bench/dev/ab.sh main \
        s6=main,MOEFFI_HOPPER_DECODE_STAGES=6 off=main,MOEFFI_HOPPER_DECODE_TOKENS=0 > $R/abd.log 2>&1
      cat $R/abd/ab.txt >> $S ;;
    cq) step env OUT=$R/abc AB_M=1,2,16 AB_ROUNDS=2 timeout 150 bash bench/dev/ab.sh base=base cq=cq > $R/abc.log 2>&1
      cat $R/abc/ab.txt >> $S ;;
    ncu) for v in main base; do
        cp build/var/$v.so $lib
        step env MOEFFI_BENCH_NO_REPORT=1 MOEFFI_BENCH_BACKENDS=hopper_fp8 MOEFFI_BENCH_M=1 MOEFFI_BENCH_REPS=3 \
          MOEFFI_BENCH_PRESETS=qwen3-30b-a3b,mixtral-8x7b timeout 60 ncu --clock-control none --print-units base \
          --metrics gpu__time_duration.sum --csv deno run -A bench/gpu.ts > $R/ncu-$v.csv 2>&1
        { echo "== ncu $v (us, serialized)"; python3 tests/gpu/ncu_times.py $R/ncu-$v.csv; } >> $S 2>&1
      done
      cp build/var/main.so $lib ;;
    prefill) step env OUT=$R/abp AB_M=4096 AB_ROUNDS=2 timeout 240 bash bench/dev/ab.sh base=base s10b=s10b \
        s10b-nohmax=s10b,MOEFFI_HOPPER_NO_HMAX=1 > $R/abp.log 2>&1
      cat $R/abp/ab.txt >> $S ;;
  esac
done
