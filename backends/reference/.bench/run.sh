#!/bin/bash
# temporary A/B timing harness (deleted after use)
cd "$(dirname "$0")"; lscpu | grep -E "Model name|^CPU\(s\)|L2|L3"
for v in base pair; do
  cc -std=c11 -O3 -ffp-contract=off -fopenmp -fPIC -shared -fvisibility=hidden -I.. -I../.. -x c $v.c.txt -x none -o lib$v.so -lm
  cc -std=c11 -O2 -w -I../.. -x c driver.c.txt -x none -o drv_$v -L. -l:lib$v.so -Wl,-rpath,'$ORIGIN' -lm
done
for r in 1 2; do for v in base pair; do echo "== $v"; OMP_NUM_THREADS=2 taskset -c 2,3 ./drv_$v perf | grep best; done; done
