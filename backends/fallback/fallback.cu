// fallback.cu: the portable CUDA backend of moeffi (sm_80+). Plain, obviously in-bounds kernels
// that mirror backends/reference/reference.c: quantization, routing and NVFP4 are bit-exact; the
// GEMMs reduce every output element in one thread, in 128-wide K blocks in order, so only the fp32
// summation order inside a block differs from the reference. Nothing depends on M but the grid
// size, so results are deterministic and batch invariant (except dynamic per-tensor scales).
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "check.cuh"
#include "moeffi.h"
#include "numerics.cuh"
#include "quant.cuh"
#include "routing.cuh"

using namespace moeffi;

MOEFFI_DEFINE_LAYOUT()

namespace {

constexpr int64_t CHUNK = 4096;      // tokens per pass: bounds the workspace
constexpr int64_t MAX_DIM = 1 << 20; // n, k of fp8 ops: keeps the GEMM grid's y = ceil(2n / 64) legal
constexpr uint64_t WS_ALIGN = 256;
constexpr int BM = 64, BN = 64, BK = 32, GEMM_THREADS = 256; // GEMM tile, the same for every M
constexpr int MAX_ROW_SLOTS = 16; // blocks per (expert, column tile), each looping over row tiles
constexpr int TOPK_WARPS = 4;

#define FAIL(status, ...)              \
  do {                                 \
    moeffi_say(msg, cap, __VA_ARGS__); \
    return (status);                   \
  } while (0)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
bool is_fp8(uint32_t op) { return op == MOEFFI_OP_FP8_MOE || op == MOEFFI_OP_FP8_SCALED_MM; }
bool kblocked(const moeffi_problem *p) {
  return p->act_scale == MOEFFI_A_DYNAMIC_GROUP_128 || p->weight_scale == MOEFFI_W_BLOCK_128;
}

// ---- problem checks ----

// What supported() reports; every other entry point refuses the same problems.
int32_t check_problem(const moeffi_problem *p, char *msg, uint32_t cap) {
  if (!p) FAIL(MOEFFI_INVALID, "problem is NULL");
  if (p->size < sizeof(moeffi_problem)) FAIL(MOEFFI_INVALID, "problem struct too small");
  if (p->op >= MOEFFI_OP_COUNT) FAIL(MOEFFI_UNSUPPORTED, "unknown op %u", p->op);
  if (p->op == MOEFFI_OP_NVFP4_SILU_QUANT) FAIL(MOEFFI_UNSUPPORTED, "the fallback does not implement nvfp4_silu_quant");
  const int32_t device = moeffi_check_cuda_device(p, "fallback", 8, 99, "sm_80+", msg, cap);
  if (device != MOEFFI_OK) return device;
  if (is_fp8(p->op)) {
    if (p->weight_scale > MOEFFI_W_BLOCK_128) FAIL(MOEFFI_UNSUPPORTED, "unknown weight scale %u", p->weight_scale);
    if (p->act_scale > MOEFFI_A_DYNAMIC_GROUP_128) FAIL(MOEFFI_UNSUPPORTED, "unknown activation scale %u", p->act_scale);
    if ((p->flags & MOEFFI_FLAG_BATCH_INVARIANT) && p->act_scale == MOEFFI_A_DYNAMIC_TENSOR)
      FAIL(MOEFFI_UNSUPPORTED,
           "dynamic per-tensor activation scales depend on the whole batch, so they are not batch invariant");
    if (p->n > MAX_DIM || p->k > MAX_DIM)
      FAIL(MOEFFI_UNSUPPORTED, "n and k must be at most %lld on this backend", (long long)MAX_DIM);
  }
  if (p->op == MOEFFI_OP_FP8_MOE && p->topk > INT32_MAX / CHUNK)
    FAIL(MOEFFI_UNSUPPORTED, "topk = %lld is too large for this backend", (long long)p->topk);
  if (p->op == MOEFFI_OP_NVFP4_EXPERTS_QUANT && p->m + 127 * p->experts > INT32_MAX)
    FAIL(MOEFFI_UNSUPPORTED, "m + 127 * experts exceeds the int32 scale row index");
  return MOEFFI_OK;
}

// The core validates shapes; these checks only keep index arithmetic in range.
int32_t check_dims(const moeffi_problem *p, char *msg, uint32_t cap) {
  const int64_t d[] = {p->m, p->n, p->k, p->experts, p->topk};
  const char *names[] = {"m", "n", "k", "experts", "topk"};
  for (int i = 0; i < 5; i++)
    if (d[i] < 0 || d[i] > INT32_MAX) FAIL(MOEFFI_INVALID, "%s = %lld is out of range", names[i], (long long)d[i]);
  const bool need_n = is_fp8(p->op), need_e = p->op != MOEFFI_OP_FP8_SCALED_MM;
  const bool need_topk = p->op == MOEFFI_OP_FP8_MOE || p->op == MOEFFI_OP_TOPK_SOFTMAX;
  const bool need_k = p->op != MOEFFI_OP_TOPK_SOFTMAX;
  if ((need_n && p->n == 0) || (need_k && p->k == 0) || (need_e && p->experts == 0) || (need_topk && p->topk == 0))
    FAIL(MOEFFI_INVALID, "a dimension of op %u is zero", p->op);
  if (p->op == MOEFFI_OP_TOPK_SOFTMAX && p->topk > p->experts)
    FAIL(MOEFFI_INVALID, "topk = %lld exceeds experts = %lld", (long long)p->topk, (long long)p->experts);
  if (p->op == MOEFFI_OP_NVFP4_EXPERTS_QUANT && p->k % 16)
    FAIL(MOEFFI_INVALID, "k = %lld is not a multiple of 16", (long long)p->k);
  return MOEFFI_OK;
}

int32_t check_all(const moeffi_problem *p, char *msg, uint32_t cap) {
  const int32_t st = check_problem(p, msg, cap);
  return st ? st : check_dims(p, msg, cap);
}

// ---- kernels ----

// A grouped dequant GEMM: out[p, n] = sum over k of A[arow(p), k] * W_g[n, k], with fp8 A and W and
// their scales, for the output rows p of group (expert) g = [offsets[g], offsets[g+1]).
struct GemmArgs {
  const uint8_t *a;   // fp8 activations [*, klen]
  const float *as;    // their scales [*, a_ng]
  int64_t a_ng;
  const int *perm;    // non-NULL: output row p reads activation row perm[p] / topk (the token of a pair)
  int topk;
  const int *offsets; // [groups + 1] output rows of each group; NULL: one group of `rows`
  int rows;
  const uint8_t *w;   // fp8 weights [groups, nout, klen]
  const float *ws;    // their scales per weight_scale, [groups, ...]
  uint32_t wscheme;
  int nout, klen;
  bool kblocked;      // scales applied per 128-wide K block, else once at the end
  float *out;         // fp32 [rows, nout]; when NULL:
  uint16_t *out_bf16; // bf16 [rows, nout] of out + bias (bias [nout] bf16 or NULL)
  const uint16_t *bias;
};

// Scales for K block kb of the thread's rows (arow[ty + 16i]) and columns (n + 16j); 0 outside.
__device__ __forceinline__ void tile_scales(const float *as, int64_t a_ng, const int *arow, const float *ws,
                                            uint32_t wscheme, int n, int nout, int kb, int nkb, float (&sa)[4],
                                            float (&sw)[4]) {
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int r = arow[threadIdx.x / 16 + 16 * i], c = n + 16 * i;
    sa[i] = r >= 0 ? as[r * a_ng + (a_ng > 1 ? kb : 0)] : 0.0f;
    sw[i] = c >= nout                            ? 0.0f
            : wscheme == MOEFFI_W_PER_TENSOR  ? ws[0]
            : wscheme == MOEFFI_W_PER_CHANNEL ? ws[c]
                                              : ws[(int64_t)(c / QBLK) * nkb + kb];
  }
}

