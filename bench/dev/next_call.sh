#!/usr/bin/env bash
# Device calls for the patches in bench/dev (session 12's state: the decode layer patch is correct on the fixed cases
# but ~2x slower than the old path at M = 1 with 16-row TMA boxes; its one-box-a-stage maps, and session 13's two GEMM 1
# CTAs an SM and pipelined GEMM 1 consumer, are the next measurement).
# Here first: bash bench/dev/next_prepare.sh (applies the patch, builds main + the patch into build/lib, the base, cq,
# s10b and mmq variants into build/var, and the .gpu bundle); then run `bash .gpu/run bash bench/dev/next_call.sh [steps]`
# with carry [".gpu", "build/var", "build/lib/libmoeffi_hopper_fp8.so", "build/lib/libmoeffi_fallback.so",
# "build/lib/libmoeffi_reference.so"]. Steps (default: suite suiteknobs decode ncud sanitize, ~500 s; session 12's machine starts
# cost 90-210 s of device time each, failed ones too, so keep a call's steps within the budget left):
#   suite     tests/gpu/run.sh suite on backends.gpu.ts (the decode layer's new cases and the random m = 1, 2 ones)
#   suiteknobs  the suite with MOEFFI_HOPPER_DECODE_PIPE=1 and MOEFFI_HOPPER_DECODE_CTAS=2 (their code paths' correctness)
#   sanitize  tests/gpu/run.sh sanitize on it: memcheck and racecheck (TEST_LIMIT caps either step, default 400 s)
#   decode    which boxes prepare made (MOEFFI_HOPPER_DECODE_BOX=x), then A/B at M = DEC_M (1,2) over DEC_ROUNDS (2):
#             main (one box a stage), then DEC_VARIANTS (default: 2d = 16-row 2-D boxes; c2 = two GEMM 1 CTAs an SM;
#             pipe = GEMM 1's consumer with a stage's WGMMAs in flight; blk and blkoff = the layer
#             and the old path under 128x128 blocks and 1x128 groups; rot=main,MOEFFI_HOPPER_DECODE_ROTATE=1 is
#             another), and last off (the old path, per-channel)
#   ncud      ncu sections and stall reasons of the decode kernels (on, c2, pipe) and the old path's (off) at M = 1 (NCUD;
#             their Duration lines are the per-kernel times)
#   cq        A/B at M = 1, 2, 16: base against the cluster-quant patch (decode x and h rows by clusters of CTAs)
#   prefill   A/B at M = 4096: base, s10b, s10b with MOEFFI_HOPPER_NO_HMAX=1
#   mmq       hopper_mm_fused_quant.patch (build/var/mmq.so): the suite with it, then mm 8192^3, 4096x7168x16384 and
#             1024x7168x7168 against base and with MOEFFI_HOPPER_MM_SEPARATE_QUANT=1 (~150 s)
#   shapes    bench/dev/cublas_layer_shapes.py: how close cuBLAS itself gets to the prefill bar on each preset's GEMM
#             shapes (the evidence for, or against, a prefill target being reachable on this hardware)
#   landif    after decode: if the layer beat the old path at M = 1 on every preset (main < off, and blk < blkoff
#             where both ran), the whole GPU run on this build
#             (suite, sanitizers and bench of every test file; results.tgz and land-logs.tgz come back for landing).
#             Needs build/lib carried whole (the nvfp4 library too): carry [".gpu", "build/lib"]. A landing call
#             (~560 s when it lands, ~80 s when not; the whole run alone took up to ~450 s in earlier sessions):
#             DEC_M=1 DEC_ROUNDS=1 DEC_VARIANTS="blk=main,MOEFFI_BENCH_SCHEME=block-128
#             blkoff=main,MOEFFI_BENCH_SCHEME=block-128,MOEFFI_HOPPER_DECODE_TOKENS=0" bash .gpu/run bash
#             bench/dev/next_call.sh decode landif
#   invsuite  issue 6 (a separate call, main's code: no decode patch; here `MOEFFI_CUDA_ARCHS=90a deno task build`, then
#             ../shared/tools/gpu-bundle; carry [".gpu", "build/lib"]): the invariance tests and the whole backend suite
#             (batch_invariant_fp8 against the CPU reference); invsanitize: memcheck and racecheck on both (a small share)
#   invbench  issue 6's benchmark: the peer's ceilings, cuBLAS FP8 and the bf16-dequant path, then bench/invariant.ts
#             (results/invariant-<gpu>.json and .md come back in inv-results.tgz)
# Everything lands in $OUT/logs.tgz and $OUT/summary.txt (written as it goes).
set -uo pipefail
R=/tmp/r; mkdir -p $R
trap 'cd /tmp && tar -czf $OUT/logs.tgz r' EXIT
S=$OUT/summary.txt # written as it goes: a call cut at its limit still returns it
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > $S
step() { local t0=$(date +%s); "$@"; local rc=$?; echo "[$(( $(date +%s) - t0 )) s, rc $rc] $*" | cut -c1-160 >> $S; }
lib=build/lib/libmoeffi_hopper_fp8.so
[ -d build/var ] && cp $lib build/var/main.so # (issue 6 calls carry no variants)
for s in ${*:-suite suiteknobs decode ncud sanitize}; do
  case $s in
    suite|suiteknobs|sanitize) # tests/gpu/run.sh's steps on the hopper suite alone (the nvfp4 library is not carried);
      # suiteknobs: the suite under the decode knobs' code paths (the pipelined GEMM 1 consumer, two CTAs an SM)
      knobs=; [ $s = suiteknobs ] && knobs="MOEFFI_HOPPER_DECODE_PIPE=1 MOEFFI_HOPPER_DECODE_CTAS=2"
      step env OUT=$R/$s $knobs MOEFFI_GPU_TESTS=tests/gpu/backends.gpu.ts timeout ${TEST_LIMIT:-400} \
        bash tests/gpu/run.sh ${s%knobs} > $R/$s.out 2>&1
      grep -E "passed|FAILED|=> |exit|hazard" $R/$s.out | tail -12 >> $S ;;
    decode) step env OUT=$R/abd AB_M=${DEC_M:-1,2} AB_ROUNDS=${DEC_ROUNDS:-2} timeout 300 bash bench/dev/ab.sh main \
        ${DEC_VARIANTS:-2d=main,MOEFFI_HOPPER_DECODE_BOX=2d c2=main,MOEFFI_HOPPER_DECODE_CTAS=2 pipe=main,MOEFFI_HOPPER_DECODE_PIPE=1 blk=main,MOEFFI_BENCH_SCHEME=block-128 \
        blkoff=main,MOEFFI_BENCH_SCHEME=block-128,MOEFFI_HOPPER_DECODE_TOKENS=0} off=main,MOEFFI_HOPPER_DECODE_TOKENS=0 > $R/abd.log 2>&1
      MOEFFI_HOPPER_DECODE_BOX=x MOEFFI_BENCH_NO_REPORT=1 MOEFFI_BENCH_BACKENDS=hopper_fp8 MOEFFI_BENCH_M=1 MOEFFI_BENCH_REPS=1 \
        MOEFFI_BENCH_PRESETS=qwen3-30b-a3b timeout 60 deno run -A bench/gpu.ts 2>&1 | grep -m1 "decode boxes" >> $S
      cat $R/abd/ab.txt >> $S ;;
    invsuite|invsanitize) step env OUT=$R/$s MOEFFI_GPU_TESTS="tests/gpu/invariance.gpu.ts tests/gpu/backends.gpu.ts" \
        timeout ${TEST_LIMIT:-400} bash tests/gpu/run.sh ${s#inv} > $R/$s.out 2>&1
      grep -E "passed|FAILED|=> |exit|hazard|not ok|error:" $R/$s.out | tail -30 >> $S ;;
    invbench) # ceilings (copy bandwidth), the bf16-dequant path, both backends' times, then bench/invariant.ts's verdicts
      mmshapes=$(for nk in 1024x2048 4608x4096 7168x7168; do for m in 1 16 64 256 1024 4096; do printf "%sx%s," $m $nk; done; done)
      step bash -c "python3 bench/peers/torch_moe.py --presets '' --out $R/peer-inv.json 2> $R/peer-inv.log
        python3 bench/peers/torch_bf16_dequant.py --out $R/bf16.json 2> $R/bf16.log
        MOEFFI_BENCH_NO_REPORT=1 MOEFFI_BENCH_BACKENDS=hopper_fp8,batch_invariant_fp8 MOEFFI_BENCH_M=1,16,64,256,1024,4096 \
          timeout 400 deno run -A bench/gpu.ts > $R/inv-moe.jsonl 2>&1
        MOEFFI_BENCH_NO_REPORT=1 MOEFFI_BENCH_BACKENDS=hopper_fp8,batch_invariant_fp8 MOEFFI_BENCH_MM_SHAPES=${mmshapes%,} \
          timeout 200 deno run -A bench/mm.ts > $R/inv-mm.jsonl 2>&1
        MOEFFI_BENCH_PEER=$R/peer-inv.json MOEFFI_BENCH_BF16=$R/bf16.json deno run -A bench/invariant.ts $R/inv-moe.jsonl \
          $R/inv-mm.jsonl > $R/invbench.log 2>&1"
      grep -E "PASS|FAIL|^\\| " $R/invbench.log | tail -80 >> $S
      tar -czf $OUT/inv-results.tgz bench/results/invariant-* 2>/dev/null ;;
    cq) step env OUT=$R/abc AB_M=1,2,16 AB_ROUNDS=2 timeout 150 bash bench/dev/ab.sh base=base cq=cq > $R/abc.log 2>&1
      cat $R/abc/ab.txt >> $S ;;
    ncud) for v in ${NCUD:-on c2 pipe off}; do # ncu sections of the decode kernels (on; c2: two GEMM 1 CTAs an SM; pipe: a stage's WGMMAs in flight) and the six-kernel path (off), mixtral and qwen3 M = 1
        step env MOEFFI_BENCH_NO_REPORT=1 MOEFFI_BENCH_BACKENDS=hopper_fp8 MOEFFI_BENCH_M=1 MOEFFI_BENCH_REPS=1 \
          MOEFFI_HOPPER_DECODE_TOKENS=$([ $v = off ] && echo 0 || echo 4) MOEFFI_HOPPER_DECODE_CTAS=$([ $v = c2 ] && echo 2 || echo 1) MOEFFI_HOPPER_DECODE_PIPE=$([ $v = pipe ] && echo 1 || echo 0) \
          MOEFFI_BENCH_PRESETS=mixtral-8x7b,qwen3-30b-a3b \
          timeout 120 ncu --clock-control none -k regex:"decode|swap" -c 12 --section SpeedOfLight --section MemoryWorkloadAnalysis \
          --section WarpStateStats --section LaunchStats --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,dram__bytes_read.sum" \
          deno run -A bench/gpu.ts > $R/ncud-$v.txt 2>&1
        grep -E "^  [a-z_:<>()0-9 ]*(decode|swap)|Duration|DRAM Throughput|Memory Throughput|L2 Hit|Warp Cycles Per Issued|Grid Size|dram__bytes|stalled" \
          $R/ncud-$v.txt | awk '!/stalled/ || $NF + 0 > 0.2' | cut -c1-150 >> $S
      done ;;
    landif) # the whole GPU run (tests/gpu/run.sh suite sanitize bench, every test file; carry build/lib whole) on this
      # build, only if the decode A/B above has the layer faster than the old path (off) at M = 1 on every preset
      if awk -F'|' '/^\| preset/ { for (i = 2; i < NF; i++) { gsub(/ /, "", $i); col[$i] = i } }
                    $3 + 0 == 1 && ("off" in col) { n++; if ($(col["main"]) + 0 >= $(col["off"]) + 0) bad = 1
                      if (("blk" in col) && ("blkoff" in col) && $(col["blk"]) + 0 >= $(col["blkoff"]) + 0) bad = 1 }
                    END { exit !(n > 0 && !bad) }' $R/abd/ab.txt 2>/dev/null; then
        step env OUT=$R/land MOEFFI_GPU_TESTS="tests/gpu/backends.gpu.ts tests/gpu/nvfp4.gpu.ts" timeout 480 \
          bash tests/gpu/run.sh suite sanitize bench > $R/land.out 2>&1
        cp $R/land/results.tgz $OUT/ 2>/dev/null
        tar -czf $OUT/land-logs.tgz -C $R land 2>/dev/null
        grep -E "passed|FAILED|exit|hazard|^\| " $R/land.out | tail -40 >> $S
      else echo "landif: no landing run (the decode layer is not faster than the old path at M = 1 everywhere)" >> $S; fi ;;
    shapes) # cuBLAS on the presets' GEMM shapes (dense equivalent, one expert) against its own 8192^3 rate (~30 s)
      step timeout 180 python3 bench/dev/cublas_layer_shapes.py > $R/shapes.json 2> $R/shapes.log
      cp $R/shapes.json $OUT/ 2>/dev/null; cat $R/shapes.log >> $S ;;
    mmq) # hopper_mm_fused_quant.patch (build/var/mmq.so): the suite with it, then fp8_scaled_mm A/B against base and
      # against its own separate-kernel path
      cp build/var/mmq.so $lib
      step env OUT=$R/mmq MOEFFI_GPU_TESTS=tests/gpu/backends.gpu.ts timeout 200 bash tests/gpu/run.sh suite > $R/mmq-suite.out 2>&1
      grep -E "passed|FAILED|=> " $R/mmq-suite.out | tail -6 >> $S
      cp build/var/main.so $lib
      step env OUT=$R/abm AB_M=1 AB_PRESETS=qwen3-30b-a3b AB_ROUNDS=2 \
        AB_MM_SHAPES=8192x8192x8192,4096x7168x16384,1024x7168x7168 timeout 300 bash bench/dev/ab.sh base=base mmq=mmq \
        mmq-sep=mmq,MOEFFI_HOPPER_MM_SEPARATE_QUANT=1 > $R/abm.log 2>&1
      cat $R/abm/ab.txt >> $S ;;
    prefill) step env OUT=$R/abp AB_M=4096 AB_ROUNDS=2 timeout 240 bash bench/dev/ab.sh base=base s10b=s10b \
        s10b-nohmax=s10b,MOEFFI_HOPPER_NO_HMAX=1 > $R/abp.log 2>&1
      cat $R/abp/ab.txt >> $S ;;
  esac
done
