// routing.cuh: the expert-grouped layout of the (token, slot) pairs of fp8_moe (moe.md section 3),
// built on the device without any host synchronization (the forward stays CUDA-graph capturable).
// The order is stable and deterministic: expert e owns gathered rows [offsets[e], offsets[e+1]),
// holding its pairs sorted by pair index t * topk + j, whatever the thread scheduling. Integer
// atomics only count; they never decide an order.
//
// Buffers (int32): hist [E, route_chunks(pairs)] (expert-major), offsets [E+1], perm [pairs]
// (gathered row -> pair), inv [pairs] (pair -> gathered row, -1 for an empty or invalid slot).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "moeffi.h"
#include "numerics.cuh"
#include "pdl.cuh"

namespace moeffi {

constexpr int ROUTE_CHUNK = 256; // pairs per histogram / scatter block (a scatter warp walks them in turn)
constexpr int SCAN_THREADS = 1024;

inline int route_chunks(int64_t pairs) { return (int)((pairs + ROUTE_CHUNK - 1) / ROUTE_CHUNK); }

// Exclusive prefix sum of one value per thread of a 1-D block (blockDim.x a multiple of 32, every
// thread calling); smem holds blockDim.x / 32 values.
template <class T> __device__ T block_exclusive_scan(T v, T *smem) {
  const int t = threadIdx.x, lane = t % 32, w = t / 32, warps = blockDim.x / 32;
  T x = v; // inclusive scan within the warp, then of the warp totals by warp 0: three barriers in all
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(0xFFFFFFFFu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) smem[w] = x;
  __syncthreads();
  if (w == 0) {
    T s = lane < warps ? smem[lane] : T(0);
    for (int o = 1; o < 32; o <<= 1) {
      const T y = __shfl_up_sync(0xFFFFFFFFu, s, o);
      if (lane >= o) s += y;
    }
    if (lane < warps) smem[lane] = s;
  }
  __syncthreads();
  const T r = x - v + (w > 0 ? smem[w - 1] : T(0));
  __syncthreads(); // smem is free again for the caller's next scan
  return r;
}

// Block c: hist[e, c] = pairs of chunk c routed to expert e. An id outside [-1, E) counts nowhere
// and raises MOEFFI_ERROR_TOPK_ID.
static __global__ void __launch_bounds__(256)
    route_histogram_kernel(const int32_t *ids, int pairs, int E, int *hist, uint32_t *error_flags) {
  const int64_t chunks = gridDim.x;
  int *h = hist + blockIdx.x;
  for (int e = threadIdx.x; e < E; e += blockDim.x) h[e * chunks] = 0;
  __syncthreads();
  const int64_t begin = (int64_t)blockIdx.x * ROUTE_CHUNK, end = min((int64_t)pairs, begin + ROUTE_CHUNK);
  bool bad = false;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int e = ids[i];
    if (e >= 0 && e < E) atomicAdd(&h[e * chunks], 1);
    else bad |= e != -1;
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0 && error_flags) atomicOr(error_flags, MOEFFI_ERROR_TOPK_ID);
}