// Block (g, column tile, row slot): a BM x BN output tile, its rows taken in turn by the gridDim.z
// slots. Thread (ty, tx) owns rows ty + 16i and columns tx + 16j; per 128-wide K block it sums
// exact e4m3 products into fp32 `part`, then promotes into `acc` as the reference does.
static __global__ void __launch_bounds__(GEMM_THREADS, 2) grouped_gemm_kernel(const GemmArgs g) {
  __shared__ float a_tile[BK][BM + 1], w_tile[BK][BN + 1]; // k-major; +1 makes the stores conflict-free
  __shared__ int arow[BM];
  const int grp = blockIdx.x, n0 = blockIdx.y * BN, tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int begin = g.offsets ? g.offsets[grp] : 0, end = g.offsets ? g.offsets[grp + 1] : g.rows;
  const int nkb = (g.klen + QBLK - 1) / QBLK;
  const int64_t nscales = g.wscheme == MOEFFI_W_PER_TENSOR    ? 1
                          : g.wscheme == MOEFFI_W_PER_CHANNEL ? g.nout
                                                              : (int64_t)((g.nout + QBLK - 1) / QBLK) * nkb;
  const float *ws = g.ws + grp * nscales;
  const int lr = tid / 4, lk = tid % 4 * 8; // loader: 8 consecutive k of row lr of both tiles
  const uint8_t *wrow = n0 + lr < g.nout ? g.w + ((int64_t)grp * g.nout + n0 + lr) * g.klen : nullptr;

  for (int m0 = begin + blockIdx.z * BM; m0 < end; m0 += gridDim.z * BM) {
    __syncthreads(); // the previous row tile is done with arow
    if (tid < BM) arow[tid] = m0 + tid < end ? (g.perm ? g.perm[m0 + tid] / g.topk : m0 + tid) : -1;
    __syncthreads();
    const uint8_t *arow_ptr = arow[lr] >= 0 ? g.a + (int64_t)arow[lr] * g.klen : nullptr;
    float sa[4], sw[4], acc[4][4] = {};
    for (int kb = 0; kb < nkb; kb++) {
      float part[4][4] = {};
      for (int k0 = kb * QBLK; k0 < min(g.klen, (kb + 1) * QBLK); k0 += BK) {
        __syncthreads(); // everyone is done reading the previous tiles
#pragma unroll
        for (int b = 0; b < 8; b++) {
          const int k = k0 + lk + b;
          a_tile[lk + b][lr] = arow_ptr && k < g.klen ? e4m3_to_f32(arow_ptr[k]) : 0.0f;
          w_tile[lk + b][lr] = wrow && k < g.klen ? e4m3_to_f32(wrow[k]) : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < BK; k++) {
          float av[4], wv[4];
#pragma unroll
          for (int i = 0; i < 4; i++) av[i] = a_tile[k][ty + 16 * i], wv[i] = w_tile[k][tx + 16 * i];
#pragma unroll
          for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) part[i][j] = fmaf(av[i], wv[j], part[i][j]); // exact products: fma == mul + add
        }
      }
      if (g.kblocked) tile_scales(g.as, g.a_ng, arow, ws, g.wscheme, n0 + tx, g.nout, kb, nkb, sa, sw);
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
          acc[i][j] = add_rn(acc[i][j], g.kblocked ? mul_rn(mul_rn(part[i][j], sa[i]), sw[j]) : part[i][j]);
    }
    if (!g.kblocked) {
      tile_scales(g.as, g.a_ng, arow, ws, g.wscheme, n0 + tx, g.nout, 0, nkb, sa, sw);
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = mul_rn(mul_rn(acc[i][j], sa[i]), sw[j]);
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int p = m0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const int n = n0 + tx + 16 * j;
        if (p >= end || n >= g.nout) continue;
        const int64_t o = (int64_t)p * g.nout + n;
        if (g.out) g.out[o] = acc[i][j];
        else g.out_bf16[o] = f32_to_bf16(g.bias ? add_rn(acc[i][j], bf16_to_f32(g.bias[n])) : acc[i][j]);
      }
    }
  }
}

