// hopper_fp8.cu: the Hopper (sm_90a) FP8 backend of moeffi: fp8_moe and fp8_scaled_mm on grouped
// GEMMs that TMA-load fp8 tiles into mbarrier rings and multiply them with fp8 WGMMA, promoting each
// 128-wide K block's tensor-core sum to fp32 (DeepGEMM's scheme; every second block where no scale
// depends on K). Few rows per expert (decode) take swapped tiles (weights on the WGMMA's M side, 8-64
// tokens on N); many take persistent 128 x 192 tiles with SiLU fused into GEMM 1, in two-CTA clusters
// sharing the weight tile where experts have the rows. Routing, quantization and combine: cuda/*.cuh.
// Design, every version's numbers and the next steps: NOTES.md beside this file.
// The same source is the batch_invariant_fp8 backend (../batch_invariant_fp8), which includes it with
// MOEFFI_FIXED_CONFIG set: these kernels under one configuration for every M (FIXED below).
#ifndef MOEFFI_FIXED_CONFIG
#define MOEFFI_FIXED_CONFIG 0
#endif
#include <cuda.h>
#include <cuda_fp8.h>
#include <cudaTypedefs.h>
#include <dlfcn.h>
#include <stdio.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <mutex>

#include "check.cuh"
#include "moeffi.h"
#include "numerics.cuh"
#include "pdl.cuh"
#include "quant.cuh"
#include "routing.cuh"
#include "sm90.cuh"

using namespace moeffi;

MOEFFI_DEFINE_LAYOUT()

namespace {

// The batch-invariant build: one GEMM configuration whatever M is (moe.md section 5): wide 128-row
// tiles whose width depends on the weight shape only, no CTA pairs, no swapped tiles, no K split, no
// tune table. Each output element is then one CTA's sum over the whole K in one order, and every
// other step is row-local (quantization: a max, exact in any order) or a fixed-order combine.
constexpr bool FIXED = MOEFFI_FIXED_CONFIG;
constexpr const char *NAME = FIXED ? "batch_invariant_fp8" : "hopper_fp8";
constexpr int32_t PRIORITY = FIXED ? 25 : 30; // both above the fallback (10); the M-tuned build first

constexpr int64_t CHUNK = 4096;      // tokens per pass: bounds the workspace
constexpr int64_t MAX_DIM = 1 << 20; // n, k
constexpr uint64_t WS_ALIGN = 256;
constexpr int BM = 128, BK = 128; // wide tiles: 128 rows x BN (128 or 192) columns; BK = 128 bytes = one 128B swizzle span
constexpr int CONSUMERS = 2;       // consumer warpgroups, 64 rows each
constexpr int GEMM_THREADS = 128 * (CONSUMERS + 1);
constexpr uint32_t A_STAGE = BM * BK;
template <int BN> __host__ __device__ constexpr uint32_t wide_stage_bytes() { return A_STAGE + BN * BK; }
// The bf16 output tile staged for whole-row stores: rows padded by 16 bytes so the eight rows a warp
// writes at once fall in different banks.
template <int BN> __host__ __device__ constexpr uint32_t staging_row() { return BN * 2 + 16; }
template <int BN> __host__ __device__ constexpr uint32_t staging_bytes() { return BM * staging_row<BN>(); }
template <int BN> __host__ __device__ constexpr int wide_stages() { // 4 (BN = 192) or 5 (128)
  return (220 * 1024 - staging_bytes<BN>()) / wide_stage_bytes<BN>();
}
template <int BN> __host__ __device__ constexpr size_t wide_smem() {
  return (size_t)wide_stages<BN>() * wide_stage_bytes<BN>() + staging_bytes<BN>() + 1024;
}
constexpr int SWAP_ROWS = 64, SWAP_THREADS = 160;                 // swapped tile: 64 weight rows, 1 warpgroup + 1 warp
constexpr int SWAP_MAX_TOK = 64; // swapped tiles while the mean rows per routed expert is at most this
constexpr int SPLIT_MAX_PAIRS = 64; // fp8_moe's GEMM 2 may split K in two up to this many pairs per chunk
constexpr int MM_SWAP_MAX = 128;    // fp8_scaled_mm: swapped tiles up to 128 rows (two token tiles), K split
constexpr int MM_MAX_SPLITS = 4;    // up to this many ways (k_splits)

#define FAIL(status, ...)              \
  do {                                 \
    moeffi_say(msg, cap, __VA_ARGS__); \
    return (status);                   \
  } while (0)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- problem checks ----

bool is_mm(const moeffi_problem *p) { return p->op == MOEFFI_OP_FP8_SCALED_MM; }

int32_t check_problem(const moeffi_problem *p, char *msg, uint32_t cap) {
  if (!p) FAIL(MOEFFI_INVALID, "problem is NULL");
  if (p->size < sizeof(moeffi_problem)) FAIL(MOEFFI_INVALID, "problem struct too small");
  if (p->op != MOEFFI_OP_FP8_MOE && p->op != MOEFFI_OP_FP8_SCALED_MM)
    FAIL(MOEFFI_UNSUPPORTED, "%s implements fp8_moe and fp8_scaled_mm only (op %u)", NAME, p->op);
  const int32_t device = moeffi_check_cuda_device(p, NAME, 9, 9, "sm_90a (H100/H200)", msg, cap);
  if (device != MOEFFI_OK) return device;
  if (p->weight_scale > MOEFFI_W_BLOCK_128) FAIL(MOEFFI_UNSUPPORTED, "unknown weight scale %u", p->weight_scale);
  if (p->act_scale > MOEFFI_A_DYNAMIC_GROUP_128) FAIL(MOEFFI_UNSUPPORTED, "unknown activation scale %u", p->act_scale);
  if (FIXED && p->act_scale == MOEFFI_A_DYNAMIC_TENSOR)
    FAIL(MOEFFI_UNSUPPORTED, "dynamic per-tensor activation scales depend on the whole batch, so they are not batch invariant");
  if (!FIXED && (p->act_scale == MOEFFI_A_DYNAMIC_TENSOR || p->act_scale == MOEFFI_A_STATIC_TENSOR))
    FAIL(MOEFFI_UNSUPPORTED, "hopper_fp8 takes dynamic per-token or 1x128-group activations, not %s per-tensor",
         p->act_scale == MOEFFI_A_STATIC_TENSOR ? "static" : "dynamic");
  if (!FIXED && (p->flags & MOEFFI_FLAG_BATCH_INVARIANT))
    FAIL(MOEFFI_UNSUPPORTED, "hopper_fp8 is not batch invariant (its tile shape depends on M; batch_invariant_fp8 is)");
  if (p->n <= 0 || p->k <= 0 || p->n % 16 || p->k % 16)
    FAIL(MOEFFI_UNSUPPORTED, "n and k must be positive multiples of 16 (TMA row strides)");
  if (p->n > MAX_DIM || p->k > MAX_DIM)
    FAIL(MOEFFI_UNSUPPORTED, "n and k must be at most %lld on this backend", (long long)MAX_DIM);
  if (is_mm(p)) return MOEFFI_OK;
  if (p->experts > 0 && p->experts * std::max(2 * p->n, p->k) > INT32_MAX)
    FAIL(MOEFFI_UNSUPPORTED, "experts x max(2n, k) exceeds the int32 TMA row coordinate");
  if (p->topk > INT32_MAX / CHUNK) FAIL(MOEFFI_UNSUPPORTED, "topk = %lld is too large for this backend", (long long)p->topk);
  return MOEFFI_OK;
}

// The core validates shapes; these checks only keep index arithmetic in range.
int32_t check_dims(const moeffi_problem *p, char *msg, uint32_t cap) {
  const int64_t d[] = {p->m, p->n, p->k, is_mm(p) ? 1 : p->experts, is_mm(p) ? 1 : p->topk};
  const char *names[] = {"m", "n", "k", "experts", "topk"};
  for (int i = 0; i < 5; i++)
    if (d[i] < 0 || d[i] > INT32_MAX) FAIL(MOEFFI_INVALID, "%s = %lld is out of range", names[i], (long long)d[i]);
  if (d[1] == 0 || d[2] == 0 || d[3] == 0 || d[4] == 0) FAIL(MOEFFI_INVALID, "a dimension of the problem is zero");
  return MOEFFI_OK;
}

int32_t check_all(const moeffi_problem *p, char *msg, uint32_t cap) {
  const int32_t st = check_problem(p, msg, cap);
  return st ? st : check_dims(p, msg, cap);
}

// ---- device code ----

// Rows of x gathered into expert order: gathered row r is token perm[r] / topk; only the first
// *count rows are routed. Quantizing a token once per routed slot gives the same codes each time.
struct GatherRows {
  const uint16_t *x;
  int64_t len;
  const int *perm;
  int topk;
  const int *count;
  __device__ bool exists(int64_t r) const { return r < *count; }
  __device__ float operator()(int64_t r, int64_t c) const {
    return bf16_to_f32(x[(int64_t)(perm[r] / topk) * len + c]);
  }
  using Raw = uint2;
  __device__ Raw fetch(int64_t r, int64_t c) const { return *(const uint2 *)(x + (int64_t)(perm[r] / topk) * len + c); }
  __device__ void values(const Raw &b, float (&v)[4]) const { bf16x4_values(b, v); }
};

struct GemmArgs {
  const int *offsets;    // [E+1] rows of each expert in the gathered A / out; NULL: one expert of rows1 rows
  const int *tile_start; // [E+1] from launch_routing (unused without offsets)
  int experts;
  int nout, klen, nkb;   // output columns (weight rows per expert), reduction length, its 128-blocks
  const float *as;       // activation scales [rows, a_ng] (a_ng = nkb for 1x128 groups, else 1)
  int a_ng;
  const float *ws;       // weight scales [E, ...] per wscheme
  uint32_t wscheme;
  int64_t ws_per_expert;
  float *out;            // fp32 [rows, nout], or NULL and:
  uint16_t *out_bf16;    // bf16 [rows, nout] of out (+ bias: fp8_scaled_mm); fp8_moe's wide tiles write bf16 h and y
  const uint16_t *bias;  // bf16 [nout] or NULL
  int interleaved;       // GEMM1 weights hold gate/up rows interleaved by 32 (see interleave_w13)
  int silu;              // wide tiles only: out_bf16 = h = silu(gate) * up, bf16 [rows, nout / 2]
  int64_t split_stride;  // swapped tiles: K split gridDim.z ways, split z's partial sums at out + z * split_stride
  int group_m;           // wide tiles: m-tiles per raster group (tile_order)
  int rows1;             // offsets == NULL (fp8_scaled_mm): the one expert's rows, known on the host
};

#ifdef MOEFFI_SM90A // device helpers of the sm_90a kernels (other targets compile trapping bodies)
// Original GEMM1 column of interleaved weight row c (n = intermediate size): per 64 rows, 32 gate
// rows then the 32 matching up rows.
__device__ __forceinline__ int deinterleave(int c, int n) {
  return c % 64 < 32 ? (c / 64) * 32 + c % 64 : n + (c / 64) * 32 + c % 64 - 32;
}

// The bf16 pair (a in the low half) rounded to nearest even by the hardware; a NaN as f32_to_bf16
// gives it (the instruction's canonical NaN drops the sign).
__device__ __forceinline__ uint32_t bf16x2_rn(float a, float b) {
  if (a != a || b != b) return (uint32_t)f32_to_bf16(a) | ((uint32_t)f32_to_bf16(b) << 16);
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(b), "f"(a));
  return r;
}
__device__ __forceinline__ void store_one(const GemmArgs &g, int64_t row, int col, float v, int64_t split_offset = 0) {
  const int64_t o = row * g.nout + col;
  if (g.out) g.out[split_offset + o] = v;
  else g.out_bf16[o] = f32_to_bf16(g.bias ? add_rn(v, bf16_to_f32(g.bias[col])) : v);
}