// One block of SCAN_THREADS: the exclusive prefix sum of hist in its expert-major order, so
// hist[e, c] becomes the first gathered row of chunk c's pairs of expert e; offsets[e] = hist[e, 0],
// offsets[E] = the count of routed pairs. Each warp owns a contiguous run of whole 32-entry steps
// and walks it a lane per entry, so every load and store is coalesced (a thread per contiguous run
// made each warp access touch 32 sectors: 17 us for qwen3's 128 x 128 entries, NOTES.md), with
// SCAN_BATCH steps' loads in flight at a time.
constexpr int SCAN_BATCH = 4;
static __global__ void __launch_bounds__(SCAN_THREADS) route_scan_kernel(int *hist, int chunks, int E, int *offsets) {
  __shared__ int smem[SCAN_THREADS / 32];
  constexpr int WARPS = SCAN_THREADS / 32;
  const int n = E * chunks, lane = threadIdx.x % 32, w = threadIdx.x / 32; // n < 2^31: the workspace holds it
  const int steps = (n + 32 * WARPS - 1) / (32 * WARPS), lo = w * steps * 32, hi = min(n, lo + steps * 32);
  int total = 0;
  for (int i0 = lo; i0 < hi; i0 += 32 * SCAN_BATCH) {
    int v[SCAN_BATCH];
#pragma unroll
    for (int b = 0; b < SCAN_BATCH; b++) v[b] = i0 + 32 * b + lane < hi ? hist[i0 + 32 * b + lane] : 0;
#pragma unroll
    for (int b = 0; b < SCAN_BATCH; b++) total += v[b];
  }
  for (int o = 16; o; o >>= 1) total += __shfl_xor_sync(0xFFFFFFFFu, total, o);
  int carry = block_exclusive_scan(lane == 0 ? total : 0, smem); // lane 0 carries its warp's total
  carry = __shfl_sync(0xFFFFFFFFu, carry, 0);
  for (int i0 = lo; i0 < hi; i0 += 32 * SCAN_BATCH) {
    int v[SCAN_BATCH];
#pragma unroll
    for (int b = 0; b < SCAN_BATCH; b++) v[b] = i0 + 32 * b + lane < hi ? hist[i0 + 32 * b + lane] : 0;
#pragma unroll
    for (int b = 0; b < SCAN_BATCH; b++) {
      const int i = i0 + 32 * b + lane;
      int incl = v[b];
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xFFFFFFFFu, incl, o);
        if (lane >= o) incl += y;
      }
      const int excl = carry + incl - v[b];
      if (i < hi) {
        hist[i] = excl;
        if (i % chunks == 0) offsets[i / chunks] = excl;
      }
      carry += __shfl_sync(0xFFFFFFFFu, incl, 31);
    }
  }
  if (threadIdx.x == SCAN_THREADS - 1) offsets[E] = carry; // the last warp's carry is the total (empty runs keep it)
}

// One warp walks pairs [begin, end) 32 at a time in order; lanes of one expert take consecutive rows
// in lane order (__match_any_sync), and cursor[e * stride] is the next free row of expert e.
__device__ __forceinline__ void scatter_walk(const int32_t *ids, int64_t begin, int64_t end, int E, int *cursor,
                                             int64_t stride, int *perm, int *inv) {
  const int lane = threadIdx.x % 32;
  for (int64_t i0 = begin; i0 < end; i0 += 32) {
    const int64_t i = i0 + lane;
    const int e = i < end ? ids[i] : -1;
    const bool routed = e >= 0 && e < E;
    const unsigned same = __match_any_sync(0xFFFFFFFFu, routed ? e : -1);
    const int rank = __popc(same & ((1u << lane) - 1u));
    int row = -1;
    if (routed) {
      row = cursor[e * stride] + rank;
      perm[row] = (int)i;
    }
    __syncwarp(); // every lane has read its cursor before the first lane of each expert moves it
    if (routed && rank == 0) cursor[e * stride] += __popc(same);
    __syncwarp();
    if (i < end) inv[i] = row;
  }
}

// One warp per chunk; hist[:, c] (from route_scan_kernel) is the chunk's per-expert cursor.
static __global__ void __launch_bounds__(32)
    route_scatter_kernel(const int32_t *ids, int pairs, int E, int *hist, int *perm, int *inv) {
  const int64_t begin = (int64_t)blockIdx.x * ROUTE_CHUNK, end = min((int64_t)pairs, begin + ROUTE_CHUNK);
  scatter_walk(ids, begin, end, E, hist + blockIdx.x, gridDim.x, perm, inv);
}

// One block of SCAN_THREADS: tile_start[e] = first `rows`-row tile of expert e in a grouped GEMM grid,
// tile_start[E] = the tile count (offsets come from the routing kernels, so they are valid).
static __global__ void __launch_bounds__(SCAN_THREADS) tile_scan_kernel(const int *offsets, int E, int rows, int *tile_start) {
  __shared__ int smem[SCAN_THREADS];
  const int seg = (E + SCAN_THREADS - 1) / SCAN_THREADS;
  const int lo = (int)min((int64_t)E, (int64_t)threadIdx.x * seg), hi = min(E, lo + seg);
  int total = 0;
  for (int e = lo; e < hi; e++) total += (offsets[e + 1] - offsets[e] + rows - 1) / rows;
  int base = block_exclusive_scan(total, smem);
  for (int e = lo; e < hi; e++) {
    tile_start[e] = base;
    base += (offsets[e + 1] - offsets[e] + rows - 1) / rows;
  }
  if (threadIdx.x == SCAN_THREADS - 1) tile_start[E] = base;
}