void launch_gemm(const GemmArgs &g, int groups, int64_t max_rows, cudaStream_t s) {
  const dim3 grid(groups, (unsigned)ceil_div(g.nout, BN), (unsigned)std::min<int64_t>(ceil_div(max_rows, BM), MAX_ROW_SLOTS));
  grouped_gemm_kernel<<<grid, GEMM_THREADS, 0, s>>>(g);
}

// One warp per row of logits: softmax weights of the topk largest (ties to the lower id). The
// denominator is summed by lane 0 in expert order, as the reference does; a slot's candidate is the
// best expert ranking after the previous slot's, found by a lane scan and a butterfly, which is
// exact because (logit, id) is a total order for non-NaN logits. With NaN logits (undefined in the
// reference) ids still stay in [-1, E).
static __global__ void __launch_bounds__(TOPK_WARPS * 32)
    topk_softmax_kernel(const float *logits, int64_t M, int E, int topk, bool renorm, int32_t *ids, float *weights) {
  const int64_t row = (int64_t)blockIdx.x * TOPK_WARPS + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= M) return;
  const float *l = logits + row * E;
  float mx = -INFINITY;
  for (int e = lane; e < E; e += 32) mx = fmaxf(mx, l[e]);
  for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));
  float sum = 0.0f, chosen = 0.0f; // lane 0 only
  if (lane == 0)
    for (int e = 0; e < E; e++) sum = add_rn(sum, expf(l[e] - mx));
  int32_t *id = ids + row * topk;
  float *wt = weights + row * topk;
  int prev = -1;
  float pv = 0.0f;
  for (int s = 0; s < topk; s++) {
    int best = -1;
    float bv = 0.0f;
    for (int e = lane; e < E; e += 32) {
      const float v = l[e];
      if ((prev < 0 || pv > v || (pv == v && prev < e)) && (best < 0 || v > bv)) best = e, bv = v;
    }
    for (int o = 16; o; o >>= 1) {
      const int ob = __shfl_xor_sync(0xFFFFFFFFu, best, o);
      const float ov = __shfl_xor_sync(0xFFFFFFFFu, bv, o);
      if (ob >= 0 && (best < 0 || ov > bv || (ov == bv && ob < best))) best = ob, bv = ov;
    }
    if (lane == 0) {
      const float w = best >= 0 ? div_rn(expf(bv - mx), sum) : 0.0f;
      id[s] = best;
      wt[s] = w;
      chosen = add_rn(chosen, w);
    }
    prev = best, pv = bv;
  }
  if (renorm && lane == 0)
    for (int s = 0; s < topk; s++) wt[s] = div_rn(wt[s], chosen);
}