// Row tiles of `rows` rows in the grid: tile_start[E], or those of the one expert.
__device__ __forceinline__ int tile_count(const GemmArgs &g, int rows) {
  return g.offsets ? g.tile_start[g.experts] : (g.rows1 + rows - 1) / rows;
}

// The expert tile of grid slot t (tile_start[lo] <= t < tile_start[lo + 1]): expert, first row, end row.
__device__ __forceinline__ void find_tile(const GemmArgs &g, int t, int rows, int *info) {
  if (!g.offsets) {
    info[0] = 0, info[1] = t * rows, info[2] = g.rows1;
    return;
  }
  int lo = 0, hi = g.experts;
  while (hi - lo > 1) {
    const int mid = lo + (hi - lo) / 2;
    if (g.tile_start[mid] <= t) lo = mid;
    else hi = mid;
  }
  info[0] = lo;
  info[1] = g.offsets[lo] + (t - g.tile_start[lo]) * rows;
  info[2] = g.offsets[lo + 1];
}

// The m-tile and n-tile of persistent slot `tile`: groups of group_m m-tiles (all of them when 0),
// m fastest inside a group, every n-tile of a group before the next group, so a wave of CTAs reads
// a few A row blocks and a few B column blocks that stay in L2.
__device__ __forceinline__ void tile_order(int tile, int mt, int nt, int group_m, int *tm, int *tn) {
  const int gm = group_m > 0 && group_m < mt ? group_m : mt, per_group = gm * nt;
  const int first = tile / per_group * gm, rows = min(mt - first, gm), within = tile % per_group;
  *tm = first + within % rows, *tn = within / rows;
}

// One TMA thread fills a ring of `stages` slots with K blocks kb0 .. kb1 - 1, each `a_bytes` of A at
// (kb, arow) then B at (kb, brow). A holds weights, which no kernel writes: the first ring's worth is
// requested before pdl_wait, so the weight stream starts while the previous kernel finishes.
__device__ __forceinline__ void produce(const CUtensorMap *amap, const CUtensorMap *bmap, uint8_t *smem, uint64_t *full,
                                        uint64_t *empty, int stages, uint32_t a_bytes, uint32_t stage_bytes, int kb0,
                                        int kb1, int arow, int brow) {
  using namespace sm90;
  tma_prefetch(amap);
  tma_prefetch(bmap);
  const int pre = min(stages, kb1 - kb0);
  for (int i = 0; i < pre; i++) {
    mbar_arrive_expect_tx(&full[i], stage_bytes); // A and B: the slot completes when both have landed
    tma_load_2d(smem + (size_t)i * stage_bytes, amap, &full[i], (kb0 + i) * BK, arow);
  }
  pdl_wait();
  pdl_trigger();
  for (int i = 0; i < pre; i++) tma_load_2d(smem + (size_t)i * stage_bytes + a_bytes, bmap, &full[i], (kb0 + i) * BK, brow);
  int s = pre % stages;
  uint32_t phase = pre == stages; // the ring position after the first fill, its phase flipped if it wrapped
  for (int i = pre; i < kb1 - kb0; i++) {
    mbar_wait(&empty[s], phase ^ 1);
    uint8_t *a = smem + (size_t)s * stage_bytes;
    mbar_arrive_expect_tx(&full[s], stage_bytes);
    tma_load_2d(a, amap, &full[s], (kb0 + i) * BK, arow);
    tma_load_2d(a + a_bytes, bmap, &full[s], (kb0 + i) * BK, brow);
    if (++s == stages) s = 0, phase ^= 1;
  }
}
#endif