// Decode-sized routing (pairs <= SCAN_THREADS, E <= SMALL_ROUTE_E) in one block of SCAN_THREADS, with
// the same layout as the three kernels above (and tile_start as tile_scan_kernel's when asked): at
// these sizes each kernel boundary costs more than the work.
constexpr int SMALL_ROUTE_E = 4096;
static __global__ void __launch_bounds__(SCAN_THREADS)
    route_small_kernel(const int32_t *ids, int pairs, int E, int *offsets, int *perm, int *inv, uint32_t *error_flags,
                       int tile_rows, int *tile_start) {
  __shared__ int count[SMALL_ROUTE_E]; // per expert: its pairs, then its cursor
  __shared__ int smem[SCAN_THREADS];
  const int t = threadIdx.x;
  for (int e = t; e < E; e += SCAN_THREADS) count[e] = 0;
  __syncthreads();
  const int id = t < pairs ? ids[t] : -1;
  if (id >= 0 && id < E) atomicAdd(&count[id], 1);
  if (__syncthreads_or(id < -1 || id >= E) && t == 0 && error_flags) atomicOr(error_flags, MOEFFI_ERROR_TOPK_ID);
  const int seg = (E + SCAN_THREADS - 1) / SCAN_THREADS;
  const int lo = min(E, t * seg), hi = min(E, lo + seg);
  int rows = 0, tiles = 0;
  for (int e = lo; e < hi; e++) rows += count[e], tiles += tile_start ? (count[e] + tile_rows - 1) / tile_rows : 0;
  int base = block_exclusive_scan(rows, smem);
  __syncthreads();
  int tbase = tile_start ? block_exclusive_scan(tiles, smem) : 0;
  for (int e = lo; e < hi; e++) { // a thread rewrites only its own experts' counts
    const int n = count[e];
    offsets[e] = count[e] = base;
    base += n;
    if (tile_start) tile_start[e] = tbase, tbase += (n + tile_rows - 1) / tile_rows;
  }
  if (t == SCAN_THREADS - 1) {
    offsets[E] = base;
    if (tile_start) tile_start[E] = tbase;
  }
  __syncthreads();
  if (t < 32) scatter_walk(ids, 0, pairs, E, count, 1, perm, inv);
}

// Enqueues the routing of `pairs` > 0 (token, slot) ids on stream s (one kernel at decode sizes,
// else three), and with tile_start the starts of each expert's tile_rows-row tiles; launch errors are
// left for the caller's cudaGetLastError.
inline void launch_routing(const int32_t *ids, int pairs, int E, int *hist, int *offsets, int *perm, int *inv,
                           uint32_t *error_flags, cudaStream_t s, int tile_rows = 0, int *tile_start = nullptr) {
  if (pairs <= SCAN_THREADS && E <= SMALL_ROUTE_E) {
    route_small_kernel<<<1, SCAN_THREADS, 0, s>>>(ids, pairs, E, offsets, perm, inv, error_flags, tile_rows, tile_start);
    return;
  }
  const int chunks = route_chunks(pairs);
  route_histogram_kernel<<<chunks, 256, 0, s>>>(ids, pairs, E, hist, error_flags);
  route_scan_kernel<<<1, SCAN_THREADS, 0, s>>>(hist, chunks, E, offsets);
  route_scatter_kernel<<<chunks, 32, 0, s>>>(ids, pairs, E, hist, perm, inv);
  if (tile_start) tile_scan_kernel<<<1, SCAN_THREADS, 0, s>>>(offsets, E, tile_rows, tile_start);
}