// One block of SCAN_THREADS: *ok = expert offsets run 0..M non-decreasing (else the error flag is
// raised and nothing is written); tile_base[e] = first scale row of expert e, the earlier experts'
// rows each rounded up to 128. Each thread owns a contiguous run of experts.
static __global__ void __launch_bounds__(SCAN_THREADS)
    nvfp4_offsets_kernel(const int32_t *off, int E, int64_t M, int *ok, int *tile_base, uint32_t *error_flags) {
  __shared__ int smem[SCAN_THREADS];
  const int seg = (E + SCAN_THREADS - 1) / SCAN_THREADS;
  const int lo = (int)min((int64_t)E, (int64_t)threadIdx.x * seg), hi = min(E, lo + seg);
  bool bad = threadIdx.x == 0 && (off[0] != 0 || off[E] != M);
  for (int e = lo; e < hi; e++) bad |= off[e + 1] < off[e];
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    *ok = !bad;
    if (bad && error_flags) atomicOr(error_flags, MOEFFI_ERROR_EXPERT_OFFSETS);
  }
  if (bad) return;
  int padded = 0; // offsets are valid now: every sum is at most M + 127 * E, an int
  for (int e = lo; e < hi; e++) padded += (off[e + 1] - off[e] + 127) / 128 * 128;
  int base = block_exclusive_scan(padded, smem);
  for (int e = lo; e < hi; e++) {
    tile_base[e] = base;
    base += (off[e + 1] - off[e] + 127) / 128 * 128;
  }
}

// One thread per 16-element block (row r, scale column c); the expert comes from a binary search.
static __global__ void __launch_bounds__(256)
    nvfp4_quant_kernel(const uint16_t *x, const int32_t *off, const float *gscale, const int *ok, const int *tile_base,
                       int E, int64_t M, int64_t K, uint8_t *out, uint8_t *sf) {
  if (!*ok) return;
  const int64_t cols = K / 16, ktiles = (K + 63) / 64;
  for (int64_t it = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; it < M * cols; it += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = it / cols, c = it % cols;
    int lo = 0, hi = E; // off[lo] <= r < off[hi]
    while (hi - lo > 1) {
      const int mid = lo + (hi - lo) / 2;
      if (off[mid] <= r) lo = mid;
      else hi = mid;
    }
    const uint8_t code = nvfp4_block(x + r * K + c * 16, gscale[lo], out + r * (K / 2) + c * 8);
    sf[nvfp4_scale_offset(tile_base[lo], ktiles, r - off[lo], c)] = code;
  }
}

// ---- workspace: 256-byte aligned sub-buffers, sized for one chunk of min(M, CHUNK) tokens ----

struct Plan {
  uint64_t amax, xq, xs;                          // fp8: amax words [2], x chunk as fp8 [Mc, K], scales
  uint64_t hist, offsets, perm, inv, acc, hq, hs; // moe: routing; GEMM1 then GEMM2 out f32; h as fp8, scales
  uint64_t ok, tile_base;                         // nvfp4: offsets-valid word, first scale row per expert
  uint64_t total;
};

uint64_t take(uint64_t *cursor, uint64_t bytes) {
  const uint64_t at = (*cursor + WS_ALIGN - 1) / WS_ALIGN * WS_ALIGN;
  *cursor = at + bytes;
  return at;
}

Plan plan_workspace(const moeffi_problem *p) {
  Plan w = {};
  uint64_t c = 0;
  const uint64_t mc = (uint64_t)std::min<int64_t>(p->m, CHUNK), n = p->n, k = p->k, e = p->experts, f = 4;
  if (mc == 0) return w;
  if (p->op == MOEFFI_OP_NVFP4_EXPERTS_QUANT) {
    w.ok = take(&c, 4);
    w.tile_base = take(&c, e * 4);
  } else if (is_fp8(p->op)) {
    w.amax = take(&c, 2 * 4);
    w.xq = take(&c, mc * k);
    w.xs = take(&c, mc * act_groups(p->act_scale, k) * f);
    if (p->op == MOEFFI_OP_FP8_MOE) {
      const uint64_t pc = mc * p->topk;
      w.hist = take(&c, (uint64_t)route_chunks(pc) * e * 4);
      w.offsets = take(&c, (e + 1) * 4);
      w.perm = take(&c, pc * 4);
      w.inv = take(&c, pc * 4);
      w.acc = take(&c, pc * std::max(2 * n, k) * f);
      w.hq = take(&c, pc * n);
      w.hs = take(&c, pc * act_groups(p->act_scale, n) * f);
    }
  }
  w.total = c;
  return w;
}