// Wide tiles (prefill), persistent: each CTA walks tiles blockIdx.x, + gridDim.x, ... of the
// tile_start[E] x ceil(nout / BN) grid in tile_order (raster groups of m-tiles, m fastest inside a
// group, so both the weight tiles and the rows of a wave stay in L2). A tile is 128 gathered rows of
// one expert x BN output columns.
// Warpgroup 0 produces (one TMA thread, registers handed to the consumers) and runs ahead into the
// next tile while the consumers store. Warpgroups 1 and 2 own 64 rows each: per 128-wide K block
// (two without K-dependent scales) four fp8 wgmma k32 into a fresh partial tile, release the stage,
// then acc += partial * (group/block scales of kb) in fp32 - the partial sum is the tensor core's
// (about 14-bit exact, NOTES.md), the sum over partials is fp32. Rows past the expert's end (the next
// expert's rows or TMA zero fill) and columns past nout are computed but never stored.
// PAIR: clusters of two CTAs take the two 128-row halves of a 256-row unit of one expert (the routing
// counts tiles in such units) and one n-tile; each loads its A and half of B (bmap: BN / 2-row boxes),
// multicast to both, and a stage is refilled once the consumers of both CTAs have released it: a third
// fewer L2 -> SM bytes per tile.
template <int BN, bool KSCALED, bool PAIR = false> // KSCALED: K-dependent scales (1x128 groups or 128x128 blocks)
__global__ void __launch_bounds__(GEMM_THREADS, 1)
    grouped_gemm_sm90(const __grid_constant__ CUtensorMap amap, const __grid_constant__ CUtensorMap bmap, const GemmArgs g) {
#ifdef MOEFFI_SM90A
  using namespace sm90;
  constexpr int STAGES = wide_stages<BN>(), R = BN / 2; // R accumulator registers per thread
  constexpr uint32_t STAGE_BYTES = wide_stage_bytes<BN>();
  __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];
  __shared__ __align__(16) float2 colv[CONSUMERS][2][BN]; // epilogue (weight scale, bias) per column, 2 buffers
  extern __shared__ uint8_t smem_raw[];
  uint8_t *smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023u)) & 1023u);

  constexpr int UNIT = PAIR ? 2 * BM : BM; // rows per tile_start unit
  const int tid = threadIdx.x, mt = tile_count(g, UNIT), nt = (g.nout + BN - 1) / BN;
  if (tid == 0) {
    for (int s = 0; s < STAGES; s++) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], (PAIR ? 2 : 1) * CONSUMERS * 4); // one arrival per consumer warp (of both CTAs)
    }
    mbar_init_fence();
  }
  __syncthreads();
  if constexpr (PAIR) cluster_sync(); // the peer's barriers are ready before anything is sent to them
  // A CTA's rows and columns: expert, first row, end row (find_tile) and n-tile of slot `tile`. In a
  // pair, a second half past the expert's end computes nothing but still sends its half of B.
  const uint32_t rank = PAIR ? cluster_rank() : 0;
  const int first = PAIR ? blockIdx.x / 2 : blockIdx.x, step = PAIR ? gridDim.x / 2 : gridDim.x;
  auto locate = [&](int tile, int *info, int *tn) {
    int tm;
    tile_order(tile, mt, nt, PAIR ? g.group_m / 2 : g.group_m, &tm, tn);
    find_tile(g, tm, UNIT, info);
    info[1] += (int)rank * BM;
  };
  pdl_wait(); // the gathered rows and their scales come from the previous kernel
  pdl_trigger();
  const int wg = tid / 128;
  int info[3];

  uint8_t *staging = smem + STAGES * STAGE_BYTES; // bf16 output tile (consumer c: rows 64 c ..)
  if (wg == 0) { // producer: the ring position runs on across tiles
    regs_dec<40>();
    if (tid != 0) return;
    tma_prefetch(&amap);
    tma_prefetch(&bmap);
    const uint32_t full0 = smem_addr(&full[0]), empty0 = smem_addr(&empty[0]), smem0 = smem_addr(smem);
    uint32_t stage = 0, phase = 0; // phase flips each time the ring wraps
    for (int tile = first; tile < mt * nt; tile += step) {
      int tn;
      locate(tile, info, &tn);
      const int brow = info[0] * g.nout + tn * BN + (int)rank * (BN / 2);
      for (int kb = 0; kb < g.nkb; kb++) {
        const uint32_t f = full0 + 8 * stage, a = smem0 + stage * STAGE_BYTES;
        mbar_wait(empty0 + 8 * stage, phase ^ 1); // the first round passes at once (parity 1 of a fresh barrier)
        mbar_arrive_expect_tx(f, STAGE_BYTES);    // A, and both halves of B with PAIR
        tma_load_2d(a, &amap, f, kb * BK, info[1]);
        if (PAIR) tma_load_2d_multicast(a + A_STAGE + rank * (BN / 2) * BK, &bmap, f, kb * BK, brow, 3);
        else tma_load_2d(a + A_STAGE, &bmap, f, kb * BK, brow);
        if (++stage == STAGES) stage = 0, phase ^= 1;
      }
    }
    if constexpr (PAIR) cluster_sync();
    return;
  }
  regs_inc<232>();

  const int c = wg - 1, ct = tid % 128, warp = ct / 32, lane = tid % 32;
  const bool grp = g.a_ng > 1, blk = g.wscheme == MOEFFI_W_BLOCK_128;
  // Per-block bookkeeping is kept to 32-bit adds on values computed here: barrier addresses, and the
  // descriptor low words of stage 0 (A rows of consumer c, then B; stage s adds s * STAGE_BYTES >> 4)
  const uint32_t full0 = smem_addr(&full[0]), empty0 = smem_addr(&empty[0]);
  const uint32_t a_lo0 = desc_lo_k128_sw128(smem + c * 64 * BK), b_lo0 = desc_lo_k128_sw128(smem + A_STAGE);
  // a stage is released to this CTA's producer and, with PAIR, to the peer's (whose B half it holds)
  const uint32_t peer_empty0 = PAIR ? peer_addr(empty0, rank ^ 1) : 0;
  auto release = [&](uint32_t st) {
    mbar_arrive_if(lane == 0, empty0 + 8 * st);
    if (PAIR) mbar_arrive_remote_if(lane == 0, peer_empty0 + 8 * st);
  };
  uint32_t stage = 0, phase = 0;
  int parity = 0;
  for (int tile = first; tile < mt * nt; tile += step) {
    int tn;
    locate(tile, info, &tn);
    const int e = info[0], end = info[2], n0 = tn * BN;
    const int rbase = info[1] + 64 * c; // consumer warpgroup c owns rows rbase .. +64
    const bool active = rbase < end;    // uniform over the warpgroup
    const int r0 = rbase + 16 * warp + lane / 4, r1 = r0 + 8;
    const bool ok0 = r0 < end, ok1 = r1 < end;
    const float *ws = g.ws + (int64_t)e * g.ws_per_expert;
    // weight blocks of block scales: columns before n0 + jb * 8 are in block n0 / 128, the rest in the next
    const int wb = n0 / QBLK, jb = (QBLK - n0 % QBLK) / 8;
    const bool wb1 = (int64_t)(wb + 1) * QBLK < g.nout;
    // The epilogue's K-independent factors: row scales of r0, r1, and (weight scale, bias) of columns
    // n0 + ct and n0 + 128 + ct, which go through shared memory to the threads that hold those columns.
    // Without K-dependent scales they are requested before the main loop, which hides their latency
    // (with them, registers are short and these are mostly 1: after it).
    float ea0, ea1, cw[2], cb[2];
    auto epilogue_factors = [&]() {
      ea0 = grp || !ok0 ? 1.0f : g.as[(int64_t)r0 * g.a_ng], ea1 = grp || !ok1 ? 1.0f : g.as[(int64_t)r1 * g.a_ng];
#pragma unroll
      for (int q = 0; q < 2; q++) {
        const int col = n0 + ct + 128 * q;
        const bool in = ct + 128 * q < BN && col < g.nout;
        cw[q] = blk || !in ? 1.0f : ws[g.wscheme == MOEFFI_W_PER_CHANNEL ? col : 0];
        cb[q] = g.bias && in ? bf16_to_f32(g.bias[col]) : 0.0f;
      }
    };
    if (!KSCALED) epilogue_factors();
    float part[R], acc[R];
#pragma unroll
    for (int i = 0; i < R; i++) part[i] = 0.0f, acc[i] = 0.0f;

    // scales of K block kb (rows r0, r1 x weight blocks wb, wb + 1), read before the WGMMA window
    auto scales = [&](int kb, float (&f)[4]) {
      f[0] = f[1] = f[2] = f[3] = 1.0f;
      if (!active || !(grp || blk)) return;
      const float sw0 = blk ? ws[(int64_t)wb * g.nkb + kb] : 1.0f;
      const float sw1 = blk && wb1 ? ws[(int64_t)(wb + 1) * g.nkb + kb] : sw0;
      const float sa0 = grp ? (ok0 ? g.as[(int64_t)r0 * g.a_ng + kb] : 0.0f) : 1.0f;
      const float sa1 = grp ? (ok1 ? g.as[(int64_t)r1 * g.a_ng + kb] : 0.0f) : 1.0f;
      f[0] = mul_rn(sa0, sw0), f[1] = mul_rn(sa0, sw1), f[2] = mul_rn(sa1, sw0), f[3] = mul_rn(sa1, sw1);
    };
    // four wgmma k32 of stage s into p (a fresh partial tile, or added to it), committed as one group
    auto issue = [&](float (&p)[R], uint32_t st, bool fresh = true) {
      const uint32_t a = a_lo0 + st * (STAGE_BYTES >> 4), b = b_lo0 + st * (STAGE_BYTES >> 4);
      fence_operands(p);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < 4; k++) // 32 B = 2 x 16
        wgmma_m64k32_e4m3<BN>(p, desc_sw128(a + 2 * k), desc_sw128(b + 2 * k), fresh ? k : 1);
      wgmma_commit();
    };
    // acc += p * (its block's scales): one FMA per element, or a plain add without K-dependent scales
    auto promote = [&](float (&p)[R], const float (&f)[4]) {
      fence_operands(p);
      if (KSCALED) {
#pragma unroll
        for (int i = 0; i < R; i++) {
          const bool second = i / 4 >= jb;
          acc[i] = fmaf(p[i], (i / 2) % 2 ? (second ? f[3] : f[2]) : (second ? f[1] : f[0]), acc[i]);
        }
      } else {
#pragma unroll
        for (int i = 0; i < R; i++) acc[i] = add_rn(acc[i], p[i]);
      }
    };

    // The stage ring position moves on by one K block
    auto next = [&]() {
      if (++stage == STAGES) stage = 0, phase ^= 1;
    };
    if constexpr (!KSCALED) {
      if (!active) { // rows past the expert's end: release every stage, compute nothing (a loop of its own: ptxas
        for (int kb = 0; kb < g.nkb; kb++) { // serializes WGMMAs left in flight across a branch, C7518)
          mbar_wait(full0 + 8 * stage, phase);
          release(stage);
          next();
        }
        continue;
      }
      // K-independent scales: one promotion per two K blocks (the tensor core sums 256 of K), each block's
      // WGMMAs a group of their own, so the first block's stage is released (wait_group 1) while the
      // second runs. Consumer 1 starts one block behind: one warpgroup waits and promotes while the
      // other's WGMMAs keep the tensor cores busy (both waiting at once capped the kernel; NOTES.md v18).
      const float ones[4] = {1.0f, 1.0f, 1.0f, 1.0f};
      int kb = 0;
      auto single = [&]() { // one K block as a group of its own
        mbar_wait(full0 + 8 * stage, phase);
        issue(part, stage);
        wgmma_wait0(); // (warp-synchronous: no __syncwarp before the arrival)
        release(stage);
        next();
        promote(part, ones);
      };
      if (c == 1 || g.nkb == 1) single(), kb = 1;
      for (; kb + 1 < g.nkb; kb += 2) {
        const uint32_t first_stage = stage;
        mbar_wait(full0 + 8 * stage, phase);
        issue(part, stage);
        next();
        mbar_wait(full0 + 8 * stage, phase);
        issue(part, stage, false);
        wgmma_wait1();
        release(first_stage);
        wgmma_wait0();
        release(stage);
        next();
        promote(part, ones);
      }
      if (kb < g.nkb) single();
    } else {
      // K-dependent scales: every block promoted with its own scales; one group in flight: issue, wait,
      // release, promote (two partial tiles alternating with wait_group 1 need 3 x R registers, so only
      // BN = 128 could take them: there equal to this loop, +10% only with half the B bytes: NOTES.md)
      // (consumers taking turns to issue, through named barriers, measured 21% slower: NOTES.md)
      float f[4];
      for (int kb = 0; kb < g.nkb; kb++) {
        scales(kb, f);
        mbar_wait(full0 + 8 * stage, phase);
        if (active) issue(part, stage), wgmma_wait0(); // (the wait is warp-synchronous: no __syncwarp before the arrival)
        release(stage); // one arrival per warp; the stage refills while this warp promotes
        next();
        if (active) promote(part, f);
      }
      if (!active) continue;
    }
    if (KSCALED) epilogue_factors();

    // epilogue: this warpgroup's column factors through shared memory, in two buffers used by turns, so
    // one barrier suffices: a warp writes a buffer again only after every warp passed the barrier that
    // followed its last reads
    float2 *cv = colv[c][parity];
    parity ^= 1;
    if (!g.out && lane == 0) bulk_wait_read0(); // the previous tile's rows have left the staging tile
    cv[ct] = make_float2(cw[0], cb[0]);
    if (ct + 128 < BN) cv[ct + 128] = make_float2(cw[1], cb[1]);
    named_barrier_sync(1 + c, 128);
    const bool full_width = n0 + BN <= g.nout; // else only columns below nout exist (nout is even)
