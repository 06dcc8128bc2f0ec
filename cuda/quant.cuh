// quant.cuh: fp8 quantization of activation rows under the four activation schemes (moe.md
// section 2), with the reference's roundings: s = max(amax / 448, 1 / (448 * 512)), inv = 1 / s,
// q = e4m3(v * inv). One 128-thread block per row. A row source (Bf16Rows, SiluRows) yields the
// fp32 values, so SiLU-and-mul fuses into the requantization of the intermediate.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>

#include "moeffi.h"
#include "numerics.cuh"
#include "pdl.cuh"

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

// Rows of bf16 x [rows, len]; only the first *count exist when count is set.
struct Bf16Rows {
  const uint16_t *x;
  int64_t len;
  const int *count;
  __device__ bool exists(int64_t r) const { return !count || r < *count; }
  __device__ float operator()(int64_t r, int64_t c) const { return bf16_to_f32(x[r * len + c]); }
  using Raw = uint2;
  __device__ Raw fetch(int64_t r, int64_t c) const { return *(const uint2 *)(x + r * len + c); }
  __device__ void values(const Raw &b, float (&v)[4]) const { bf16x4_values(b, v); }
};

// Rows of fp32 x [rows, len]; only the first *count exist.
struct F32Rows {
  const float *x;
  int64_t len;
  const int *count;
  __device__ bool exists(int64_t r) const { return r < *count; }
  __device__ float operator()(int64_t r, int64_t c) const { return x[r * len + c]; }
  using Raw = float4;
  __device__ Raw fetch(int64_t r, int64_t c) const { return *(const float4 *)(x + r * len + c); }
  __device__ void values(const Raw &b, float (&v)[4]) const { v[0] = b.x, v[1] = b.y, v[2] = b.z, v[3] = b.w; }
};

// h = silu(g) * u over the GEMM1 output [rows, 2n] (gate columns, then up); only the first *count
// rows were computed. Evaluated on demand, twice for a per-token scale: cheaper than storing h.
// FAST: silu_mul_fast (hopper_fp8, whose wide path fuses the same form), else the reference's roundings.
template <bool FAST> struct SiluRowsOf {
  const float *gu;
  int64_t n;
  const int *count;
  __device__ static float h(float g, float u) { return FAST ? silu_mul_fast(g, u) : silu_mul(g, u); }
  __device__ bool exists(int64_t r) const { return r < *count; }
  __device__ float operator()(int64_t r, int64_t c) const { return h(gu[r * 2 * n + c], gu[r * 2 * n + n + c]); }
  struct Raw {
    float4 g, u;
  };
  __device__ Raw fetch(int64_t r, int64_t c) const {
    return {*(const float4 *)(gu + r * 2 * n + c), *(const float4 *)(gu + r * 2 * n + n + c)};
  }
  __device__ void values(const Raw &b, float (&v)[4]) const {
    v[0] = h(b.g.x, b.u.x), v[1] = h(b.g.y, b.u.y), v[2] = h(b.g.z, b.u.z), v[3] = h(b.g.w, b.u.w);
  }
};
using SiluRows = SiluRowsOf<false>;
using FastSiluRows = SiluRowsOf<true>;

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
  pdl_wait(); // the rows come from the previous kernel (when launched with launch_pdl)
  pdl_trigger();
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

// Where quantized row r goes: row r itself, or (map set) rows map[r * copies + u] for u < copies,
// -1 meaning nowhere: a token's codes written once per routed slot, in expert order.
struct RowDest {
  const int *map = nullptr;
  int copies = 1;
};