// ---- prepared weights: the canonical fp8 layout, copied into the handle's own device memory ----

struct Handle {
  uint32_t op, weight_scale, act_scale;
  int64_t n, k, experts;
  int device;
  void *mem;          // one allocation holding the four below
  uint8_t *w13, *w2;  // fp8 [E, 2N, K] (mm: [N, K]) and [E, K, N]
  float *s13, *s2;    // their scales
};

int64_t scale_count(uint32_t wscheme, int64_t rows, int64_t len) {
  if (wscheme == MOEFFI_W_PER_CHANNEL) return rows;
  if (wscheme == MOEFFI_W_BLOCK_128) return ceil_div(rows, QBLK) * ceil_div(len, QBLK);
  return 1;
}

int32_t check_handle(const moeffi_problem *p, const Handle *h, char *msg, uint32_t cap) {
  if (!h) FAIL(MOEFFI_INVALID, "handle is NULL: call prepare first");
  if (h->op != p->op || h->n != p->n || h->k != p->k || h->experts != p->experts || h->weight_scale != p->weight_scale ||
      h->act_scale != p->act_scale || h->device != p->device_index)
    FAIL(MOEFFI_INVALID, "problem (op, n, k, experts, scheme or device) differs from the one the handle was prepared for");
  return MOEFFI_OK;
}

// A NULL tensor is an error only when it has elements.
#define NEED(ptr, count, slot) \
  if (!(ptr) && (count) != 0) FAIL(MOEFFI_INVALID, "tensors->%s is NULL", slot)

int32_t check_tensors(const moeffi_problem *p, const moeffi_tensors *t, char *msg, uint32_t cap) {
  const uint64_t M = p->m, N = p->n, K = p->k, E = p->experts, P = M * p->topk;
  const bool stat = p->act_scale == MOEFFI_A_STATIC_TENSOR && M > 0;
  switch (p->op) {
  case MOEFFI_OP_FP8_MOE:
    NEED(t->x, M * K, "x"); NEED(t->out, M * K, "out"); NEED(t->topk_ids, P, "topk_ids");
    NEED(t->topk_weights, P, "topk_weights"); NEED(t->a1_scale, stat, "a1_scale"); NEED(t->a2_scale, stat, "a2_scale");
    break;
  case MOEFFI_OP_FP8_SCALED_MM:
    NEED(t->x, M * K, "x"); NEED(t->out, M * N, "out"); NEED(t->a1_scale, stat, "a1_scale");
    NEED(t->bias, (p->flags & MOEFFI_FLAG_HAS_BIAS) ? N : 0, "bias");
    break;
  case MOEFFI_OP_TOPK_SOFTMAX:
    NEED(t->x, M * E, "x"); NEED(t->out, P, "out"); NEED(t->out_aux, P, "out_aux");
    break;
  default:
    NEED(t->x, M * K, "x"); NEED(t->out, M * K / 2, "out"); NEED(t->out_aux, 1, "out_aux");
    NEED(t->expert_offsets, 1, "expert_offsets"); NEED(t->global_scale, E, "global_scale");
  }
  return MOEFFI_OK;
}

// ---- ops: everything on one stream, no host synchronization, no host reads of device data ----