#pragma unroll
    for (int j = 0; j < BN / 8; j++) {
      const int lc = 8 * j + 2 * (lane % 4);
      const float4 w = *(const float4 *)&cv[lc]; // (scale, bias) of columns lc, lc + 1
      if (!(grp && blk)) { // factors of 1 where a scale is K-dependent (exact)
        acc[4 * j] = mul_rn(mul_rn(acc[4 * j], ea0), w.x), acc[4 * j + 1] = mul_rn(mul_rn(acc[4 * j + 1], ea0), w.z);
        acc[4 * j + 2] = mul_rn(mul_rn(acc[4 * j + 2], ea1), w.x), acc[4 * j + 3] = mul_rn(mul_rn(acc[4 * j + 3], ea1), w.z);
      }
      if (g.bias) {
        acc[4 * j] = add_rn(acc[4 * j], w.y), acc[4 * j + 1] = add_rn(acc[4 * j + 1], w.w);
        acc[4 * j + 2] = add_rn(acc[4 * j + 2], w.y), acc[4 * j + 3] = add_rn(acc[4 * j + 3], w.w);
      }
    }
    if (g.out) { // fp32 (GEMM 1 without fused SiLU): straight to global memory
      const int64_t o0 = (int64_t)r0 * g.nout + n0, o1 = (int64_t)r1 * g.nout + n0;
#pragma unroll
      for (int j = 0; j < BN / 8; j++) {
        const int lc = 8 * j + 2 * (lane % 4);
        if (!full_width && n0 + lc >= g.nout) continue;
        if (ok0) *(float2 *)(g.out + o0 + lc) = make_float2(acc[4 * j], acc[4 * j + 1]);
        if (ok1) *(float2 *)(g.out + o1 + lc) = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
      }
      continue;
    }
    // bf16 pairs into this warpgroup's 64 staging rows, then whole rows out by bulk copies (below),
    // which run on while the warpgroup starts its next tile; before writing the staging rows again,
    // each copying lane waits for its copies to have read them (ahead of the next colv barrier)
    uint8_t *s0 = staging + (64 * c + 16 * warp + lane / 4) * staging_row<BN>(), *s1 = s0 + 8 * staging_row<BN>();
    if (g.silu) { // gate/up interleaved by 32 (prepare): slab j (gate) and j + 4 (up) are this thread's; h is bf16
#pragma unroll
      for (int j = 0; j < BN / 8; j++) {
        if (j % 8 >= 4) continue;
        const int lc = 8 * j + 2 * (lane % 4), hc = (lc / 64) * 32 + lc % 64; // BN is a multiple of 64
        const float a0 = silu_mul_fast(acc[4 * j], acc[4 * j + 16]), a1 = silu_mul_fast(acc[4 * j + 1], acc[4 * j + 17]);
        const float b0 = silu_mul_fast(acc[4 * j + 2], acc[4 * j + 18]), b1 = silu_mul_fast(acc[4 * j + 3], acc[4 * j + 19]);
        *(uint32_t *)(s0 + 2 * hc) = bf16x2_rn(a0, a1);
        *(uint32_t *)(s1 + 2 * hc) = bf16x2_rn(b0, b1);
      }
    } else {
#pragma unroll
      for (int j = 0; j < BN / 8; j++) {
        const int lc = 8 * j + 2 * (lane % 4);
        *(uint32_t *)(s0 + 2 * lc) = bf16x2_rn(acc[4 * j], acc[4 * j + 1]);
        *(uint32_t *)(s1 + 2 * lc) = bf16x2_rn(acc[4 * j + 2], acc[4 * j + 3]);
      }
    }
    fence_proxy_async_smem(); // the bulk copies below read these writes
    named_barrier_sync(1 + c, 128);
    const int cols = g.silu ? min(BN, g.nout - n0) / 2 : min(BN, g.nout - n0); // a multiple of 8 (nout % 16 == 0)
    const int64_t stride = g.silu ? g.nout / 2 : g.nout;
    uint16_t *dst = g.out_bf16 + (int64_t)rbase * stride + (g.silu ? n0 / 2 : n0);
    const uint8_t *src = staging + 64 * c * staging_row<BN>();
    if (lane == 0) { // every fourth row from each warp, copied while the warpgroup goes on to the next tile
      for (int r = warp; r < min(64, end - rbase); r += 4) bulk_store(dst + (int64_t)r * stride, src + r * staging_row<BN>(), cols * 2);
      bulk_commit();
    }
  }
  if (lane == 0) bulk_wait0(); // no bulk copy outlives the CTA's shared memory
  if constexpr (PAIR) cluster_sync(); // nor a peer's multicast or arrival
#else
  __trap(); // built for a target without sm_90a features; supported() refuses such devices
#endif
}

// Swapped tiles (decode, a few rows per expert): D^T = W X^T, so the 64 weight rows of a tile fill
// the WGMMA's M side and TOK gathered rows its N side (m64nTOKk32). Grid (token-tile slot, 64-row
// weight tile); the slots of one weight tile are adjacent so its repeated reads hit L2. Warps 0-3
// are the consumer warpgroup, warp 4 the TMA producer; a deep ring of small stages keeps enough
// weight bytes in flight per SM. Register i of a thread holds weight row 16w + l/4 + 8((i/2)%2) and
// token 8(i/4) + 2(l%4) + i%2.
template <int TOK> __host__ __device__ constexpr int swap_stages() { return 98304 / (SWAP_ROWS * BK + TOK * BK); }
template <int TOK> __host__ __device__ constexpr size_t swap_smem() { return (size_t)swap_stages<TOK>() * (SWAP_ROWS + TOK) * BK + 1024; }

template <int TOK>
__global__ void __launch_bounds__(SWAP_THREADS, 2)
    swap_gemm_sm90(const __grid_constant__ CUtensorMap amap, const __grid_constant__ CUtensorMap bmap, const GemmArgs g) {
#ifdef MOEFFI_SM90A
  using namespace sm90;
  constexpr int S = swap_stages<TOK>(), R = TOK / 2;
  constexpr uint32_t W_BYTES = SWAP_ROWS * BK, SB = (SWAP_ROWS + TOK) * BK;
  __shared__ __align__(8) uint64_t full[S], empty[S];
  __shared__ int tile_info[3];
  extern __shared__ uint8_t smem_raw[];
  uint8_t *smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023u)) & 1023u);

  const int tid = threadIdx.x, t = blockIdx.x, n0 = blockIdx.y * SWAP_ROWS;
  // this CTA's share of the K blocks (split z of gridDim.z)
  const int kb0 = (int)((int64_t)g.nkb * blockIdx.z / gridDim.z), kb1 = (int)((int64_t)g.nkb * (blockIdx.z + 1) / gridDim.z);
  if (t >= tile_count(g, TOK)) return; // uniform over the block
  if (tid == 0) {
    find_tile(g, t, TOK, tile_info);
    for (int s = 0; s < S; s++) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 4); // one arrival per consumer warp
    }
    mbar_init_fence();
  }
  __syncthreads();
  // Before pdl_wait only the routing (two or more launches back) is read: tile_start, offsets.
  const int e = tile_info[0], m0 = tile_info[1], end = tile_info[2];
  if (tid >= 128) { // producer warp: stage = 64 weight rows (A), then TOK token rows (B)
    if (tid == 128) produce(&bmap, &amap, smem, full, empty, S, W_BYTES, SB, kb0, kb1, e * g.nout + n0, m0);
    return;
  }
  pdl_wait(); // the activation scales come from the previous kernel
  pdl_trigger();
  const int warp = tid / 32, lane = tid % 32;
  const int w0 = n0 + 16 * warp + lane / 4; // weight rows (output columns) w0 and w0 + 8
  const bool grp = g.a_ng > 1, blk = g.wscheme == MOEFFI_W_BLOCK_128;
  const float *ws = g.ws + (int64_t)e * g.ws_per_expert;
  float part[R], acc[R];
#pragma unroll
  for (int i = 0; i < R; i++) part[i] = 0.0f, acc[i] = 0.0f;

  const uint32_t full0 = smem_addr(&full[0]), empty0 = smem_addr(&empty[0]), w_lo0 = desc_lo_k128_sw128(smem);
  uint32_t stage = 0, phase = 0; // 32-bit bookkeeping per block, as in the wide kernel
  for (int kb = kb0; kb < kb1; kb++) {
    float f[TOK / 4]; // scale of tokens 8j + 2(l%4) + {0, 1} at index 2j + {0, 1}
#pragma unroll
    for (int j = 0; j < TOK / 4; j++) f[j] = 1.0f;
    if (grp || blk) {
      const float sw = blk ? ws[(int64_t)(n0 / QBLK) * g.nkb + kb] : 1.0f;
#pragma unroll
      for (int j = 0; j < TOK / 4; j++) {
        const int r = m0 + 8 * (j / 2) + 2 * (lane % 4) + j % 2;
        f[j] = grp ? (r < end ? mul_rn(g.as[(int64_t)r * g.a_ng + kb], sw) : 0.0f) : sw;
      }
    }
    mbar_wait(full0 + 8 * stage, phase);
    const uint32_t dw = w_lo0 + stage * (SB >> 4), dx = dw + (W_BYTES >> 4);
    fence_operands(part);
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < 4; k++) wgmma_m64k32_e4m3<TOK>(part, desc_sw128(dw + 2 * k), desc_sw128(dx + 2 * k), k);
    wgmma_commit();
    wgmma_wait0();
    fence_operands(part);
    mbar_arrive_if(lane == 0, empty0 + 8 * stage); // after the warp-synchronous wait
    if (++stage == (uint32_t)S) stage = 0, phase ^= 1;
#pragma unroll
    for (int i = 0; i < R; i++) acc[i] = (grp || blk) ? fmaf(part[i], f[2 * (i / 4) + i % 2], acc[i]) : add_rn(acc[i], part[i]);
  }

  // epilogue: K-independent scales, then narrow masked stores of out[token, weight row]
#pragma unroll
  for (int i = 0; i < R; i++) {
    const int col = w0 + 8 * ((i / 2) % 2), r = m0 + 8 * (i / 4) + 2 * (lane % 4) + i % 2;
    if (r >= end || col >= g.nout) continue;
    float v = acc[i];
    if (!grp) v = mul_rn(v, g.as[(int64_t)r * g.a_ng]);
    if (!blk) v = mul_rn(v, g.wscheme == MOEFFI_W_PER_CHANNEL ? ws[col] : ws[0]);
    store_one(g, r, g.interleaved ? deinterleave(col, g.nout / 2) : col, v, blockIdx.z * g.split_stride);
  }
#else
  __trap(); // built for a target without sm_90a features; supported() refuses such devices
#endif
}

// ---- host: tensor maps through the driver entry point (no libcuda link) ----

PFN_cuTensorMapEncodeTiled_v12000 encode_fn(char *msg, uint32_t cap, int32_t *st) {
  static std::once_flag once;
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static cudaError_t err = cudaSuccess;
  static cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSuccess;
  std::call_once(once, [] {
    void *p = nullptr;
    err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
    if (err == cudaSuccess && q == cudaDriverEntryPointSuccess) fn = (PFN_cuTensorMapEncodeTiled_v12000)p;
  });
  *st = MOEFFI_OK;
  if (!fn) {
    moeffi_say(msg, cap, "cuTensorMapEncodeTiled is unavailable: %s (query result %d)", cudaGetErrorString(err), (int)q);
    *st = MOEFFI_DEVICE;
  }
  return fn;
}