// The same quantization with the row held in registers (dynamic per-token and 1x128 groups only):
// T threads (thread t of them), 4 consecutive elements each, so a 1x128 group is one warp (shuffles
// only). Every load of the row is issued before any arithmetic (rows provide fetch -> Raw, then
// values), so a short row costs one memory latency and a long one streams. Needs len % 4 == 0 and
// len <= J * 4 * T. part: T / 32 floats of shared memory (unused when T == 32: one warp, no barrier).
template <int T, int J, class Rows, bool SCATTER> // SCATTER: dest.map is set (a template flag: no registers otherwise)
__device__ __forceinline__ void quantize_row(const Rows &rows, int64_t r, int t, int64_t len, uint32_t act, uint8_t *q,
                                             float *scales, const RowDest &dest, float *part) {
  const int lane = t % 32;
  typename Rows::Raw raw[J];
#pragma unroll
  for (int j = 0; j < J; j++) {
    const int64_t c = 4 * ((int64_t)j * T + t);
    if (c < len) raw[j] = rows.fetch(r, c);
  }
  float v[J][4];
#pragma unroll
  for (int j = 0; j < J; j++) {
    if (4 * ((int64_t)j * T + t) < len) rows.values(raw[j], v[j]);
    else v[j][0] = v[j][1] = v[j][2] = v[j][3] = 0.0f; // zeros never raise an amax
  }
  const int64_t ng = act_groups(act, len);
  const int *dmap = SCATTER ? dest.map + r * dest.copies : nullptr; // this row's destination rows
  const bool grp = act == MOEFFI_A_DYNAMIC_GROUP_128;
  float inv_row = 0.0f;
  if (!grp) { // one scale for the row: block max
    float m = 0.0f;
#pragma unroll
    for (int j = 0; j < J; j++) m = amax_step(amax_step(amax_step(amax_step(m, v[j][0]), v[j][1]), v[j][2]), v[j][3]);
    for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
    if constexpr (T > 32) {
      if (lane == 0) part[t / 32] = m;
      __syncthreads();
#pragma unroll
      for (int w = 0; w < T / 32; w++) m = fmaxf(m, part[w]);
    }
    const float s = dynamic_scale(m);
    inv_row = div_rn(1.0f, s);
    if (t == 0)
      for (int u = 0; u < (SCATTER ? dest.copies : 1); u++)
        if (const int64_t d = SCATTER ? dmap[u] : r; d >= 0) scales[d * ng] = s;
  }
  uint32_t packed[J]; // SCATTER: this thread's codes of elements 4 (j T + t) .., stored after the loop
  float gs[J];        // SCATTER with 1x128 groups: the scale of each
#pragma unroll
  for (int j = 0; j < J; j++) {
    const int64_t c = 4 * ((int64_t)j * T + t);
    float inv = inv_row;
    if (grp) { // this warp's 128 elements are group c / 128
      float m = amax_step(amax_step(amax_step(amax_step(0.0f, v[j][0]), v[j][1]), v[j][2]), v[j][3]);
      for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
      gs[j] = dynamic_scale(m);
      inv = div_rn(1.0f, gs[j]);
      if (!SCATTER && lane == 0 && c < len) scales[r * ng + c / QBLK] = gs[j];
    }
    packed[j] = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) packed[j] |= (uint32_t)f32_to_e4m3(scale_value(v[j][i], inv)) << (8 * i);
    if (!SCATTER && c < len) *(uint32_t *)(q + r * len + c) = packed[j];
  }
  if constexpr (SCATTER) {
    for (int u = 0; u < dest.copies; u++) { // after the loop above: a store loop inside it would keep it rolled
      const int64_t d = dmap[u];
      if (d < 0) continue;
#pragma unroll
      for (int j = 0; j < J; j++) {
        const int64_t c = 4 * ((int64_t)j * T + t);
        if (c >= len) continue;
        *(uint32_t *)(q + d * len + c) = packed[j];
        if (grp && lane == 0) scales[d * ng + c / QBLK] = gs[j];
      }
    }
  }
}

template <int T, int J, class Rows, bool SCATTER>
static __global__ void __launch_bounds__(T)
    quantize_rows_vec_kernel(Rows rows, int64_t len, uint32_t act, uint8_t *q, float *scales, RowDest dest) {
  __shared__ float part[T / 32];
  pdl_wait(); // the rows come from the previous kernel (when launched with launch_pdl)
  pdl_trigger();
  if (rows.exists(blockIdx.x)) quantize_row<T, J, Rows, SCATTER>(rows, blockIdx.x, threadIdx.x, len, act, q, scales, dest, part);
}

// Short rows (len <= 128 J) a warp each, eight warps a block, the grid striding over the rows: with
// a block per row, the block launches themselves bound short rows (qwen3's 768-wide h: 67 -> 54 us for
// 50 MB read, NOTES.md).
constexpr int QUANT_WARP_BLOCK = 256;
template <int J, class Rows, bool SCATTER>
static __global__ void __launch_bounds__(QUANT_WARP_BLOCK, 3) // 85 registers: three blocks, 24 rows in flight per SM
    quantize_rows_warp_kernel(Rows rows, int64_t count, int64_t len, uint32_t act, uint8_t *q, float *scales, RowDest dest) {
  pdl_wait(); // the rows come from the previous kernel (when launched with launch_pdl)
  pdl_trigger();
  constexpr int WARPS = QUANT_WARP_BLOCK / 32;
  for (int64_t r = (int64_t)blockIdx.x * WARPS + threadIdx.x / 32; r < count; r += (int64_t)gridDim.x * WARPS)
    if (rows.exists(r)) quantize_row<32, J, Rows, SCATTER>(rows, r, threadIdx.x % 32, len, act, q, scales, dest, nullptr);
}