// out[t, c] = bf16(sum over j = 0..topk-1 in order of w[t, j] * y[inv[t, j], c]), in fp32 from 0;
// a slot with inv -1 contributes nothing. One thread per output element, no atomics.
static __global__ void __launch_bounds__(256) combine_kernel(const float *y, const int *inv, const float *w,
                                                             int64_t tokens, int topk, int64_t K, uint16_t *out) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < tokens * K; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = i / K, c = i % K;
    float sum = 0.0f;
    for (int j = 0; j < topk; j++) {
      const int row = inv[t * topk + j];
      if (row >= 0) sum = add_rn(sum, mul_rn(w[t * topk + j], y[(int64_t)row * K + c]));
    }
    out[i] = f32_to_bf16(sum);
  }
}

// The V = 16 / sizeof(Y) values of y in one 16-byte word (fp32, or bf16 widened exactly).
__device__ __forceinline__ void vec_values(const float *, const uint4 &b, float (&v)[4]) {
  v[0] = __uint_as_float(b.x), v[1] = __uint_as_float(b.y), v[2] = __uint_as_float(b.z), v[3] = __uint_as_float(b.w);
}
__device__ __forceinline__ void vec_values(const uint16_t *, const uint4 &b, float (&v)[8]) { bf16x8_values(b, v); }

// combine_kernel V columns at a time with 16-byte loads of y (fp32 or bf16; K % V == 0), the same
// fixed order and roundings per element. Grid (ceil(K / V / 256), tokens): a block's threads share
// one token's slots and weights, and no index needs a division. Each slot's word stays raw until
// its weighting (bf16: 64 registers, four blocks and their loads in flight per SM). y may
// come as `splits` fp32 partial sums `stride` apart (a GEMM that split K), added in split order first.
template <typename Y, int V = 16 / sizeof(Y)>
static __global__ void __launch_bounds__(256, sizeof(Y) == 2 ? 4 : 1) combine_vec_kernel(const Y *y, int splits, int64_t stride, const int *inv,
                                                                 const float *w, int topk, int64_t K, uint16_t *out) {
  pdl_wait(); // y comes from the previous kernel (when launched with launch_pdl)
  pdl_trigger();
  const int64_t t = blockIdx.y, c = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * V;
  if (c >= K) return;
  float sum[V] = {};
  for (int j0 = 0; j0 < topk; j0 += 8) { // up to 8 slots' loads in flight before the first add (decode latency)
    int row[8];
    uint4 raw[8];
#pragma unroll
    for (int u = 0; u < 8; u++) row[u] = j0 + u < topk ? inv[t * topk + j0 + u] : -1;
#pragma unroll
    for (int u = 0; u < 8; u++) {
      if (row[u] < 0) continue;
      raw[u] = *(const uint4 *)(y + (int64_t)row[u] * K + c);
      for (int z = 1; z < splits; z++) { // fp32 only
        const uint4 p = *(const uint4 *)(y + z * stride + (int64_t)row[u] * K + c);
        raw[u] = make_uint4(__float_as_uint(add_rn(__uint_as_float(raw[u].x), __uint_as_float(p.x))),
                            __float_as_uint(add_rn(__uint_as_float(raw[u].y), __uint_as_float(p.y))),
                            __float_as_uint(add_rn(__uint_as_float(raw[u].z), __uint_as_float(p.z))),
                            __float_as_uint(add_rn(__uint_as_float(raw[u].w), __uint_as_float(p.w))));
      }
    }
#pragma unroll
    for (int u = 0; u < 8; u++) {
      if (row[u] < 0) continue;
      const float wj = w[t * topk + j0 + u];
      float v[V];
      vec_values(y, raw[u], v);
#pragma unroll
      for (int i = 0; i < V; i++) sum[i] = add_rn(sum[i], mul_rn(wj, v[i]));
    }
  }
  uint32_t packed[V / 2];
#pragma unroll
  for (int i = 0; i < V / 2; i++) packed[i] = (uint32_t)f32_to_bf16(sum[2 * i]) | ((uint32_t)f32_to_bf16(sum[2 * i + 1]) << 16);
#pragma unroll
  for (int i = 0; i < V / 4; i++) *(uint2 *)(out + t * K + c + 4 * i) = make_uint2(packed[2 * i], packed[2 * i + 1]); // out: 8-byte aligned
}

} // namespace moeffi