// A [rows, cols] row-major fp8 (uint8) matrix, boxes of 128 columns x box_rows rows, 128B swizzle,
// out-of-bounds elements read as zero.
int32_t make_map(CUtensorMap *map, const void *base, uint64_t rows, uint64_t cols, uint32_t box_rows, char *msg,
                 uint32_t cap) {
  int32_t st;
  const PFN_cuTensorMapEncodeTiled_v12000 fn = encode_fn(msg, cap, &st);
  if (!fn) return st;
  const cuuint64_t dims[2] = {cols, rows}, strides[1] = {cols};
  const cuuint32_t box[2] = {(cuuint32_t)BK, box_rows}, estr[2] = {1, 1};
  const CUresult r = fn(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void *>(base), dims, strides, box, estr,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) FAIL(MOEFFI_DEVICE, "cuTensorMapEncodeTiled (%llu x %llu) failed: CUresult %d",
                              (unsigned long long)rows, (unsigned long long)cols, (int)r);
  return MOEFFI_OK;
}

// ---- workspace: 256-byte aligned sub-buffers, sized for one chunk of min(M, CHUNK) tokens ----

struct Plan {
  uint64_t xq, xs;                    // x gathered into expert order as fp8 [Pc, K], its scales
  uint64_t hist, offsets, perm, inv;  // routing
  uint64_t tiles;                     // tile_start [E+1]
  uint64_t acc, hq, hs;               // GEMM1 then GEMM2 out f32; h as fp8 [Pc, N], its scales
  uint64_t part;                      // fp8_scaled_mm with K split: f32 partial sums [splits, Mc, N]
  uint64_t total;
};

uint64_t take(uint64_t *cursor, uint64_t bytes) {
  const uint64_t at = (*cursor + WS_ALIGN - 1) / WS_ALIGN * WS_ALIGN;
  *cursor = at + bytes;
  return at;
}

// fp8_scaled_mm's rows per pass: as many as keep the pass's quantized x within 64 MiB (8192 at K =
// 8192), CHUNK at least: each pass ends in a partial wave of tiles and streams all of W again.
// MOEFFI_HOPPER_MM_CHUNK overrides it (a multiple of 128; the A/B of NOTES.md).
int64_t mm_chunk(int64_t k) {
  static const int64_t forced = getenv("MOEFFI_HOPPER_MM_CHUNK") ? atoll(getenv("MOEFFI_HOPPER_MM_CHUNK")) : 0;
  if (forced >= BM && forced % BM == 0) return forced;
  return std::max<int64_t>(CHUNK, ((int64_t)64 << 20) / std::max<int64_t>(k, 1) / BM * BM);
}

struct MmShape {
  int tok, splits; // token tile (0: wide tiles) and K splits of one fp8_scaled_mm pass
};
MmShape mm_shape(int64_t mc, int64_t n, int64_t k, int sms);
int device_sms(int device);

Plan plan_workspace(const moeffi_problem *p) {
  Plan w = {};
  uint64_t c = 0;
  const uint64_t mc = (uint64_t)std::min<int64_t>(p->m, is_mm(p) ? mm_chunk(p->k) : CHUNK), n = p->n, k = p->k,
                 e = p->experts, f = 4;
  if (mc == 0) return w;
  if (is_mm(p)) { // x quantized [Mc, K] and its scales
    w.xq = take(&c, mc * k);
    w.xs = take(&c, mc * act_groups(p->act_scale, k) * f);
    // K-split partial sums of the pass that needs the most: the first, or a shorter last one
    const int64_t chunk = mm_chunk(p->k), last = p->m % chunk ? p->m % chunk : (int64_t)mc;
    uint64_t part = 0;
    for (const int64_t rows : {(int64_t)mc, last}) {
      const MmShape sh = mm_shape(rows, p->n, p->k, device_sms(p->device_index));
      if (sh.splits > 1) part = std::max(part, (uint64_t)sh.splits * rows * n * f);
    }
    if (part) w.part = take(&c, part);
    w.total = c;
    return w;
  }
  const uint64_t pc = mc * p->topk;
  w.xq = take(&c, pc * k);
  w.xs = take(&c, pc * act_groups(p->act_scale, k) * f);
  w.hist = take(&c, (uint64_t)route_chunks(pc) * e * 4);
  w.offsets = take(&c, (e + 1) * 4);
  w.perm = take(&c, pc * 4);
  w.inv = take(&c, pc * 4);
  w.tiles = take(&c, (e + 1) * 4);
  w.acc = take(&c, pc * std::max(2 * n, (pc <= SPLIT_MAX_PAIRS ? 2 : 1) * k) * f); // split_k2's partial sums
  w.hq = take(&c, pc * n);
  w.hs = take(&c, pc * act_groups(p->act_scale, n) * f);
  w.total = c;
  return w;
}

// ---- prepared weights: the canonical fp8 layout in the handle's own memory, plus their B maps ----

struct Handle {
  uint32_t op, weight_scale, act_scale;
  int64_t n, k, experts;
  int device, sms; // device ordinal, its multiprocessor count
  int interleaved;  // w13 (and per-channel scales) hold gate/up rows interleaved by 32: SiLU fuses into GEMM1
  int bn13, bn2;    // wide-tile widths of the GEMMs over w13 and w2 (wide_bn; fp8_moe: wide_tiles)
  char gpu[256];    // the device's name, for the tune table
  void *mem;
  uint8_t *w13, *w2; // fp8 [E, 2N, K] and [E, K, N]
  float *s13, *s2;
  // weights [E*2N, K] and [E*K, N] as TMA maps, one per tile height: 64-row boxes (swapped tiles),
  // 128 and 192 (wide tiles), 96 (halves of 192-row tiles for CTA pairs)
  CUtensorMap map13[4], map2[4];
};

int64_t scale_count(uint32_t wscheme, int64_t rows, int64_t len) {
  if (wscheme == MOEFFI_W_PER_CHANNEL) return rows;
  if (wscheme == MOEFFI_W_BLOCK_128) return ceil_div(rows, QBLK) * ceil_div(len, QBLK);
  return 1;
}

int32_t check_handle(const moeffi_problem *p, const Handle *h, char *msg, uint32_t cap) {
  if (!h) FAIL(MOEFFI_INVALID, "handle is NULL: call prepare first");
  if (p->op != h->op || p->n != h->n || p->k != h->k || h->experts != (is_mm(p) ? 1 : p->experts) ||
      h->weight_scale != p->weight_scale ||
      h->act_scale != p->act_scale || h->device != p->device_index)
    FAIL(MOEFFI_INVALID, "problem (op, n, k, experts, scheme or device) differs from the one the handle was prepared for");
  return MOEFFI_OK;
}

#define NEED(ptr, count, slot) \
  if (!(ptr) && (count) != 0) FAIL(MOEFFI_INVALID, "tensors->%s is NULL", slot)

// Rows per token tile: 0 = wide 128-row tiles; else a swapped tile of 8..64 rows, the power of two
// covering the mean rows per routed expert (a chunk's routing is on the device; the mean is a bound
// known on the host: pc pairs over at most min(E, pc) experts).
int token_tile(int64_t pc, int64_t experts, int64_t max_mean = SWAP_MAX_TOK) {
  if (FIXED) return 0;
  const int64_t mean = ceil_div(pc, std::max<int64_t>(1, std::min(experts, pc)));
  if (mean > max_mean) return 0;
  int tok = 8;
  while (tok < mean && tok < SWAP_MAX_TOK) tok *= 2;
  return tok;
}

template <int TOK> void set_swap_smem() {
  cudaFuncSetAttribute(swap_gemm_sm90<TOK>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)swap_smem<TOK>());
}

template <int TOK>
void launch_swap(const CUtensorMap &amap, const CUtensorMap &bmap, const GemmArgs &g, dim3 grid, cudaStream_t s, bool pdl) {
  launch_pdl(pdl, swap_gemm_sm90<TOK>, grid, SWAP_THREADS, swap_smem<TOK>(), s, amap, bmap, g);
}

// One grouped GEMM: out[rows, nout] = A[rows, K] (gathered fp8) x B[expert rows, K]^T. The grid's
// first axis covers an upper bound of the expert tiles, sum over experts of ceil(m_e / tile rows).
constexpr int MAP_ROWS[4] = {SWAP_ROWS, 128, 192, 96};
int map_index(int tok, int bn) { return tok ? 0 : bn == 192 ? 2 : 1; }

// The tune table `deno task tune` writes beside this library (hopper_fp8.tune): lines "gpu <name>";
// "bn <nout> <128|192>", the measured best wide-tile width per GEMM output width on that GPU; and
// "layer <2N> <K> <rows> <128|192> <0|1>", for an fp8_moe layer whose GEMMs have those output widths
// and whose mean rows per routed expert are at most <rows> (the M bucket), the best width of both
// GEMMs and whether they run as CTA pairs.
struct TuneTable {
  char gpu[256];
  int count, layers;
  int64_t nout[256];
  int bn[256];
  struct Layer {
    int64_t n13, n2, rows;
    int bn, pair;
  } layer[256];
};

const TuneTable &tune_table() {
  static TuneTable t = {};
  static std::once_flag once;
  std::call_once(once, [] {
    Dl_info info;
    if (!dladdr((void *)&tune_table, &info) || !info.dli_fname) return;
    char path[4096];
    snprintf(path, sizeof path, "%s", info.dli_fname);
    char *slash = strrchr(path, '/');
    snprintf(slash ? slash + 1 : path, sizeof path - (slash ? slash + 1 - path : 0), "hopper_fp8.tune");
    FILE *f = fopen(path, "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
      long long nout, n13, n2, rows;
      int bn, pair;
      if (!strncmp(line, "gpu ", 4)) {
        snprintf(t.gpu, sizeof t.gpu, "%s", line + 4);
        t.gpu[strcspn(t.gpu, "\r\n")] = 0;
      } else if (sscanf(line, "bn %lld %d", &nout, &bn) == 2 && (bn == 128 || bn == 192) && t.count < 256) {
        t.nout[t.count] = nout, t.bn[t.count++] = bn;
      } else if (sscanf(line, "layer %lld %lld %lld %d %d", &n13, &n2, &rows, &bn, &pair) == 5 && (bn == 128 || bn == 192) &&
                 (pair == 0 || pair == 1) && t.layers < 256) {
        t.layer[t.layers++] = {n13, n2, rows, bn, pair};
      }
    }
    fclose(f);
  });
  return t;
}