// Whether the register kernel takes rows of len elements.
inline bool quantize_fits(int64_t len) { return len % 4 == 0 && len <= 16384; }

// The register kernel's launch: beyond 64 rows, bf16 rows up to 1024 elements a warp each
// (quantize_rows_warp_kernel); other rows a block each, of 256 threads up to 8192
// elements (many small blocks overlap one another's load and reduction phases; 1024-thread blocks
// were 2.5x slower on 7168-wide rows, NOTES.md), 512 above; 1024 for at most 64 rows (decode, where
// one row's latency is the kernel's time).
template <bool SCATTER, class Rows>
void launch_quantize_rows_vec(const Rows &rows, int64_t count, int64_t len, uint32_t act, uint8_t *q, float *scales,
                              cudaStream_t s, bool pdl, RowDest dest) {
  const dim3 grid((unsigned)count), wgrid((unsigned)std::min<int64_t>((count + 7) / 8, 2048));
#define MOEFFI_QUANT_VEC(T, J) launch_pdl(pdl, quantize_rows_vec_kernel<T, J, Rows, SCATTER>, grid, T, 0, s, rows, len, act, q, scales, dest)
#define MOEFFI_QUANT_WARP(J) \
  launch_pdl(pdl, quantize_rows_warp_kernel<J, Rows, SCATTER>, wgrid, QUANT_WARP_BLOCK, 0, s, rows, count, len, act, q, scales, dest)
  if constexpr (sizeof(typename Rows::Raw) == 8) { // bf16 rows (fp32 ones need twice the registers)
    if (count > 64 && len <= 1024) {
      MOEFFI_QUANT_WARP(8);
      return;
    }
  }
  if (count <= 64 && len > 1024) {
    if (len <= 4096) MOEFFI_QUANT_VEC(1024, 1);
    else if (len <= 8192) MOEFFI_QUANT_VEC(1024, 2);
    else MOEFFI_QUANT_VEC(1024, 4);
  } else if (len <= 1024) MOEFFI_QUANT_VEC(256, 1);
  else if (len <= 2048) MOEFFI_QUANT_VEC(256, 2);
  else if (len <= 4096) MOEFFI_QUANT_VEC(256, 4);
  else if (len <= 8192) MOEFFI_QUANT_VEC(256, 8);
  else MOEFFI_QUANT_VEC(512, 8);
#undef MOEFFI_QUANT_WARP
#undef MOEFFI_QUANT_VEC
}

// Quantizes rows [0, count) (those that exist) under a dynamic per-token or 1x128 scheme with the
// register kernel when the row fits, else (and under a static per-tensor scale, *fixed on the device)
// with the looping one. With pdl the launch may overlap the end of the previous kernel (pdl.cuh).
template <class Rows>
void launch_quantize_rows(const Rows &rows, int64_t count, int64_t len, uint32_t act, uint8_t *q, float *scales,
                          cudaStream_t s, bool pdl = false, const float *fixed = nullptr) {
  if (quantize_fits(len) && act != MOEFFI_A_STATIC_TENSOR) launch_quantize_rows_vec<false>(rows, count, len, act, q, scales, s, pdl, RowDest{});
  else launch_pdl(pdl, quantize_rows_kernel<Rows>, dim3((unsigned)count), QUANT_THREADS, 0, s, rows, len, ActScheme{act, fixed, nullptr}, q, scales);
}

// The same, each row's codes and scales written to dest's rows; needs quantize_fits(len).
template <class Rows>
void launch_quantize_rows_scattered(const Rows &rows, int64_t count, int64_t len, uint32_t act, uint8_t *q, float *scales,
                                    cudaStream_t s, bool pdl, RowDest dest) {
  launch_quantize_rows_vec<true>(rows, count, len, act, q, scales, s, pdl, dest);
}

} // namespace moeffi