int32_t run_fp8_moe(const moeffi_problem *p, const Handle *h, const moeffi_tensors *t, char *base, cudaStream_t s,
                    char *msg, uint32_t cap) {
  const Plan w = plan_workspace(p);
  const int64_t M = p->m, N = p->n, K = p->k;
  const int E = (int)p->experts, topk = (int)p->topk;
  const uint32_t act = p->act_scale;
  const bool dyn = act == MOEFFI_A_DYNAMIC_TENSOR;
  uint32_t *amax = (uint32_t *)(base + w.amax); // [0]: of x, [1]: of the intermediate
  uint8_t *xq = (uint8_t *)(base + w.xq), *hq = (uint8_t *)(base + w.hq);
  float *xs = (float *)(base + w.xs), *hs = (float *)(base + w.hs), *acc = (float *)(base + w.acc);
  int *hist = (int *)(base + w.hist), *offsets = (int *)(base + w.offsets);
  int *perm = (int *)(base + w.perm), *inv = (int *)(base + w.inv);
  const uint16_t *x = (const uint16_t *)t->x;
  const int32_t *ids = (const int32_t *)t->topk_ids;
  const ActScheme sx = {act, (const float *)t->a1_scale, amax}, sh = {act, (const float *)t->a2_scale, amax + 1};
  if (dyn) {
    MOEFFI_CUDA_TRY(cudaMemsetAsync(amax, 0, 2 * sizeof(uint32_t), s));
    amax_rows_kernel<<<(unsigned)M, QUANT_THREADS, 0, s>>>(Bf16Rows{x, K}, K, amax);
  }
  // The intermediate's per-tensor amax spans every routed pair of the batch: with several chunks a
  // first pass runs each chunk up to GEMM1 for it alone, and the second pass recomputes GEMM1.
  for (int pass = dyn && M > CHUNK ? 0 : 1; pass < 2; pass++)
    for (int64_t t0 = 0; t0 < M; t0 += CHUNK) {
      const int64_t mc = std::min(CHUNK, M - t0);
      const int pc = (int)(mc * topk);
      quantize_rows_kernel<<<(unsigned)mc, QUANT_THREADS, 0, s>>>(Bf16Rows{x + t0 * K, K}, K, sx, xq, xs);
      launch_routing(ids + t0 * topk, pc, E, hist, offsets, perm, inv, t->error_flags, s);
      launch_gemm({xq, xs, act_groups(act, K), perm, topk, offsets, 0, h->w13, h->s13, p->weight_scale, (int)(2 * N),
                   (int)K, kblocked(p), acc, nullptr, nullptr},
                  E, pc, s);
      const SiluRows hrows = {acc, N, offsets + E}; // rows [0, offsets[E]) are routed
      if (dyn && (pass == 0 || M <= CHUNK)) amax_rows_kernel<<<pc, QUANT_THREADS, 0, s>>>(hrows, N, amax + 1);
      if (pass == 1) {
        quantize_rows_kernel<<<pc, QUANT_THREADS, 0, s>>>(hrows, N, sh, hq, hs);
        launch_gemm({hq, hs, act_groups(act, N), nullptr, 1, offsets, 0, h->w2, h->s2, p->weight_scale, (int)K,
                     (int)N, kblocked(p), acc, nullptr, nullptr},
                    E, pc, s);
        combine_kernel<<<(unsigned)ceil_div(mc * K, 256), 256, 0, s>>>(acc, inv, (const float *)t->topk_weights + t0 * topk,
                                                                      mc, topk, K, (uint16_t *)t->out + t0 * K);
      }
      MOEFFI_CUDA_LAUNCHED("fp8_moe kernels");
    }
  return MOEFFI_OK;
}

int32_t run_fp8_mm(const moeffi_problem *p, const Handle *h, const moeffi_tensors *t, char *base, cudaStream_t s,
                   char *msg, uint32_t cap) {
  const Plan w = plan_workspace(p);
  const int64_t M = p->m, N = p->n, K = p->k;
  uint32_t *amax = (uint32_t *)(base + w.amax);
  uint8_t *xq = (uint8_t *)(base + w.xq);
  float *xs = (float *)(base + w.xs);
  const uint16_t *x = (const uint16_t *)t->x;
  const uint16_t *bias = (p->flags & MOEFFI_FLAG_HAS_BIAS) ? (const uint16_t *)t->bias : nullptr;
  const ActScheme sx = {p->act_scale, (const float *)t->a1_scale, amax};
  if (p->act_scale == MOEFFI_A_DYNAMIC_TENSOR) {
    MOEFFI_CUDA_TRY(cudaMemsetAsync(amax, 0, sizeof(uint32_t), s));
    amax_rows_kernel<<<(unsigned)M, QUANT_THREADS, 0, s>>>(Bf16Rows{x, K}, K, amax);
  }
  for (int64_t t0 = 0; t0 < M; t0 += CHUNK) {
    const int64_t mc = std::min(CHUNK, M - t0);
    quantize_rows_kernel<<<(unsigned)mc, QUANT_THREADS, 0, s>>>(Bf16Rows{x + t0 * K, K}, K, sx, xq, xs);
    launch_gemm({xq, xs, act_groups(p->act_scale, K), nullptr, 1, nullptr, (int)mc, h->w13, h->s13, p->weight_scale,
                 (int)N, (int)K, kblocked(p), nullptr, (uint16_t *)t->out + t0 * N, bias},
                1, mc, s);
    MOEFFI_CUDA_LAUNCHED("fp8_scaled_mm kernels");
  }
  return MOEFFI_OK;
}

