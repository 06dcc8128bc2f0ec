// quant.cuh: fp8 quantization of activation rows under the four activation schemes (moe.md
// section 2), with the reference's roundings: s = max(amax / 448, 1 / (448 * 512)), inv = 1 / s,
// q = e4m3(v * inv). One 128-thread block per row. A row source (Bf16Rows, SiluRows) yields the
// fp32 values, so SiLU-and-mul fuses into the requantization of the intermediate.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "moeffi.h"
#include "numerics.cuh"

namespace moeffi {

constexpr int QUANT_THREADS = 128; // == QBLK: one thread per element of a 1x128 group

// Scales per row of length len: one per 128-wide group, or one for the row.
MOEFFI_HD int64_t act_groups(uint32_t act, int64_t len) {
  return act == MOEFFI_A_DYNAMIC_GROUP_128 ? (len + QBLK - 1) / QBLK : 1;
}

// An activation scheme and where its single scale comes from when it has one.
struct ActScheme {
  uint32_t act;         // enum moeffi_act_scale
  const float *fixed;   // static per-tensor: the caller's scale (device)
  const uint32_t *amax; // dynamic per-tensor: float bits of the batch amax (device)
  __device__ float tensor_scale() const {
    return act == MOEFFI_A_STATIC_TENSOR ? *fixed : dynamic_scale(__uint_as_float(*amax));
  }
};

// Rows of bf16 x [rows, len].
struct Bf16Rows {
  const uint16_t *x;
  int64_t len;
  __device__ bool exists(int64_t) const { return true; }
  __device__ float operator()(int64_t r, int64_t c) const { return bf16_to_f32(x[r * len + c]); }
};

// h = silu(g) * u over the GEMM1 output [rows, 2n] (gate columns, then up); only the first *count
// rows were computed. Evaluated on demand, twice for a per-token scale: cheaper than storing h.
struct SiluRows {
  const float *gu;
  int64_t n;
  const int *count;
  __device__ bool exists(int64_t r) const { return r < *count; }
  __device__ float operator()(int64_t r, int64_t c) const { return silu_mul(gu[r * 2 * n + c], gu[r * 2 * n + n + c]); }
};

// Max over a QUANT_THREADS block, returned to every thread. Inputs are amax_step results, never
// NaN, so the result does not depend on the reduction order.
__device__ inline float block_max(float v) {
  __shared__ float part[QUANT_THREADS / 32];
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  v = fmaxf(fmaxf(part[0], part[1]), fmaxf(part[2], part[3]));
  __syncthreads(); // part is reused by the next call
  return v;
}

// Largest magnitude of row r, NaN ignored.
template <class Rows> __device__ float row_amax(const Rows &rows, int64_t r, int64_t len) {
  float m = 0.0f;
  for (int64_t c = threadIdx.x; c < len; c += QUANT_THREADS) m = amax_step(m, rows(r, c));
  return block_max(m);
}

// Block r: q[r, :] = e4m3 codes of row r, scales[r, :] = its dequant scales (act_groups per row).
template <class Rows>
static __global__ void __launch_bounds__(QUANT_THREADS)
    quantize_rows_kernel(Rows rows, int64_t len, ActScheme sch, uint8_t *q, float *scales) {
  const int64_t r = blockIdx.x;
  if (!rows.exists(r)) return;
  uint8_t *qr = q + r * len;
  float *sr = scales + r * act_groups(sch.act, len);
  if (sch.act == MOEFFI_A_DYNAMIC_GROUP_128) {
    for (int64_t g0 = 0; g0 < len; g0 += QBLK) {
      const int64_t c = g0 + threadIdx.x;
      const float v = c < len ? rows(r, c) : 0.0f;
      const float s = dynamic_scale(block_max(amax_step(0.0f, v))), inv = div_rn(1.0f, s);
      if (c < len) qr[c] = f32_to_e4m3(scale_value(v, inv));
      if (threadIdx.x == 0) sr[g0 / QBLK] = s;
    }
    return;
  }
  const float s = sch.act == MOEFFI_A_DYNAMIC_TOKEN ? dynamic_scale(row_amax(rows, r, len)) : sch.tensor_scale();
  const float inv = div_rn(1.0f, s);
  for (int64_t c = threadIdx.x; c < len; c += QUANT_THREADS) qr[c] = f32_to_e4m3(scale_value(rows(r, c), inv));
  if (threadIdx.x == 0) sr[0] = s;
}

// Block r: *amax = max(*amax, amax of row r), for dynamic per-tensor scales. Non-negative floats
// order like their bit patterns, so an integer atomicMax is exact and order-independent. *amax
// must be zeroed before the first launch.
template <class Rows>
static __global__ void __launch_bounds__(QUANT_THREADS) amax_rows_kernel(Rows rows, int64_t len, uint32_t *amax) {
  const int64_t r = blockIdx.x;
  if (!rows.exists(r)) return;
  const float m = row_amax(rows, r, len);
  if (threadIdx.x == 0) atomicMax(amax, __float_as_uint(m));
}

} // namespace moeffi