// Columns of a wide tile for a GEMM with nout output columns on a GPU named gpu: MOEFFI_HOPPER_BN
// (128|192) if set, else the tune table's entry when it was measured on this GPU, else 192 (fewer,
// larger tiles need less L2 traffic per FLOP: 10-14% faster than 128 at M = 4096 on an H200,
// NOTES.md) unless nout is at most 128.
int forced_bn() {
  static const int forced = [] {
    const char *v = getenv("MOEFFI_HOPPER_BN");
    return v ? atoi(v) : 0;
  }();
  return forced == 128 || forced == 192 ? forced : 0;
}
int wide_bn(int64_t nout, const char *gpu) {
  if (const int forced = forced_bn()) return forced; // FIXED too: one width for the process, whatever M is
  if (FIXED) return nout > 128 ? 192 : 128;
  const TuneTable &t = tune_table();
  if (!strcmp(t.gpu, gpu))
    for (int i = 0; i < t.count; i++)
      if (t.nout[i] == nout) return t.bn[i];
  return nout > 128 ? 192 : 128;
}

// K splits for a swapped-tile GEMM of `ctas` weight-tile CTAs: as many (up to max_splits, at least
// four K blocks each) as keep every CTA resident at two per SM. Decode GEMMs with few weight tiles
// (mixtral's GEMM 2 at M = 1: 2 experts x 64 tiles; fp8_scaled_mm at N = 7168: 112) would otherwise
// leave SMs with one weight stream or none. The partial sums are added in split order afterwards.
int k_splits(int64_t ctas, int nkb, int sms, int max_splits) {
  int s = 1;
  while (s < max_splits && ctas * (s + 1) <= 2 * sms && nkb >= 4 * (s + 1)) s++;
  return s;
}

// One fp8_scaled_mm pass of mc rows: up to 128 rows take swapped tiles (N / 192 wide tiles would leave
// most SMs idle at N = 7168; one 128-token tile was slower than two of 64: NOTES.md), with K split
// when that leaves SMs without two CTAs. 33..64 rows take two 32-token tiles instead of one 64-token
// tile split in K where they make as many CTAs without a split (no partial sums to reduce; N = K =
// 7168, M = 64: 33 against 35 us, NOTES.md). The workspace plan uses it too (the split buffer).
MmShape mm_shape(int64_t mc, int64_t n, int64_t k, int sms) {
  int tok = token_tile(mc, 1, MM_SWAP_MAX);
  const int nkb = (int)ceil_div(k, QBLK), nt = (int)ceil_div(n, SWAP_ROWS);
  if (tok == 64 && mc <= 64 && k_splits(2 * nt, nkb, sms, MM_MAX_SPLITS) == 1 &&
      2 * nt >= nt * k_splits(nt, nkb, sms, MM_MAX_SPLITS))
    tok = 32;
  return {tok, tok ? k_splits(ceil_div(mc, tok) * nt, nkb, sms, MM_MAX_SPLITS) : 1};
}

// Multiprocessors of a device, queried once (132, an H100's, if the query fails).
int device_sms(int device) {
  static int known[64] = {};
  if (device < 0 || device >= 64) return 132;
  if (!known[device]) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || v < 1) v = 132;
    known[device] = v;
  }
  return known[device];
}

// Kernels after the first of a forward may overlap their predecessor's end (pdl.cuh);
// MOEFFI_HOPPER_NO_PDL=1 launches them one after the other.
bool use_pdl() {
  static const bool on = !(getenv("MOEFFI_HOPPER_NO_PDL") && atoi(getenv("MOEFFI_HOPPER_NO_PDL")) == 1);
  return on;
}

// m-tiles per raster group of the wide kernel (tile_order): with all m-tiles first (the order before),
// a chunk of deepseek-v3 EP8 (32 experts x 8 m-tiles) re-read every expert's rows from DRAM for each
// n-tile; groups of 8 (one mixtral or deepseek expert at M = 4096) took it from 6328 to 4658 us on an
// H100, qwen3 1363 -> 1162 (16: the same within noise; fp8_scaled_mm unchanged).
constexpr int RASTER_GROUP_M = 8;

// Wide tiles at BN = 192 run as CTA pairs sharing B (grouped_gemm_sm90's PAIR) where the mean rows per
// routed expert (pc pairs over at most min(E, pc) experts) fill at least four 128-row tiles, unless
// MOEFFI_HOPPER_NO_PAIR=1. fp8_moe's two GEMMs share the routing's tile units, so both must pair. With
// fewer rows an expert's odd last tile leaves half a pair idle: H100, M = 4096, pairs against single
// CTAs: mixtral (1024 rows an expert) -9%, deepseek EP8 (1024) -6%, qwen3 (256) +8%, qwen1.5 (273) +11%.
bool use_pairs(int tok, int bn1, int bn2, int64_t pc, int64_t experts) {
  static const bool off = getenv("MOEFFI_HOPPER_NO_PAIR") != nullptr, on = getenv("MOEFFI_HOPPER_PAIR") != nullptr;
  return !FIXED && !off && !tok && bn1 == 192 && bn2 == 192 && (on || pc >= 4 * BM * std::min(experts, pc));
}

// The wide tiles of one fp8_moe chunk of pc routed rows: the tune table's layer entry for this GPU,
// these widths and the smallest M bucket holding the mean rows per routed expert, else the handle's
// widths and use_pairs. MOEFFI_HOPPER_BN, MOEFFI_HOPPER_PAIR and MOEFFI_HOPPER_NO_PAIR override it
// (deno task tune measures with them).
struct WideTiles {
  int bn1, bn2;
  bool pairs;
};
WideTiles wide_tiles(const Handle *h, int tok, int64_t pc, int64_t experts) {
  WideTiles w = {h->bn13, h->bn2, use_pairs(tok, h->bn13, h->bn2, pc, experts)};
  static const bool forced = forced_bn() || getenv("MOEFFI_HOPPER_PAIR") || getenv("MOEFFI_HOPPER_NO_PAIR");
  if (tok || forced || FIXED) return w;
  const TuneTable &t = tune_table();
  if (strcmp(t.gpu, h->gpu)) return w;
  const int64_t mean = ceil_div(pc, std::min(experts, pc));
  const TuneTable::Layer *best = nullptr;
  for (int i = 0; i < t.layers; i++) {
    const TuneTable::Layer &l = t.layer[i];
    if (l.n13 == 2 * h->n && l.n2 == h->k && mean <= l.rows && (!best || l.rows < best->rows)) best = &l;
  }
  if (best) w = {best->bn, best->bn, best->pair && best->bn == 192};
  return w;
}

// bmap_half: B in BN / 2-row boxes: CTA pairs over 256-row units (use_pairs; tile_start counts those)
int32_t launch_gemm(const CUtensorMap &amap, const CUtensorMap &bmap, const GemmArgs &args, int pc, int tok, int bn,
                    int sms, cudaStream_t s, char *msg, uint32_t cap, int splits = 1, const CUtensorMap *bmap_half = nullptr) {
  const bool pdl = use_pdl();
  GemmArgs g = args;
  g.group_m = RASTER_GROUP_M;
  const int rows = tok ? tok : BM;
  // a slot per row tile: up to one partial tile per expert beyond pc / rows (exactly pc / rows for one expert)
  const unsigned slots = (unsigned)(ceil_div(pc, rows) + (g.offsets ? std::min<int64_t>(g.experts, pc) : 0));
  if (bmap_half) { // persistent clusters of two, at most one CTA per SM
    const int64_t unit_slots = ceil_div(pc, 2 * BM) + (g.offsets ? std::min<int64_t>(g.experts, pc) : 0);
    const unsigned units = (unsigned)(unit_slots * ceil_div(g.nout, bn)), grid = 2 * std::min(units, (unsigned)sms / 2);
    const bool kscaled = g.a_ng > 1 || g.wscheme == MOEFFI_W_BLOCK_128;
    launch_pdl_clusters(pdl, 2, kscaled ? grouped_gemm_sm90<192, true, true> : grouped_gemm_sm90<192, false, true>, grid,
                        GEMM_THREADS, wide_smem<192>(), s, amap, *bmap_half, g);
  } else if (!tok) { // persistent: at most one CTA per SM
    const unsigned tiles = slots * (unsigned)ceil_div(g.nout, bn), grid = std::min(tiles, (unsigned)sms);
    const bool kscaled = g.a_ng > 1 || g.wscheme == MOEFFI_W_BLOCK_128;
    auto kernel = bn == 192 ? (kscaled ? grouped_gemm_sm90<192, true> : grouped_gemm_sm90<192, false>)
                            : (kscaled ? grouped_gemm_sm90<128, true> : grouped_gemm_sm90<128, false>);
    launch_pdl(pdl, kernel, grid, GEMM_THREADS, bn == 192 ? wide_smem<192>() : wide_smem<128>(), s, amap, bmap, g);
  }
  else {
    const dim3 grid(slots, (unsigned)ceil_div(g.nout, SWAP_ROWS), (unsigned)splits);
    if (tok == 8) launch_swap<8>(amap, bmap, g, grid, s, pdl);
    else if (tok == 16) launch_swap<16>(amap, bmap, g, grid, s, pdl);
    else if (tok == 32) launch_swap<32>(amap, bmap, g, grid, s, pdl);
    else launch_swap<64>(amap, bmap, g, grid, s, pdl);
  }
  MOEFFI_CUDA_LAUNCHED("hopper_fp8 grouped GEMM");
  return MOEFFI_OK;
}