int32_t run_topk_softmax(const moeffi_problem *p, const moeffi_tensors *t, cudaStream_t s, char *msg, uint32_t cap) {
  topk_softmax_kernel<<<(unsigned)ceil_div(p->m, TOPK_WARPS), TOPK_WARPS * 32, 0, s>>>(
      (const float *)t->x, p->m, (int)p->experts, (int)p->topk, (p->flags & MOEFFI_FLAG_RENORMALIZE) != 0,
      (int32_t *)t->out, (float *)t->out_aux);
  MOEFFI_CUDA_LAUNCHED("topk_softmax kernel");
  return MOEFFI_OK;
}

int32_t run_nvfp4(const moeffi_problem *p, const moeffi_tensors *t, char *base, cudaStream_t s, char *msg, uint32_t cap) {
  const Plan w = plan_workspace(p);
  const int64_t M = p->m, K = p->k, E = p->experts, ktiles = ceil_div(K, 64);
  int *ok = (int *)(base + w.ok), *tile_base = (int *)(base + w.tile_base);
  const int32_t *off = (const int32_t *)t->expert_offsets;
  MOEFFI_CUDA_TRY(cudaMemsetAsync(t->out_aux, 0, (size_t)((M + 127 * E) * ktiles * 4), s)); // padding stays zero
  if (M == 0) return MOEFFI_OK;
  nvfp4_offsets_kernel<<<1, SCAN_THREADS, 0, s>>>(off, (int)E, M, ok, tile_base, t->error_flags);
  const int64_t blocks = std::min<int64_t>(ceil_div(M * (K / 16), 256), 1 << 20);
  nvfp4_quant_kernel<<<(unsigned)blocks, 256, 0, s>>>((const uint16_t *)t->x, off, (const float *)t->global_scale, ok,
                                                      tile_base, (int)E, M, K, (uint8_t *)t->out, (uint8_t *)t->out_aux);
  MOEFFI_CUDA_LAUNCHED("nvfp4_experts_quant kernels");
  return MOEFFI_OK;
}

} // namespace

// ---- exported entry points ----

MOEFFI_API uint32_t moeffi_abi_version(void) { return MOEFFI_ABI_VERSION; }

MOEFFI_API int32_t moeffi_describe(moeffi_manifest *out) {
  // every op but nvfp4_silu_quant (backends/nvfp4 has it)
  const uint32_t ops = (1u << MOEFFI_OP_FP8_MOE) | (1u << MOEFFI_OP_FP8_SCALED_MM) | (1u << MOEFFI_OP_TOPK_SOFTMAX) |
                       (1u << MOEFFI_OP_NVFP4_EXPERTS_QUANT);
  // batch invariant for every op, except dynamic per-tensor scales, which supported() refuses
  return moeffi_fill_manifest(out, "fallback", "0.1.0", "sm_80+", MOEFFI_DEVICE_CUDA, ops, MOEFFI_ALL_WEIGHT_SCALES,
                              MOEFFI_ALL_ACT_SCALES, ops, 10);
}

MOEFFI_API int32_t moeffi_supported(const moeffi_problem *problem, char *reason, uint32_t capacity) {
  if (check_problem(problem, reason, capacity) != MOEFFI_OK) return -1;
  return moeffi_cuda_yes(problem, 10, "portable CUDA kernels", reason, capacity);
}

MOEFFI_API int32_t moeffi_workspace_size(const moeffi_problem *problem, uint64_t *bytes) {
  if (!bytes) return MOEFFI_INVALID;
  *bytes = 0;
  const int32_t st = check_all(problem, NULL, 0);
  if (st) return st;
  *bytes = plan_workspace(problem).total;
  return MOEFFI_OK;
}

