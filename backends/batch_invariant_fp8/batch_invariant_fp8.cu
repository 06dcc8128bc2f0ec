// batch_invariant_fp8.cu: fp8_moe and fp8_scaled_mm whose every output row is bit-identical whatever
// else is in the batch (its size, the row's position, the other rows), run to run and under CUDA-graph
// replay. These are hopper_fp8's kernels (sm_90a: TMA rings, fp8 WGMMA, 128-wide K blocks promoted to
// fp32) under one configuration for every M: no M-dependent tiles, swapped tiles, CTA pairs or K split
// (MOEFFI_FIXED_CONFIG in hopper_fp8.cu, moe.md section 5). Row-local activation scales only:
// per-token, 1x128 groups, static per-tensor. What it costs against hopper_fp8: README.md, NOTES.md.
#define MOEFFI_FIXED_CONFIG 1
#include "hopper_fp8/hopper_fp8.cu"