int32_t run_fp8_moe(const moeffi_problem *p, const Handle *h, const moeffi_tensors *t, char *base, cudaStream_t s,
                    char *msg, uint32_t cap) {
  const Plan w = plan_workspace(p);
  const int64_t M = p->m, N = p->n, K = p->k;
  const int E = (int)p->experts, topk = (int)p->topk;
  const uint32_t act = p->act_scale;
  uint8_t *xq = (uint8_t *)(base + w.xq), *hq = (uint8_t *)(base + w.hq);
  float *xs = (float *)(base + w.xs), *hs = (float *)(base + w.hs), *acc = (float *)(base + w.acc);
  int *hist = (int *)(base + w.hist), *offsets = (int *)(base + w.offsets), *tiles = (int *)(base + w.tiles);
  int *perm = (int *)(base + w.perm), *inv = (int *)(base + w.inv);
  const uint16_t *x = (const uint16_t *)t->x;
  const int32_t *ids = (const int32_t *)t->topk_ids;
  const float *a1 = (const float *)t->a1_scale, *a2 = (const float *)t->a2_scale; // static scales (FIXED)
  const int nkb1 = (int)ceil_div(K, QBLK), nkb2 = (int)ceil_div(N, QBLK);
  int32_t st;
  for (int64_t t0 = 0; t0 < M; t0 += CHUNK) {
    const int64_t mc = std::min(CHUNK, M - t0);
    const int pc = (int)(mc * topk), tok = token_tile(pc, E), rows = tok ? tok : BM;
    const WideTiles wt = wide_tiles(h, tok, pc, E);
    const int bn1 = wt.bn1, bn2 = wt.bn2;
    const bool pairs = wt.pairs;
    CUtensorMap amap1, amap2;
    if ((st = make_map(&amap1, xq, pc, K, rows, msg, cap)) || (st = make_map(&amap2, hq, pc, N, rows, msg, cap))) return st;
    launch_routing(ids + t0 * topk, pc, E, hist, offsets, perm, inv, t->error_flags, s, pairs ? 2 * BM : rows, tiles);
    // Prefill quantizes each token once and writes its codes to each of its routed rows (inv): topk x
    // fewer rows to quantize than per pair, and no gather pass (deepseek M=4096: 181 -> 111 us, NOTES.md);
    // MOEFFI_HOPPER_PAIR_QUANT=1 quantizes per pair.
    static const bool per_pair = getenv("MOEFFI_HOPPER_PAIR_QUANT") != nullptr;
    if (!tok && topk > 1 && !per_pair && quantize_fits(K) && act != MOEFFI_A_STATIC_TENSOR)
      launch_quantize_rows_scattered(Bf16Rows{x + t0 * K, K}, mc, K, act, xq, xs, s, use_pdl(), RowDest{inv, topk});
    else launch_quantize_rows(GatherRows{x + t0 * K, K, perm, topk, offsets + E}, pc, K, act, xq, xs, s, use_pdl(), a1);
    MOEFFI_CUDA_LAUNCHED("hopper_fp8 routing and quantization");
    // Wide tiles (prefill) write h and y in bf16, as the peers do: half the bytes of fp32 between the
    // kernels (1-2% of the layer at M = 4096, NOTES.md); swapped tiles (decode) keep fp32, whose K-split
    // partial sums are added afterwards.
    const bool wide = !tok, fused = h->interleaved && wide;
    const GemmArgs g1 = {offsets, tiles, E, (int)(2 * N), (int)K, nkb1, xs, (int)act_groups(act, K), h->s13,
                         p->weight_scale, scale_count(p->weight_scale, 2 * N, K), wide && fused ? nullptr : acc,
                         wide && fused ? (uint16_t *)acc : nullptr, nullptr, h->interleaved, fused};
    if ((st = launch_gemm(amap1, h->map13[map_index(tok, bn1)], g1, pc, tok, bn1, h->sms, s, msg, cap, 1,
                          pairs ? &h->map13[3] : nullptr)))
      return st;
    if (g1.silu) launch_quantize_rows(Bf16Rows{(const uint16_t *)acc, N, offsets + E}, pc, N, act, hq, hs, s, use_pdl(), a2);
    else launch_quantize_rows(FastSiluRows{acc, N, offsets + E}, pc, N, act, hq, hs, s, use_pdl(), a2); // rows [0, offsets[E]) are routed
    const int64_t tiles2 = std::min<int64_t>(pc, ceil_div(pc, tok) + std::min(E, pc)); // a tile has >= 1 row
    const int splits = tok && pc <= SPLIT_MAX_PAIRS ? k_splits(tiles2 * ceil_div(K, SWAP_ROWS), nkb2, h->sms, 2) : 1;
    const GemmArgs g2 = {offsets, tiles, E, (int)K, (int)N, nkb2, hs, (int)act_groups(act, N), h->s2,
                         p->weight_scale, scale_count(p->weight_scale, K, N), wide ? nullptr : acc,
                         wide ? (uint16_t *)acc : nullptr, nullptr, 0, 0, (int64_t)pc * K};
    if ((st = launch_gemm(amap2, h->map2[map_index(tok, bn2)], g2, pc, tok, bn2, h->sms, s, msg, cap, splits,
                          pairs ? &h->map2[3] : nullptr)))
      return st;
    const float *tw = (const float *)t->topk_weights + t0 * topk;
    uint16_t *out = (uint16_t *)t->out + t0 * K;
    if (wide) launch_pdl(use_pdl(), combine_vec_kernel<uint16_t>, dim3((unsigned)ceil_div(K, 8 * 256), (unsigned)mc), 256, 0, s,
                         (const uint16_t *)acc, 1, (int64_t)0, inv, tw, topk, K, out);
    else launch_pdl(use_pdl(), combine_vec_kernel<float>, dim3((unsigned)ceil_div(K, 4 * 256), (unsigned)mc), 256, 0, s,
                    (const float *)acc, splits, (int64_t)pc * K, inv, tw, topk, K, out);
    MOEFFI_CUDA_LAUNCHED("hopper_fp8 fp8_moe kernels");
  }
  return MOEFFI_OK;
}

// Copies [E, 2N, row_bytes] (gate rows, then up rows) into dst with the rows of each expert
// interleaved by 32: gate 0-31, up 0-31, gate 32-63, up 32-63, ... (N % 32 == 0; see deinterleave).
cudaError_t interleave_w13(void *dst, const void *src, int64_t E, int64_t N, int64_t row_bytes) {
  const size_t block = 32 * row_bytes;
  for (int64_t e = 0; e < E; e++) {
    char *d = (char *)dst + e * 2 * N * row_bytes;
    const char *g = (const char *)src + e * 2 * N * row_bytes, *u = g + N * row_bytes;
    cudaError_t err = cudaMemcpy2D(d, 2 * block, g, block, block, N / 32, cudaMemcpyDefault);
    if (err == cudaSuccess) err = cudaMemcpy2D(d + block, 2 * block, u, block, block, N / 32, cudaMemcpyDefault);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// out = bf16(sum over the K splits, in split order, of the f32 partial sums (+ bias)): the end of an
// fp8_scaled_mm whose GEMM split K (the same roundings as the wide GEMM's own bf16 epilogue).
static __global__ void __launch_bounds__(256) mm_reduce_kernel(const float *part, int splits, int64_t stride,
                                                               const uint16_t *bias, int64_t rows, int nout, uint16_t *out) {
  pdl_wait(); // the partial sums come from the previous kernel
  pdl_trigger();
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < rows * nout / 2; i += (int64_t)gridDim.x * blockDim.x) {
    float2 v = *(const float2 *)(part + 2 * i);
    for (int z = 1; z < splits; z++) {
      const float2 u = *(const float2 *)(part + z * stride + 2 * i);
      v.x = add_rn(v.x, u.x), v.y = add_rn(v.y, u.y);
    }
    const int col = (int)(2 * i % nout);
    if (bias) v.x = add_rn(v.x, bf16_to_f32(bias[col])), v.y = add_rn(v.y, bf16_to_f32(bias[col + 1]));
    *(uint32_t *)(out + 2 * i) = (uint32_t)f32_to_bf16(v.x) | ((uint32_t)f32_to_bf16(v.y) << 16);
  }
}

// y = quant(x) W^T (+ bias) in bf16: the grouped GEMM with one expert, per chunk of mm_chunk(K) rows.
int32_t run_fp8_mm(const moeffi_problem *p, const Handle *h, const moeffi_tensors *t, char *base, cudaStream_t s,
                   char *msg, uint32_t cap) {
  const Plan w = plan_workspace(p);
  const int64_t M = p->m, N = p->n, K = p->k;
  const uint32_t act = p->act_scale;
  uint8_t *xq = (uint8_t *)(base + w.xq);
  float *xs = (float *)(base + w.xs);
  float *part = (float *)(base + w.part);
  const uint16_t *x = (const uint16_t *)t->x;
  const uint16_t *bias = (p->flags & MOEFFI_FLAG_HAS_BIAS) ? (const uint16_t *)t->bias : nullptr;
  int32_t st;
  const int64_t chunk = mm_chunk(K);
  for (int64_t t0 = 0; t0 < M; t0 += chunk) {
    const int mc = (int)std::min(chunk, M - t0), nkb = (int)ceil_div(K, QBLK);
    const MmShape sh = mm_shape(mc, N, K, h->sms); // the plan's split buffer fits it (plan_workspace)
    const int tok = sh.tok, rows = tok ? tok : BM, splits = sh.splits;
    if (splits > 1 && !w.part) FAIL(MOEFFI_INVALID, "internal: no K-split buffer planned for a %d-row pass", mc);
    CUtensorMap amap;
    if ((st = make_map(&amap, xq, mc, K, rows, msg, cap))) return st;
    launch_quantize_rows(Bf16Rows{x + t0 * K, K}, mc, K, act, xq, xs, s, use_pdl(), (const float *)t->a1_scale);
    MOEFFI_CUDA_LAUNCHED("hopper_fp8 fp8_scaled_mm quantization");
    uint16_t *out = (uint16_t *)t->out + t0 * N;
    GemmArgs g = {nullptr, nullptr, 1, (int)N, (int)K, nkb, xs, (int)act_groups(act, K), h->s13, p->weight_scale, 0,
                  splits > 1 ? part : nullptr, splits > 1 ? nullptr : out, splits > 1 ? nullptr : bias, 0, 0, (int64_t)mc * N};
    g.rows1 = mc; // one expert: no grouping arrays on the device
    const int bn = h->bn13;
    if ((st = launch_gemm(amap, h->map13[map_index(tok, bn)], g, mc, tok, bn, h->sms, s, msg, cap, splits,
                          use_pairs(tok, bn, bn, mc, 1) ? &h->map13[3] : nullptr)))
      return st;
    if (splits > 1)
      launch_pdl(use_pdl(), mm_reduce_kernel, dim3((unsigned)std::min<int64_t>(ceil_div(mc * N / 2, 256), 4 * h->sms)), 256,
                 0, s, (const float *)part, splits, (int64_t)mc * N, bias, (int64_t)mc, (int)N, out);
    MOEFFI_CUDA_LAUNCHED("hopper_fp8 fp8_scaled_mm GEMM");
  }
  return MOEFFI_OK;
}

} // namespace