MOEFFI_API int32_t moeffi_prepare(const moeffi_problem *problem, const moeffi_weights *weights, void **handle,
                                  char *message, uint32_t capacity) {
  char *msg = message;
  uint32_t cap = capacity;
  if (!handle) FAIL(MOEFFI_INVALID, "handle is NULL");
  *handle = NULL;
  const int32_t st = check_all(problem, msg, cap);
  if (st) return st;
  if (!is_fp8(problem->op)) return MOEFFI_OK; // topk_softmax and nvfp4 have no weights
  if (!weights || weights->size < sizeof(moeffi_weights)) FAIL(MOEFFI_INVALID, "weights struct too small");
  const bool moe = problem->op == MOEFFI_OP_FP8_MOE;
  if (!weights->w13 || !weights->w13_scale || (moe && (!weights->w2 || !weights->w2_scale)))
    FAIL(MOEFFI_INVALID, "weights->%s is NULL", !weights->w13 ? "w13" : !weights->w13_scale ? "w13_scale"
                                                : !weights->w2  ? "w2" : "w2_scale");
  const int64_t E = moe ? problem->experts : 1, N = problem->n, K = problem->k, rows13 = moe ? 2 * N : N;
  const uint64_t b13 = E * rows13 * K, bs13 = E * scale_count(problem->weight_scale, rows13, K) * 4;
  const uint64_t b2 = moe ? E * K * N : 0, bs2 = moe ? E * scale_count(problem->weight_scale, K, N) * 4 : 0;
  uint64_t total = 0;
  const uint64_t o13 = take(&total, b13), os13 = take(&total, bs13), o2 = take(&total, b2), os2 = take(&total, bs2);
  MOEFFI_CUDA_TRY(cudaSetDevice(problem->device_index));
  Handle *h = (Handle *)calloc(1, sizeof(Handle));
  if (!h) FAIL(MOEFFI_NO_MEMORY, "cannot allocate the handle");
  h->op = problem->op, h->weight_scale = problem->weight_scale, h->act_scale = problem->act_scale;
  h->n = N, h->k = K, h->experts = problem->experts, h->device = problem->device_index;
  cudaError_t err = cudaMalloc(&h->mem, total);
  if (err != cudaSuccess) {
    free(h);
    FAIL(err == cudaErrorMemoryAllocation ? MOEFFI_NO_MEMORY : MOEFFI_DEVICE, "cudaMalloc of %llu bytes: %s",
         (unsigned long long)total, cudaGetErrorString(err));
  }
  char *mem = (char *)h->mem;
  h->w13 = (uint8_t *)(mem + o13), h->s13 = (float *)(mem + os13), h->w2 = (uint8_t *)(mem + o2), h->s2 = (float *)(mem + os2);
  // Own copies (cudaMemcpyDefault also accepts host pointers); D2D copies may return early, so wait.
  err = cudaMemcpy(h->w13, weights->w13, b13, cudaMemcpyDefault);
  if (err == cudaSuccess) err = cudaMemcpy(h->s13, weights->w13_scale, bs13, cudaMemcpyDefault);
  if (err == cudaSuccess && moe) err = cudaMemcpy(h->w2, weights->w2, b2, cudaMemcpyDefault);
  if (err == cudaSuccess && moe) err = cudaMemcpy(h->s2, weights->w2_scale, bs2, cudaMemcpyDefault);
  if (err == cudaSuccess) err = cudaStreamSynchronize(0);
  if (err != cudaSuccess) {
    cudaFree(h->mem);
    free(h);
    FAIL(MOEFFI_DEVICE, "copying the weights: %s", cudaGetErrorString(err));
  }
  *handle = h;
  return MOEFFI_OK;
}

MOEFFI_API void moeffi_release(void *handle) {
  Handle *h = (Handle *)handle;
  if (!h) return;
  if (cudaSetDevice(h->device) == cudaSuccess) cudaFree(h->mem);
  free(h);
}

MOEFFI_API int32_t moeffi_run(const moeffi_problem *problem, void *handle, const moeffi_tensors *tensors, char *message,
                              uint32_t capacity) {
  char *msg = message;
  uint32_t cap = capacity;
  int32_t st;
  if ((st = check_all(problem, msg, cap))) return st;
  if (!tensors || tensors->size < sizeof(moeffi_tensors)) FAIL(MOEFFI_INVALID, "tensors struct too small");
  const Handle *h = (const Handle *)handle;
  if (is_fp8(problem->op) && (st = check_handle(problem, h, msg, cap))) return st;
  if ((st = check_tensors(problem, tensors, msg, cap))) return st;
  MOEFFI_CUDA_TRY(cudaSetDevice(problem->device_index));
  (void)cudaGetLastError(); // forget a stale error of an earlier runtime call (this library's own runtime)
  const cudaStream_t s = (cudaStream_t)tensors->stream;
  const uint64_t need = plan_workspace(problem).total;
  if (problem->m > 0 && (tensors->workspace_bytes < need || (need && !tensors->workspace) ||
                         (uintptr_t)tensors->workspace % sizeof(float)))
    FAIL(MOEFFI_INVALID, "workspace must be %llu bytes, 4-byte aligned (got %llu)", (unsigned long long)need,
         (unsigned long long)tensors->workspace_bytes);
  char *base = (char *)tensors->workspace;
  if (problem->op == MOEFFI_OP_NVFP4_EXPERTS_QUANT) return run_nvfp4(problem, tensors, base, s, msg, cap);
  if (problem->m == 0) return MOEFFI_OK;
  switch (problem->op) {
  case MOEFFI_OP_FP8_MOE: return run_fp8_moe(problem, h, tensors, base, s, msg, cap);
  case MOEFFI_OP_FP8_SCALED_MM: return run_fp8_mm(problem, h, tensors, base, s, msg, cap);
  default: return run_topk_softmax(problem, tensors, s, msg, cap);
  }
}