// ---- exported entry points ----

MOEFFI_API uint32_t moeffi_abi_version(void) { return MOEFFI_ABI_VERSION; }

MOEFFI_API int32_t moeffi_describe(moeffi_manifest *out) {
  const uint32_t ops = (1u << MOEFFI_OP_FP8_MOE) | (1u << MOEFFI_OP_FP8_SCALED_MM);
  const uint32_t acts = (1u << MOEFFI_A_DYNAMIC_TOKEN) | (1u << MOEFFI_A_DYNAMIC_GROUP_128) |
                        (FIXED ? 1u << MOEFFI_A_STATIC_TENSOR : 0u);
  return moeffi_fill_manifest(out, NAME, FIXED ? "0.1.0" : "0.6.0", "sm_90a", MOEFFI_DEVICE_CUDA, ops, MOEFFI_ALL_WEIGHT_SCALES,
                              acts, FIXED ? ops : 0 /* hopper_fp8's tiles depend on M */, PRIORITY);
}

MOEFFI_API int32_t moeffi_supported(const moeffi_problem *problem, char *reason, uint32_t capacity) {
  if (check_problem(problem, reason, capacity) != MOEFFI_OK) return -1;
  return moeffi_cuda_yes(problem, PRIORITY,
                         FIXED ? "WGMMA + TMA grouped GEMMs, one tile configuration for every M" : "WGMMA + TMA grouped GEMMs",
                         reason, capacity);
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
  int32_t st = check_all(problem, msg, cap);
  if (st) return st;
  if (!weights || weights->size < sizeof(moeffi_weights)) FAIL(MOEFFI_INVALID, "weights struct too small");
  const bool mm = is_mm(problem); // mm: W [N, K] in the w13 slot, no w2
  if (!weights->w13 || !weights->w13_scale || (!mm && (!weights->w2 || !weights->w2_scale)))
    FAIL(MOEFFI_INVALID, "weights->%s is NULL", !weights->w13 ? "w13" : !weights->w13_scale ? "w13_scale"
                                                : !weights->w2  ? "w2" : "w2_scale");
  const int64_t E = mm ? 1 : problem->experts, N = problem->n, K = problem->k, rows13 = mm ? N : 2 * N;
  const uint64_t b13 = E * rows13 * K, bs13 = E * scale_count(problem->weight_scale, rows13, K) * 4;
  const uint64_t b2 = mm ? 0 : E * K * N, bs2 = mm ? 0 : E * scale_count(problem->weight_scale, K, N) * 4;
  uint64_t total = 0;
  const uint64_t o13 = take(&total, b13), os13 = take(&total, bs13), o2 = take(&total, b2), os2 = take(&total, bs2);
  MOEFFI_CUDA_TRY(cudaSetDevice(problem->device_index));
  MOEFFI_CUDA_TRY(cudaFuncSetAttribute(grouped_gemm_sm90<128, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)wide_smem<128>()));
  MOEFFI_CUDA_TRY(cudaFuncSetAttribute(grouped_gemm_sm90<128, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)wide_smem<128>()));
  MOEFFI_CUDA_TRY(cudaFuncSetAttribute(grouped_gemm_sm90<192, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)wide_smem<192>()));
  MOEFFI_CUDA_TRY(cudaFuncSetAttribute(grouped_gemm_sm90<192, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)wide_smem<192>()));
  MOEFFI_CUDA_TRY(cudaFuncSetAttribute(grouped_gemm_sm90<192, false, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)wide_smem<192>()));
  MOEFFI_CUDA_TRY(cudaFuncSetAttribute(grouped_gemm_sm90<192, true, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)wide_smem<192>()));
  set_swap_smem<8>(), set_swap_smem<16>(), set_swap_smem<32>(), set_swap_smem<64>();
  MOEFFI_CUDA_TRY(cudaGetLastError());
  // CUtensorMap is 64-byte aligned (alignas in cuda.h): calloc's alignment is not enough
  Handle *h = (Handle *)aligned_alloc(alignof(Handle), (sizeof(Handle) + alignof(Handle) - 1) / alignof(Handle) * alignof(Handle));
  if (!h) FAIL(MOEFFI_NO_MEMORY, "cannot allocate the handle");
  memset((void *)h, 0, sizeof(Handle));
  h->op = problem->op, h->weight_scale = problem->weight_scale, h->act_scale = problem->act_scale;
  h->n = N, h->k = K, h->experts = E, h->device = problem->device_index;
  h->sms = device_sms(h->device);
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, h->device) != cudaSuccess) prop.name[0] = 0;
  h->bn13 = wide_bn(rows13, prop.name), h->bn2 = wide_bn(K, prop.name);
  snprintf(h->gpu, sizeof h->gpu, "%s", prop.name);
  cudaError_t err = cudaMalloc(&h->mem, total);
  if (err != cudaSuccess) {
    free(h);
    FAIL(err == cudaErrorMemoryAllocation ? MOEFFI_NO_MEMORY : MOEFFI_DEVICE, "cudaMalloc of %llu bytes: %s",
         (unsigned long long)total, cudaGetErrorString(err));
  }
  char *mem = (char *)h->mem;
  h->w13 = (uint8_t *)(mem + o13), h->s13 = (float *)(mem + os13), h->w2 = (uint8_t *)(mem + o2), h->s2 = (float *)(mem + os2);
  // Interleaving gate and up rows lets a wide GEMM1 tile hold matching columns (SiLU in its epilogue);
  // block-128 scales would straddle the 32-row groups, so those weights keep the canonical order.
  h->interleaved = !mm && problem->weight_scale != MOEFFI_W_BLOCK_128 && N % 32 == 0;
  if (h->interleaved) {
    err = interleave_w13(h->w13, weights->w13, E, N, K);
    if (err == cudaSuccess && problem->weight_scale == MOEFFI_W_PER_CHANNEL)
      err = interleave_w13(h->s13, weights->w13_scale, E, N, 4);
    else if (err == cudaSuccess) err = cudaMemcpy(h->s13, weights->w13_scale, bs13, cudaMemcpyDefault);
  } else {
    err = cudaMemcpy(h->w13, weights->w13, b13, cudaMemcpyDefault);
    if (err == cudaSuccess) err = cudaMemcpy(h->s13, weights->w13_scale, bs13, cudaMemcpyDefault);
  }
  if (err == cudaSuccess && !mm) err = cudaMemcpy(h->w2, weights->w2, b2, cudaMemcpyDefault);
  if (err == cudaSuccess && !mm) err = cudaMemcpy(h->s2, weights->w2_scale, bs2, cudaMemcpyDefault);
  if (err == cudaSuccess) err = cudaStreamSynchronize(0);
  if (err != cudaSuccess) {
    cudaFree(h->mem);
    free(h);
    FAIL(MOEFFI_DEVICE, "copying the weights: %s", cudaGetErrorString(err));
  }
  st = MOEFFI_OK;
  for (int i = 0; i < 4 && st == MOEFFI_OK; i++) {
    st = make_map(&h->map13[i], h->w13, (uint64_t)(E * rows13), K, MAP_ROWS[i], msg, cap);
    if (st == MOEFFI_OK && !mm) st = make_map(&h->map2[i], h->w2, (uint64_t)(E * K), N, MAP_ROWS[i], msg, cap);
  }
  if (st != MOEFFI_OK) {
    cudaFree(h->mem);
    free(h);
    return st;
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
  if ((st = check_handle(problem, h, msg, cap))) return st;
  const bool mm = is_mm(problem);
  const uint64_t M = problem->m, K = problem->k, N = problem->n, P = mm ? 0 : M * problem->topk;
  NEED(tensors->x, M * K, "x");
  NEED(tensors->out, M * (mm ? N : K), "out");
  NEED(tensors->topk_ids, P, "topk_ids");
  NEED(tensors->topk_weights, P, "topk_weights");
  NEED(tensors->bias, mm && (problem->flags & MOEFFI_FLAG_HAS_BIAS) ? N : 0, "bias");
  const bool stat = problem->act_scale == MOEFFI_A_STATIC_TENSOR;
  NEED(tensors->a1_scale, stat ? M : 0, "a1_scale");
  NEED(tensors->a2_scale, stat && !mm ? M : 0, "a2_scale");
  // fp8_scaled_mm's wide tiles send whole rows of 16-byte pieces (bulk copies) straight to out
  if ((uintptr_t)tensors->out % (mm ? 16 : 8)) FAIL(MOEFFI_INVALID, "tensors->out must be %d-byte aligned", mm ? 16 : 8);
  if ((uintptr_t)tensors->x % 8) FAIL(MOEFFI_INVALID, "tensors->x must be 8-byte aligned");
  MOEFFI_CUDA_TRY(cudaSetDevice(problem->device_index));
  (void)cudaGetLastError(); // forget a stale error of an earlier runtime call (this library's own runtime)
  const cudaStream_t s = (cudaStream_t)tensors->stream;
  const uint64_t need = plan_workspace(problem).total;
  // TMA reads the gathered activations straight from the workspace: 16-byte alignment at least.
  if (problem->m > 0 && (tensors->workspace_bytes < need || (need && !tensors->workspace) ||
                         (uintptr_t)tensors->workspace % 16))
    FAIL(MOEFFI_INVALID, "workspace must be %llu bytes, 16-byte aligned (got %llu)", (unsigned long long)need,
         (unsigned long long)tensors->workspace_bytes);
  if (problem->m == 0) return MOEFFI_OK;
  return mm ? run_fp8_mm(problem, h, tensors, (char *)tensors->workspace, s, msg, cap)
            : run_fp8_moe(problem, h, tensors, (char *)tensors->workspace, s, msg, cap);
}
