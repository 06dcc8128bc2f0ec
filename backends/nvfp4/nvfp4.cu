// nvfp4.cu: the fast NVFP4 backend of moeffi (sm_80+): nvfp4_experts_quant and nvfp4_silu_quant
// (moe.md section 4, moeffi.h), the same bytes as backends/reference/reference.c.
//
// One kernel per call (two above 4096 experts), no host synchronization. A thread quantizes one
// 16-element scale block per trip, loaded a trip ahead: its amax, e4m3 scale and 16 codes need no
// other lane. The quant op from 16 rows per expert on the mean runs the "sector kernel": a warp walks
// 8 rows x 32 blocks of one expert's 128-row scale tile in 8 trips and writes their scales as whole
// 32-byte sectors of the swizzled layout. Smaller problems and the silu op run the "flat kernel", a
// grid-stride loop over the blocks in row order storing each scale byte where it belongs. The
// previous kernel (items of 8 on lane pairs sharing the amax by a shuffle) stays as a benchmark
// variant and the fallback for indices past 32 bits.
// Each block checks the expert offsets and builds the 128-row-rounded block-scale offsets itself: in
// registers for E <= 32 (lane e holds expert e; two ballots find a row's expert where a warp holds
// at most two rows, else a 5-step shuffle binary search), in shared memory up to 4096 experts
// (binary search there), and beyond that a one-block planning kernel writes them to the workspace
// (binary search in global memory). A thread's rows
// only grow, so it searches again only when it leaves its expert. Every search reads offsets [0, E]
// only and ends on the expert owning the row. The scale buffer is written once, by the same kernel:
// real scales and the padding of each expert's last 128-row tile (the sector kernel writes both in its
// sectors), padding columns and the unused tail, with no memset pass. The E2M1, E4M3 and SiLU arithmetic comes from
// cuda/numerics.cuh (software on every architecture, bit-exact with the reference).
// Design, measurements and the sm_100 caveat: backends/nvfp4/NOTES.md.
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "check.cuh"
#include "moeffi.h"
#include "numerics.cuh"

#if defined(__USE_FAST_MATH__)
#error "nvfp4.cu relies on CUDA's expf erring by 2 ulp at most (numerics.cuh silu_mul_bf16): build without --use_fast_math"
#endif

using namespace moeffi;

MOEFFI_DEFINE_LAYOUT()

namespace {

constexpr int REG_MAX_E = 32;    // register lookup: one expert per lane
constexpr int SMEM_MAX_E = 4096; // shared-memory lookup: offsets and bases in 32 KiB
constexpr int THREADS = 256;     // block size of large problems; small ones go down to 64
constexpr int MIN_THREADS = 64;
constexpr int PLAN_THREADS = 1024;
// Items per thread per loop trip, loaded one trip ahead: 32 bytes in flight per thread either way.
template <bool SILU> __host__ __device__ constexpr int items_per_trip() { return SILU ? 1 : 2; }
constexpr unsigned FULL = 0xFFFFFFFFu;
constexpr int64_t MAX_UNITS = INT32_MAX; // zeroing units and scale bytes are indexed in int32 pieces
constexpr int64_t MAX_ROWS = (int64_t)1 << 30; // m + 127 E: rows stay int32 past M by a grid stride

enum Lookup { REG = 0, SMEM = 1, GLOBAL = 2 };

// Benchmark-only variants (moeffi_nvfp4_variant_run); 0 is what moeffi_run does.
// SECTOR / FLAT: the sector or the flat kernel whatever the shape; ITEMS: the previous kernel (items of
// 8 on lane pairs); FLAT2: two blocks per thread and trip;
// OLD_E2M1: the flat kernel with e2m1x8_magnitudes. Timing only (not bit-exact): NO_SF the flat
// kernel without its per-block scale byte stores, SECTOR_NO_SF the sector kernel without its scale
// stores, READ_ONLY the flat kernel without any store (loads, amax and scales only), NOOP an empty kernel.
enum Variant { AUTO = 0, PLAIN = 1, FORCE_SMEM = 2, FORCE_GLOBAL = 3, MEMSET = 4, FLOAT_AMAX = 5, ITEMS = 6, FLAT2 = 7,
               OLD_E2M1 = 8, NO_SF = 9, NOOP = 10, READ_ONLY = 11, SECTOR = 12, FLAT = 13, SECTOR_NO_SF = 14 };
constexpr int LAST_VARIANT = SECTOR_NO_SF;
enum Mode { MODE_FULL = 0, MODE_NO_SF = 1, MODE_READ_ONLY = 2 }; // the timing-only modes

#define FAIL(status, ...)              \
  do {                                 \
    moeffi_say(msg, cap, __VA_ARGS__); \
    return (status);                   \
  } while (0)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
bool is_nvfp4(uint32_t op) { return op == MOEFFI_OP_NVFP4_EXPERTS_QUANT || op == MOEFFI_OP_NVFP4_SILU_QUANT; }

// ---- the problem as the kernels see it ----

struct Args {
  const uint16_t *x;     // bf16 [M, cols] (quant) or [M, 2 * cols] (silu: gate, then up)
  const int32_t *off;    // [E + 1]
  const float *gscale;   // [E]
  uint8_t *out;          // [M, cols / 2]
  uint8_t *sf;           // swizzled scales, sf_bytes
  uint32_t *error_flags; // may be NULL
  int *ws_ok, *ws_base;  // GLOBAL lookup: offsets-valid word, first scale row of each expert [E + 1]
  int E, ktiles, ipr;    // experts, ceil(cols / 64), items per row = cols / 8
  int rows;              // M as int32 (M + 127 E <= 2^30): row tests in one compare, not a 64-bit pair
  int64_t M, cols, items, sf_bytes;
};

// ---- small device helpers ----

__device__ __forceinline__ int round128(int rows) { return (rows + 127) & ~127; }

__device__ __forceinline__ int warp_inclusive_scan(int v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(FULL, v, o);
    if (lane >= o) v += t;
  }
  return v;
}

// Exclusive prefix sum over the block (blockDim.x a multiple of 32, at most 1024); *total = the sum.
__device__ int block_exclusive_scan(int v, int *total) {
  __shared__ int warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int incl = warp_inclusive_scan(v, lane);
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int s = lane < warps ? warp_sums[lane] : 0;
    warp_sums[lane] = warp_inclusive_scan(s, lane);
  }
  __syncthreads();
  *total = warp_sums[warps - 1];
  const int r = incl - v + (warp > 0 ? warp_sums[warp - 1] : 0);
  __syncthreads(); // warp_sums may be reused
  return r;
}

// Whether off[0..E] runs from 0 to M without decreasing (every thread of the block gets the answer);
// then base[e] = the first scale row of expert e for e <= E (base[E] = the rows of all experts).
// Each thread owns a contiguous run of experts. off and base may be shared or global memory.
__device__ bool plan_block(const int32_t *off, int E, int64_t M, int *base) {
  bool bad = threadIdx.x == 0 && (off[0] != 0 || off[E] != M);
  for (int e = threadIdx.x; e < E; e += blockDim.x) bad |= off[e + 1] < off[e];
  if (__syncthreads_or(bad)) return false;
  const int seg = (E + blockDim.x - 1) / blockDim.x;
  const int lo = (int)min((int64_t)E, (int64_t)threadIdx.x * seg), hi = min(E, lo + seg);
  int sum = 0; // valid offsets: every partial sum is at most M + 127 E, which supported() keeps in int
  for (int e = lo; e < hi; e++) sum += round128(off[e + 1] - off[e]);
  int total;
  int b = block_exclusive_scan(sum, &total);
  for (int e = lo; e < hi; e++) {
    base[e] = b;
    b += round128(off[e + 1] - off[e]);
  }
  if (threadIdx.x == 0) base[E] = total;
  return true;
}

// What an item needs of its expert: its rows [row0, end), first scale row, global scale and 1/gs.
struct Expert {
  int row0, end, base;
  float gs, inv_gs;
};
constexpr Expert NO_EXPERT = {0, -1, 0, 1.0f, 1.0f}; // ends before every row: the next item looks up

// One expert per lane (E <= 32): every warp loads the offsets and scans them itself.
struct RegLookup {
  int lo, hi, base, total;
  float gs, inv_gs;
  bool ok;
  int E;
  __device__ void setup(const Args &a) {
    const int lane = threadIdx.x & 31;
    E = a.E;
    lo = hi = (int)a.M; // lanes past E: empty experts at the end, never chosen
    gs = 1.0f;
    if (lane < E) lo = a.off[lane], hi = a.off[lane + 1], gs = a.gscale[lane];
    const bool bad = lane < E && (hi < lo || (lane == 0 && lo != 0) || (lane == E - 1 && hi != a.M));
    ok = !__any_sync(FULL, bad);
    const int rows = ok ? round128(hi - lo) : 0;
    const int incl = warp_inclusive_scan(rows, lane);
    base = incl - rows;
    total = __shfl_sync(FULL, incl, 31);
    inv_gs = div_rn(1.0f, gs);
  }
  // The lane's expert for row r (r < M): a binary search over the lanes' first rows, in 5 shuffles.
  // Every lane of the warp calls it, and only when one of them left its expert's rows.
  __device__ __forceinline__ void update(Expert &ex, bool valid, int r) const {
    if (!__any_sync(FULL, valid && r >= ex.end)) return;
    // Rows grow along the lanes. Where the warp holds at most two rows (r0, r1), e = the number of
    // experts ending at or before the row (empty ones included; lanes past E end at M > r), two
    // ballots; else a binary search over the lanes' first rows. An invalid lane's e is unused.
    const int r0 = __shfl_sync(FULL, r, 0), r1 = __shfl_sync(FULL, r, 31);
    int e = 0;
    if (r1 - r0 <= 1) {
      const unsigned b0 = __ballot_sync(FULL, hi <= r0), b1 = __ballot_sync(FULL, hi <= r1);
      e = min(__popc(r == r0 ? b0 : b1), 31);
    } else {
#pragma unroll
      for (int s = 16; s; s >>= 1) {
        const int c = e + s, start = __shfl_sync(FULL, lo, c);
        if (c < E && start <= r) e = c;
      }
    }
    ex = {__shfl_sync(FULL, lo, e), __shfl_sync(FULL, hi, e), __shfl_sync(FULL, base, e), __shfl_sync(FULL, gs, e),
          __shfl_sync(FULL, inv_gs, e)};
  }
  // The expert owning scale row s (warp-uniform, every lane calls it; the sector kernel), looked up
  // when s is past ex's tiles: e = the experts whose tiles end at or before s (empty ones included;
  // lanes past E end at total > s).
  __device__ __forceinline__ void tile_update(Expert &ex, int s) const {
    if (s < ex.base + round128(ex.end - ex.row0)) return;
    const int e = __popc(__ballot_sync(FULL, base + round128(hi - lo) <= s));
    ex = {__shfl_sync(FULL, lo, e), __shfl_sync(FULL, hi, e), __shfl_sync(FULL, base, e), __shfl_sync(FULL, gs, e),
          __shfl_sync(FULL, inv_gs, e)};
  }
  // Rows of expert e (every lane calls it) and its first scale row.
  __device__ __forceinline__ void rows_of(int e, int &rows, int &first) const {
    rows = __shfl_sync(FULL, hi - lo, e & 31);
    first = __shfl_sync(FULL, base, e & 31);
  }
};

// The expert e in [lo, E) with off[e] <= r < off[e + 1], given off[lo] <= r < off[E]: a binary
// search reading off[lo + 1 .. E - 1] only.
__device__ __forceinline__ int search(const int32_t *off, int lo, int E, int r) {
  int hi = E;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (off[mid] <= r) lo = mid;
    else hi = mid;
  }
  return lo;
}

// Offsets and bases in shared memory (SMEM) or in global memory and the workspace (GLOBAL). A
// thread's rows only grow, so after the first binary search it looks at the next expert first.
struct TableLookup {
  const int32_t *off;
  const int *base;
  const float *gscale;
  int E, total;
  __device__ __forceinline__ void update(Expert &ex, int &e, bool valid, int r) const {
    if (!valid || r < ex.end) return;
    if (ex.end < 0) e = search(off, 0, E, r);                // first lookup
    else if (e + 2 <= E && r < off[e + 2]) e = e + 1;        // the next expert (or the one after
    else e = search(off, min(e + 1, E - 1), E, r);           // empty ones: searched)
    const float gs = gscale[e];
    ex = {off[e], off[e + 1], base[e], gs, div_rn(1.0f, gs)};
  }
  // The same for scale row s past ex's tiles (the sector kernel): the bases are searched as the
  // offsets are above (an empty expert's tiles are empty, so the search ends on the owner).
  __device__ __forceinline__ void tile_update(Expert &ex, int &e, int s) const {
    if (s < ex.base + round128(ex.end - ex.row0)) return;
    if (ex.end < 0) e = search(base, 0, E, s);
    else if (e + 2 <= E && s < base[e + 2]) e = e + 1;
    else e = search(base, min(e + 1, E - 1), E, s);
    const float gs = gscale[e];
    ex = {off[e], off[e + 1], base[e], gs, div_rn(1.0f, gs)};
  }
  __device__ __forceinline__ void rows_of(int e, int &rows, int &first) const {
    rows = off[e + 1] - off[e];
    first = base[e];
  }
};

// ---- the items ----

template <bool SILU> struct Raw {
  uint4 v[SILU ? 2 : 1];
};

// Item (row r, 8-element column group j): x, or the gate and up halves of the silu input.
template <bool SILU> __device__ __forceinline__ Raw<SILU> load_item(const Args &a, int r, int j) {
  Raw<SILU> raw;
  const uint4 *row = (const uint4 *)a.x + (int64_t)r * (SILU ? 2 * a.ipr : a.ipr);
  raw.v[0] = __ldcs(row + j);
  if (SILU) raw.v[SILU ? 1 : 0] = __ldcs(row + a.ipr + j);
  return raw;
}

// Position of an item: row r, 8-element group j (item index r * ipr + j).
struct Pos {
  int r, j;
};

// nvfp4_scale_offset (numerics.cuh) in 32-bit pieces: expert base and row-in-expert i give the
// tile row base + (i & ~127), whose tiles start at that times ktiles * 4 bytes.
__device__ __forceinline__ int64_t scale_byte(int base, int ktiles, uint32_t i, uint32_t c) {
  return (int64_t)(base + (int)(i & ~127u)) * (ktiles * 4) + ((int64_t)(c >> 2) << 9) +
         (((i & 31u) << 4) | (((i >> 5) & 3u) << 2) | (c & 3u));
}

// The 8 bf16 an item quantizes: x, or h = silu(gate) * up (numerics.cuh), and their values.
template <bool SILU> __device__ __forceinline__ uint4 item_values(const Raw<SILU> &raw, float (&v)[8]) {
  uint4 h = raw.v[0];
  if (SILU) {
    float g[8], u[8];
    bf16x8_values(raw.v[0], g);
    bf16x8_values(raw.v[SILU ? 1 : 0], u);
    uint32_t hw[4];
#pragma unroll
    for (int k = 0; k < 4; k++)
      hw[k] = (uint32_t)silu_mul_bf16(g[2 * k], u[2 * k]) | ((uint32_t)silu_mul_bf16(g[2 * k + 1], u[2 * k + 1]) << 16);
    h = make_uint4(hw[0], hw[1], hw[2], hw[3]);
  }
  bf16x8_values(h, v);
  return h;
}

// The block amax from this lane's 8 values and its pair lane's (every lane calls it). PACKED: on the
// bf16 words h themselves (max.bf16x2 of the magnitudes, sm_80+), 12 instructions and a shuffle
// instead of 8 unpacks, 8 FMNMX and a shuffle (the unpacked v are needed again for the products,
// and keeping 16 floats live across the scale chain made the compiler unpack twice). The bf16 max
// is exact and, like the reference's amax_of, lets a NaN lose to any number (maxNum); a half that
// is NaN on both sides stays NaN and loses to the other half or to 0 in the last fmaxf.
__device__ __forceinline__ uint32_t bf16x2_max(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("max.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

template <bool PACKED> __device__ __forceinline__ float pair_amax(const uint4 &h, const float (&v)[8]) {
  if (PACKED) {
    const uint32_t m = 0x7FFF7FFFu;
    uint32_t x = bf16x2_max(bf16x2_max(h.x & m, h.y & m), bf16x2_max(h.z & m, h.w & m));
    x = bf16x2_max(x, __shfl_xor_sync(FULL, x, 1));
    return fmaxf(fmaxf(float_of(x << 16), float_of(x & 0xFFFF0000u)), 0.0f);
  }
  float amax = 0.0f;
#pragma unroll
  for (int k = 0; k < 8; k++) amax = amax_step(amax, v[k]);
  return fmaxf(amax, __shfl_xor_sync(FULL, amax, 1)); // neither is NaN: the order does not matter
}

// e4m3(gs * (amax / 6)) and the e2m1 scale 1 / (sf / gs) (moe.md section 4); amax is a bf16 value,
// so div6_bf16 is the IEEE division, and __frcp_rn is the IEEE 1 / x.
__device__ __forceinline__ uint8_t block_scale(float amax, const Expert &ex, float &scale) {
  float sf;
  const uint8_t code = f32_to_e4m3_value(mul_rn(ex.gs, div6_bf16(amax)), &sf);
  scale = sf != 0.0f ? __frcp_rn(mul_rn(sf, ex.inv_gs)) : 0.0f;
  return code;
}

// Packs and stores the 8 codes of item `it`: e2m1(|v| * scale) with v's own sign, which is the
// reference's e2m1(v * scale) for every v, NaN included, since scale is +0 or positive
// (scale_value in numerics.cuh says why a NaN's sign needs care).
__device__ __forceinline__ void store_codes(const Args &a, Pos p, const uint4 &h, const float (&v)[8], float scale) {
  float x[8];
#pragma unroll
  for (int k = 0; k < 8; k++) x[k] = mul_rn(v[k], scale);
  const uint32_t packed = bf16x8_sign_nibbles(h.x, h.y, h.z, h.w) | e2m1x8_magnitudes(x);
  __stcs((unsigned int *)a.out + ((int64_t)p.r * a.ipr + p.j), packed);
}

// Stores the scale of block (r, c = j / 2) and, after the row's last block, zeros its padding
// columns (the rest of the same 4-byte word).
__device__ __forceinline__ void store_scale(const Args &a, const Expert &ex, Pos p, uint8_t code) {
  const uint32_t c = (uint32_t)p.j >> 1, cols16 = (uint32_t)(a.cols >> 4);
  uint8_t *s = a.sf + scale_byte(ex.base, a.ktiles, (uint32_t)(p.r - ex.row0), c);
  s[0] = code;
  if (c == cols16 - 1)
    for (uint32_t q = 1; q <= 3 - (c & 3); q++) s[q] = 0;
}

// One item per lane (the silu op, the plain kernel): both lanes of a pair compute the block scale;
// the even one stores it. Every lane of the warp calls it; only valid ones write.
template <bool SILU, bool PACKED = false>
__device__ __forceinline__ void quant_item(const Args &a, bool valid, Pos p, const Raw<SILU> &raw, const Expert &ex) {
  float v[8];
  const uint4 h = item_values<SILU>(raw, v);
  const float amax = pair_amax<PACKED>(h, v);
  if (!valid) return;
  float scale;
  const uint8_t code = block_scale(amax, ex, scale);
  store_codes(a, p, h, v, scale);
  if (!(p.j & 1)) store_scale(a, ex, p, code);
}

// Two items per lane (streams 0 and 1): the pair holds two blocks, the even lane computes block 0's
// scale and the odd lane block 1's, and they swap them with one shuffle. Every lane calls it.
template <bool PACKED>
__device__ __forceinline__ void quant_two(const Args &a, const bool (&valid)[2], const Pos (&p)[2],
                                          const Raw<false> (&raw)[2], const Expert (&ex)[2]) {
  float v0[8], v1[8];
  const uint4 h0 = item_values<false>(raw[0], v0), h1 = item_values<false>(raw[1], v1);
  const float amax0 = pair_amax<PACKED>(h0, v0), amax1 = pair_amax<PACKED>(h1, v1);
  const bool odd = threadIdx.x & 1;
  const Expert mine = {odd ? ex[1].row0 : ex[0].row0, 0, odd ? ex[1].base : ex[0].base, odd ? ex[1].gs : ex[0].gs,
                       odd ? ex[1].inv_gs : ex[0].inv_gs}; // field by field: no local-memory copy
  float scale;
  const uint8_t code = block_scale(odd ? amax1 : amax0, mine, scale);
  const float other = __shfl_xor_sync(FULL, scale, 1);
  if (valid[0]) store_codes(a, p[0], h0, v0, odd ? other : scale);
  if (valid[1]) store_codes(a, p[1], h1, v1, odd ? scale : other);
  if (odd ? valid[1] : valid[0]) store_scale(a, mine, {odd ? p[1].r : p[0].r, odd ? p[1].j : p[0].j}, code);
}

// ---- zeroing: padding rows of each expert's last 128-row tile, then the unused tail ----

// Unit u < E * ktiles * 32: one 16-byte line (rows l, l+32, l+64, l+96 of 4 scale columns) of
// expert u / (ktiles * 32)'s last row tile, zeroed where its rows are padding. Then 16-byte units of
// [tail, sf_bytes), and up to 3 words at its end. `tail` is the first scale row after every
// expert's tiles (times the row bytes). Units are below 2^31 (check_dims): 32-bit division, which
// is a few instructions where the 64-bit one is a long software routine (the 8 x 7168 case's
// latency).
// TILES = false (the sector kernel, which writes the tiles' padding itself): the tail only.
template <bool TILES = true, class L>
__device__ __forceinline__ void zero_unit(const Args &a, const L &lk, bool ok, uint32_t u, uint32_t units) {
  const bool valid = u < units;
  uint32_t np = 0; // units of the experts' last tiles
  if constexpr (TILES) {
    const uint32_t per_e = (uint32_t)a.ktiles * 32;
    np = ok ? (uint32_t)a.E * per_e : 0;
    int e = valid && u < np ? (int)(u / per_e) : 0, rows, first;
    lk.rows_of(e, rows, first); // every lane (REG: shuffles)
    if (valid && u < np) {
      const int rem = rows & 127;
      if (rem == 0) return;
      const uint32_t rest = u - (uint32_t)e * per_e;
      const int kt = (int)(rest >> 5), line = (int)(rest & 31);
      uint8_t *p = a.sf + ((int64_t)(first + round128(rows) - 128) * a.ktiles * 4 + (int64_t)kt * 512 + line * 16);
      if (line >= rem) {
        *(uint4 *)p = make_uint4(0, 0, 0, 0);
      } else {
#pragma unroll
        for (int g = 1; g < 4; g++)
          if (line + 32 * g >= rem) *(uint32_t *)(p + 4 * g) = 0;
      }
      return;
    }
  }
  if (!valid) return;
  const int64_t tail = ok ? (int64_t)lk.total * a.ktiles * 4 : 0, n16 = (a.sf_bytes - tail) >> 4;
  const int64_t t = u - np;
  if (t < n16) *(uint4 *)(a.sf + tail + t * 16) = make_uint4(0, 0, 0, 0);
  else *(uint32_t *)(a.sf + tail + n16 * 16 + (t - n16) * 4) = 0;
}

// Units for zero_unit: E * ktiles * 32 lines, then the tail in 16-byte pieces and up to 3 words.
// The tail is at most the whole buffer (invalid offsets): counting it whole is an upper bound.
__host__ __device__ int64_t zero_units(int E, int ktiles, int64_t sf_bytes) {
  return (int64_t)E * ktiles * 32 + (sf_bytes >> 4) + 3;
}

__device__ __forceinline__ int64_t tail_units(const Args &a, bool ok, int total, bool tiles = true) {
  const int64_t tail = ok ? (int64_t)total * a.ktiles * 4 : 0;
  return (ok && tiles ? (int64_t)a.E * a.ktiles * 32 : 0) + ((a.sf_bytes - tail) >> 4) + (((a.sf_bytes - tail) & 15) >> 2);
}

// ---- the kernels' common prologue: the expert offsets checked, the scale bases built ----

// Every thread of the block calls it; returns whether the offsets are valid, *total = the scale rows
// of all experts' tiles. Raises the flag for invalid offsets (block 0; the planning kernel for GLOBAL).
template <int LOOKUP>
__device__ __forceinline__ bool setup_lookup(const Args &a, int *smem, RegLookup &reg, TableLookup &tab, int &total) {
  bool ok;
  if (LOOKUP == REG) {
    reg.setup(a);
    ok = reg.ok, total = reg.total;
  } else {
    if (LOOKUP == SMEM) {
      int *s_off = smem, *s_base = smem + a.E + 1;
      for (int e = threadIdx.x; e <= a.E; e += blockDim.x) s_off[e] = a.off[e];
      __syncthreads();
      ok = plan_block(s_off, a.E, a.M, s_base);
      __syncthreads(); // s_base complete
      tab.off = s_off, tab.base = s_base;
    } else {
      ok = *a.ws_ok != 0;
      tab.off = a.off, tab.base = a.ws_base;
    }
    tab.gscale = a.gscale, tab.E = a.E;
    total = ok ? tab.base[a.E] : 0;
    tab.total = total;
  }
  if (LOOKUP != GLOBAL && !ok && blockIdx.x == 0 && threadIdx.x == 0 && a.error_flags)
    atomicOr(a.error_flags, MOEFFI_ERROR_EXPERT_OFFSETS);
  return ok;
}

// ---- the fast kernel ----

template <int LOOKUP, bool SILU, bool PACKED> static __global__ void __launch_bounds__(THREADS, 4) nvfp4_kernel(const Args a) {
  constexpr int U = items_per_trip<SILU>();
  extern __shared__ int smem[];
  const int lane = threadIdx.x & 31;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t warp_first = (int64_t)blockIdx.x * blockDim.x + (threadIdx.x & ~31);
  // This lane's items: row and group of item warp_first + lane + t * stride at trip t / U, stream
  // t % U, advanced by stride without dividing. A position is valid while its row is below M.
  // 32-bit divisions where the item count allows (always but for the largest problems).
  int stride_r, stride_j;
  Pos at;
  if (a.items + stride <= (int64_t)UINT32_MAX) {
    const uint32_t ipr = (uint32_t)a.ipr, i0 = (uint32_t)(warp_first + lane);
    stride_r = (int)((uint32_t)stride / ipr), stride_j = (int)((uint32_t)stride % ipr);
    at = {(int)(i0 / ipr), (int)(i0 % ipr)};
  } else {
    stride_r = (int)(stride / a.ipr), stride_j = (int)(stride % a.ipr);
    at = {(int)((warp_first + lane) / a.ipr), (int)((warp_first + lane) % a.ipr)};
  }
  auto advance = [&](Pos &q) {
    q.r += stride_r, q.j += stride_j;
    if (q.j >= a.ipr) q.j -= a.ipr, q.r++;
  };
  // The first trip's loads go out before the offsets are read, so their latencies overlap.
  Pos pos[U];
  Raw<SILU> raw[U];
#pragma unroll
  for (int s = 0; s < U; s++) {
    pos[s] = at;
    if (at.r < a.rows) raw[s] = load_item<SILU>(a, at.r, at.j);
    advance(at);
  }

  RegLookup reg;
  TableLookup tab;
  int total;
  const bool ok = setup_lookup<LOOKUP>(a, smem, reg, tab, total);

  if (ok) {
    Expert ex[U];
    int ei[U];
#pragma unroll
    for (int s = 0; s < U; s++) ex[s] = NO_EXPERT, ei[s] = 0;
    for (int64_t w = warp_first; w < a.items; w += U * stride) {
      Raw<SILU> next[U];
      Pos npos[U];
#pragma unroll
      for (int s = 0; s < U; s++) { // the next trip's loads
        npos[s] = at;
        if (at.r < a.rows) next[s] = load_item<SILU>(a, at.r, at.j);
        advance(at);
      }
      bool valid[U];
#pragma unroll
      for (int s = 0; s < U; s++) {
        valid[s] = pos[s].r < a.rows;
        if (LOOKUP == REG) reg.update(ex[s], valid[s], pos[s].r);
        else tab.update(ex[s], ei[s], valid[s], pos[s].r);
      }
      if constexpr (U == 2) quant_two<PACKED>(a, valid, pos, raw, ex);
      else quant_item<SILU, PACKED>(a, valid[0], pos[0], raw[0], ex[0]);
#pragma unroll
      for (int s = 0; s < U; s++) raw[s] = next[s], pos[s] = npos[s];
    }
  }

  // Padding and tail of the scale buffer (all of it when the offsets are invalid).
  const uint32_t units = (uint32_t)tail_units(a, ok, total);
  for (int64_t w = warp_first; w < units; w += stride) {
    if (LOOKUP == REG) zero_unit(a, reg, ok, (uint32_t)(w + lane), units);
    else zero_unit(a, tab, ok, (uint32_t)(w + lane), units);
  }
}

// ---- the flat kernel: one whole 16-element scale block per thread and stream ----
//
// The grid-stride loop runs over scale blocks b = r * nblk + c (nblk = cols / 16) in 32 bits: a thread
// loads the block's 32 contiguous bytes (the silu op: 32 of the gate, 32 of the up half), computes its
// amax, scale and 16 codes with no shuffle, and stores 8 bytes of codes at out + 8 b and the scale byte.
// Its (r, c) advance by the stride without dividing; the input and output addresses follow b.

template <bool SILU> struct Blk {
  uint4 v[SILU ? 4 : 2]; // quant: the 16 bf16; silu: gate (v[0], v[1]) then up (v[2], v[3])
};

struct At {
  int r;       // row
  uint32_t c;  // scale column (16-element block) in the row
  uint32_t b;  // r * nblk + c
};

template <bool SILU> __device__ __forceinline__ void load_block(const Args &a, const At &p, Blk<SILU> &k) {
  if (SILU) {
    const uint4 *g = (const uint4 *)a.x + ((int64_t)p.r * (2 * a.ipr) + 2 * p.c);
    k.v[0] = __ldcs(g), k.v[1] = __ldcs(g + 1);
    k.v[SILU ? 2 : 0] = __ldcs(g + a.ipr), k.v[SILU ? 3 : 1] = __ldcs(g + a.ipr + 1);
  } else {
    const uint4 *g = (const uint4 *)a.x + 2 * (uint64_t)p.b;
    k.v[0] = __ldcs(g), k.v[1] = __ldcs(g + 1);
  }
}

// The 8 codes of 8 bf16 (one 16-byte word) at scale `scale`, packed a nibble each. MIN3: the e2m1
// magnitudes by e2m1x8_codes (min of three rounded pieces), else by e2m1x8_magnitudes.
template <bool MIN3> __device__ __forceinline__ uint32_t codes8(const uint4 &h, float scale) {
  float v[8], x[8];
  bf16x8_values(h, v);
#pragma unroll
  for (int k = 0; k < 8; k++) x[k] = mul_rn(v[k], scale);
  return bf16x8_sign_nibbles(h.x, h.y, h.z, h.w) | (MIN3 ? e2m1x8_codes(x) : e2m1x8_magnitudes(x));
}

// max(|a|, |b|) per bf16 half, up to the sign bits: max.xorsign.abs (sm_86+) takes the magnitudes
// itself (the sign it returns is the xor of the inputs', cleared by the caller); a NaN loses to a
// number as in max.bf16x2 (maxNum), and two NaN give NaN.
__device__ __forceinline__ uint32_t bf16x2_absmax(uint32_t a, uint32_t b) {
  uint32_t d;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 860
  asm("max.xorsign.abs.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
#else
  asm("max.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a & 0x7FFF7FFFu), "r"(b & 0x7FFF7FFFu));
#endif
  return d;
}

// The block's 16 values to encode (x, or h = silu(gate) * up) in h, its e2m1 scale, and its e4m3 code.
template <bool SILU, bool MIN3>
__device__ __forceinline__ uint8_t scale_block(const Blk<SILU> &k, const Expert &ex, uint4 (&h)[2], float &scale) {
  if (SILU) {
    float v[8];
#pragma unroll
    for (int q = 0; q < 2; q++) h[q] = item_values<true>(Raw<true>{{k.v[q], k.v[SILU ? q + 2 : 0]}}, v);
  } else {
    h[0] = k.v[0], h[1] = k.v[1];
  }
  float amax;
  if (MIN3) { // the magnitudes by max.xorsign.abs; the halves' signs cleared by fabsf (a NaN half loses)
    const uint32_t x = bf16x2_absmax(bf16x2_absmax(bf16x2_absmax(h[0].x, h[0].y), bf16x2_absmax(h[0].z, h[0].w)),
                                     bf16x2_absmax(bf16x2_absmax(h[1].x, h[1].y), bf16x2_absmax(h[1].z, h[1].w)));
    amax = fmaxf(fmaxf(fabsf(float_of(x << 16)), fabsf(float_of(x & 0xFFFF0000u))), 0.0f);
  } else {
    const uint32_t m = 0x7FFF7FFFu;
    const uint32_t x = bf16x2_max(bf16x2_max(bf16x2_max(h[0].x & m, h[0].y & m), bf16x2_max(h[0].z & m, h[0].w & m)),
                                  bf16x2_max(bf16x2_max(h[1].x & m, h[1].y & m), bf16x2_max(h[1].z & m, h[1].w & m)));
    amax = fmaxf(fmaxf(float_of(x << 16), float_of(x & 0xFFFF0000u)), 0.0f);
  }
  return block_scale(amax, ex, scale);
}

template <bool SILU, bool MIN3, int MODE>
__device__ __forceinline__ void quant_block(const Args &a, const At &p, const Blk<SILU> &k, const Expert &ex) {
  uint4 h[2];
  float scale;
  const uint8_t code = scale_block<SILU, MIN3>(k, ex, h, scale);
  if (MODE == MODE_READ_ONLY) { // never true (amax is a number): keeps the loads and the scale live
    if (code == 0xFFu && scale == 1.0f) a.out[p.b] = code;
    return;
  }
  __stcs((uint2 *)a.out + p.b, make_uint2(codes8<MIN3>(h[0], scale), codes8<MIN3>(h[1], scale)));
  if (MODE == MODE_FULL) store_scale(a, ex, {p.r, (int)(2 * p.c)}, code);
}

// U blocks per thread per trip; PREFETCH: the next trip's loads go out before this trip's work.
template <int LOOKUP, bool SILU, int U, bool PREFETCH, int MINB, bool MIN3, int MODE>
static __global__ void __launch_bounds__(THREADS, MINB) nvfp4_flat_kernel(const Args a) {
  extern __shared__ int smem[];
  const int lane = threadIdx.x & 31;
  const uint32_t nblk = (uint32_t)a.ipr >> 1, stride = gridDim.x * blockDim.x;
  const uint32_t first = blockIdx.x * blockDim.x + threadIdx.x;
  const int stride_r = (int)(stride / nblk);
  const uint32_t stride_c = stride % nblk;
  At at = {(int)(first / nblk), first % nblk, first};
  auto advance = [&](At &q) {
    q.b += stride, q.r += stride_r, q.c += stride_c;
    if (q.c >= nblk) q.c -= nblk, q.r++;
  };
  At pos[U];
  Blk<SILU> cur[U];
  if (PREFETCH) { // the first trip's loads go out before the offsets are read
#pragma unroll
    for (int s = 0; s < U; s++) {
      pos[s] = at;
      if (at.r < a.rows) load_block<SILU>(a, at, cur[s]);
      advance(at);
    }
  }

  RegLookup reg;
  TableLookup tab;
  int total;
  const bool ok = setup_lookup<LOOKUP>(a, smem, reg, tab, total);

  if (ok) {
    Expert ex[U];
    int ei[U];
#pragma unroll
    for (int s = 0; s < U; s++) ex[s] = NO_EXPERT, ei[s] = 0;
    // warp-uniform trips (the register lookup's shuffles need the whole warp): w = stream 0's block of
    // the warp's lane 0; the host keeps nb + (U + 1) * stride below 2^32
    const uint32_t nb = (uint32_t)(a.items >> 1);
    for (uint32_t w = first - lane; w < nb; w += U * stride) {
      if (!PREFETCH) {
#pragma unroll
        for (int s = 0; s < U; s++) {
          pos[s] = at;
          if (at.r < a.rows) load_block<SILU>(a, at, cur[s]);
          advance(at);
        }
      }
      Blk<SILU> next[U];
      At npos[U];
      if (PREFETCH) {
#pragma unroll
        for (int s = 0; s < U; s++) {
          npos[s] = at;
          if (at.r < a.rows) load_block<SILU>(a, at, next[s]);
          advance(at);
        }
      }
#pragma unroll
      for (int s = 0; s < U; s++) {
        const bool valid = pos[s].r < a.rows;
        if (LOOKUP == REG) reg.update(ex[s], valid, pos[s].r);
        else tab.update(ex[s], ei[s], valid, pos[s].r);
        if (valid) quant_block<SILU, MIN3, MODE>(a, pos[s], cur[s], ex[s]);
      }
      if (PREFETCH) {
#pragma unroll
        for (int s = 0; s < U; s++) cur[s] = next[s], pos[s] = npos[s];
      }
    }
  }

  // Padding and tail of the scale buffer (all of it when the offsets are invalid). The units start
  // at the warp after the last block's (mod stride), so where the grid covers blocks and units in
  // one pass (small problems) no thread does both: unit u goes to the warp nbw + u (mod stride).
  const uint32_t units = (uint32_t)tail_units(a, ok, total), nbw = (((uint32_t)(a.items >> 1) + 31u) & ~31u) % stride;
  const uint32_t warp_first = first - lane, z0 = warp_first >= nbw ? warp_first - nbw : warp_first + stride - nbw;
  for (uint32_t w = z0; MODE != MODE_READ_ONLY && w < units; w += stride) {
    if (LOOKUP == REG) zero_unit(a, reg, ok, w + lane, units);
    else zero_unit(a, tab, ok, w + lane, units);
  }
}

// ---- the sector kernel: a warp per 8 rows x 32 blocks, whole scale sectors ----
//
// The swizzled scales of a 128-row tile and a column quad (4 blocks of 16) are 512 bytes; sector i
// (bytes 32 i ..) holds tile rows 2 i + 32 g (g = 0..3, bytes 4 g ..) and 2 i + 1 + 32 g (bytes
// 16 + 4 g ..), 4 blocks each (nvfp4_scale_offset). The flat kernel's warp writes 4 bytes into each of
// 8 sectors, the other 28 coming from 7 other warps, and that scattered pattern costs it about a
// quarter of its time (the same kernel storing its scale bytes linearly runs at 0.93 of copy against
// 0.68, NOTES.md). Here unit u = (tile t, sector i, 32-block column group) belongs to one warp, which
// quantizes those 8 rows in 8 trips, lane l taking block 32 group + l of a row (1 KiB of contiguous
// loads per trip, as in the flat kernel), keeps the 8 scale bytes, transposes them within each quad
// of lanes, and writes 8 whole sectors with two 4-byte stores per lane. Units run over the experts'
// tiles, so rows are warp-uniform: a padding row is a skipped trip whose scale bytes are zeros, and
// only the tail after the last tile is left to the zeroing loop. The next trip's loads go out before
// this trip's work, and the next unit's expert is looked up a unit ahead.
template <int LOOKUP, bool SILU, int MINB, int MODE = MODE_FULL>
static __global__ void __launch_bounds__(THREADS, MINB) nvfp4_sector_kernel(const Args a) {
  extern __shared__ int smem[];
  const int lane = threadIdx.x & 31;
  RegLookup reg;
  TableLookup tab;
  int total;
  const bool ok = setup_lookup<LOOKUP>(a, smem, reg, tab, total);
  const uint32_t nblk = (uint32_t)a.ipr >> 1, ng = (nblk + 31) / 32, stride = gridDim.x * (blockDim.x >> 5);
  const uint32_t first = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (ok) {
    const uint32_t units = (uint32_t)(total >> 3) * ng; // tiles x 16 sectors x column groups (< 2^31)
    Expert ex = NO_EXPERT; // the lookup's state: units only grow
    int ei = 0;
    auto find = [&](uint32_t u) { // the expert of unit u's tile
      if (LOOKUP == REG) reg.tile_update(ex, (int)(u / ng >> 4) << 7);
      else tab.tile_update(ex, ei, (int)(u / ng >> 4) << 7);
      return ex;
    };
    // trip j of unit u: tile row 2 i + 32 (j % 4) + j / 4 (scale bytes 4 (j % 4) + 16 (j / 4) of the
    // sectors); its input row, or -1 for padding
    auto row_of = [&](uint32_t u, const Expert &e, int j) {
      const uint32_t ti = u / ng;
      const int r = e.row0 + ((int)(ti >> 4) << 7) - e.base + 2 * (int)(ti & 15) + 32 * (j & 3) + (j >> 2);
      return r < e.end ? r : -1;
    };
    uint32_t u = first;
    int j = 0, r = -1;
    Expert e = NO_EXPERT, e_after = NO_EXPERT; // of unit u, and of unit u + stride
    Blk<SILU> cur;
    if (u < units) e = find(u), r = row_of(u, e, 0);
    if (u + stride < units) e_after = find(u + stride);
    uint32_t c = (u % ng) * 32 + lane;
    if (r >= 0 && c < nblk) load_block<SILU>(a, {r, c, (uint32_t)r * nblk + c}, cur);
    uint32_t lo = 0, hi = 0; // this lane's scale bytes of trips 0-3 and 4-7
    while (u < units) { // warp-uniform trips
      uint32_t nu = u;
      int nj = j + 1;
      Expert ne = e;
      if (nj == 8) nj = 0, nu = u + stride, ne = e_after;
      int nr = -1;
      const uint32_t nc = (nu % ng) * 32 + lane;
      Blk<SILU> next;
      if (nu < units) {
        nr = row_of(nu, ne, nj);
        if (nr >= 0 && nc < nblk) load_block<SILU>(a, {nr, nc, (uint32_t)nr * nblk + nc}, next);
      }
      uint32_t code = 0; // padding rows and columns: zero scale
      if (r >= 0 && c < nblk) {
        uint4 h[2];
        float scale;
        code = scale_block<SILU, true>(cur, e, h, scale);
        __stcs((uint2 *)a.out + ((uint32_t)r * nblk + c), make_uint2(codes8<true>(h[0], scale), codes8<true>(h[1], scale)));
      }
      if (j < 4) lo |= code << (8 * j);
      else hi |= code << (8 * (j - 4));
      if (j == 7) {
        // lane 4 q + k gets row k's (and row 4 + k's) bytes of the quad's 4 columns: byte k of each lane
        const int q0 = lane & ~3, k = lane & 3;
        const uint32_t sel = (uint32_t)k | (uint32_t)(k + 4) << 4;
        const uint32_t lo01 = __byte_perm(__shfl_sync(FULL, lo, q0), __shfl_sync(FULL, lo, q0 + 1), sel);
        const uint32_t lo23 = __byte_perm(__shfl_sync(FULL, lo, q0 + 2), __shfl_sync(FULL, lo, q0 + 3), sel);
        const uint32_t hi01 = __byte_perm(__shfl_sync(FULL, hi, q0), __shfl_sync(FULL, hi, q0 + 1), sel);
        const uint32_t hi23 = __byte_perm(__shfl_sync(FULL, hi, q0 + 2), __shfl_sync(FULL, hi, q0 + 3), sel);
        const uint32_t quad = c >> 2, ti = u / ng;
        if (MODE == MODE_FULL && quad < (uint32_t)a.ktiles) { // quads past the row's last do not exist
          uint8_t *sector = a.sf + ((int64_t)(ti >> 4) * a.ktiles + quad) * 512 + 32 * (ti & 15);
          *(uint32_t *)(sector + 4 * k) = __byte_perm(lo01, lo23, 0x5410);
          *(uint32_t *)(sector + 16 + 4 * k) = __byte_perm(hi01, hi23, 0x5410);
        } else if (MODE != MODE_FULL && (lo01 ^ hi23) == 0xFFFFFFFFu) {
          a.out[0] = 0; // never (timing only): keeps the scale bytes live
        }
        lo = hi = 0;
        if (nu < units && nu + stride < units) e_after = find(nu + stride); // a unit ahead
      }
      u = nu, j = nj, e = ne, r = nr, c = nc, cur = next;
    }
  }
  // the tail after the experts' tiles (all of the buffer when the offsets are invalid)
  const uint32_t units = (uint32_t)tail_units(a, ok, total, false), tstride = gridDim.x * blockDim.x;
  for (uint32_t w = blockIdx.x * blockDim.x + threadIdx.x; w < units; w += tstride) {
    if (LOOKUP == REG) zero_unit<false>(a, reg, ok, w, units);
    else zero_unit<false>(a, tab, ok, w, units);
  }
}

static __global__ void nvfp4_noop_kernel(const Args a) { (void)a; }

// One block: checks the offsets into *ws_ok (raising the flag when bad) and writes ws_base[0..E].
static __global__ void __launch_bounds__(PLAN_THREADS) nvfp4_plan_kernel(const Args a) {
  const bool ok = plan_block(a.off, a.E, a.M, a.ws_base);
  if (threadIdx.x == 0) {
    *a.ws_ok = ok;
    if (!ok && a.error_flags) atomicOr(a.error_flags, MOEFFI_ERROR_EXPERT_OFFSETS);
  }
}

// ---- the plain variant (benchmark baseline): one row per block, after a memset and a plan ----

template <bool SILU> static __global__ void __launch_bounds__(1024) nvfp4_plain_kernel(const Args a) {
  if (!*a.ws_ok) return;
  const int r = blockIdx.x;
  for (int j0 = 0; j0 < a.ipr; j0 += blockDim.x) {
    const Pos p = {r, j0 + (int)threadIdx.x};
    const bool valid = p.j < a.ipr;
    Raw<SILU> raw = {};
    Expert ex = NO_EXPERT;
    if (valid) {
      raw = load_item<SILU>(a, p.r, p.j);
      const int e = search(a.off, 0, a.E, r);
      ex = {a.off[e], a.off[e + 1], a.ws_base[e], a.gscale[e], div_rn(1.0f, a.gscale[e])};
    }
    quant_item<SILU>(a, valid, p, raw, ex);
  }
}

// ---- host side ----

constexpr int MAX_DEVICES = 64;
struct DeviceInfo {
  int sms; // 0 = not queried yet
  int major, minor;
  char name[256];
};
DeviceInfo devices[MAX_DEVICES]; // queried once per device: the core asks supported() before every run

const DeviceInfo *device_info(int device) {
  if (device < 0 || device >= MAX_DEVICES) return nullptr;
  DeviceInfo &d = devices[device];
  if (d.sms == 0) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) return nullptr;
    memcpy(d.name, prop.name, sizeof d.name);
    d.name[sizeof d.name - 1] = 0;
    d.major = prop.major, d.minor = prop.minor;
    d.sms = prop.multiProcessorCount > 0 ? prop.multiProcessorCount : 1;
  }
  return &d;
}

int sm_count(int device) {
  const DeviceInfo *d = device_info(device);
  return d ? d->sms : 1;
}

int64_t cols_of(const moeffi_problem *p) { return p->op == MOEFFI_OP_NVFP4_SILU_QUANT ? p->n : p->k; }
int64_t scale_bytes(int64_t M, int64_t E, int64_t cols) { return (M + 127 * E) * ceil_div(cols, 64) * 4; }

int lookup_of(int64_t E, int variant) {
  if (variant == FORCE_GLOBAL || E > SMEM_MAX_E) return GLOBAL;
  if (variant == FORCE_SMEM || E > REG_MAX_E) return SMEM;
  return REG;
}

// Workspace: the offsets-valid word and ws_base [E + 1] (GLOBAL lookup and the plain variant only).
uint64_t workspace_bytes(int64_t E, int lookup) { return lookup == GLOBAL ? 16 + 4 * (uint64_t)(E + 1) : 0; }

int32_t check_problem(const moeffi_problem *p, char *msg, uint32_t cap) {
  if (!p) FAIL(MOEFFI_INVALID, "problem is NULL");
  if (p->size < sizeof(moeffi_problem)) FAIL(MOEFFI_INVALID, "problem struct too small");
  const int32_t device = moeffi_check_cuda_device(p, "nvfp4", 8, 99, "sm_80+", msg, cap);
  if (device != MOEFFI_OK) return device;
  if (p->op >= MOEFFI_OP_COUNT) FAIL(MOEFFI_UNSUPPORTED, "unknown op %u", p->op);
  if (!is_nvfp4(p->op)) FAIL(MOEFFI_UNSUPPORTED, "the nvfp4 backend implements nvfp4_experts_quant and nvfp4_silu_quant only");
  return MOEFFI_OK;
}

// The core validates shapes; these checks keep the kernels' index arithmetic in range.
int32_t check_dims(const moeffi_problem *p, char *msg, uint32_t cap) {
  const int64_t d[] = {p->m, p->n, p->k, p->experts};
  const char *names[] = {"m", "n", "k", "experts"};
  for (int i = 0; i < 4; i++)
    if (d[i] < 0 || d[i] > INT32_MAX) FAIL(MOEFFI_INVALID, "%s = %lld is out of range", names[i], (long long)d[i]);
  const int64_t cols = cols_of(p), E = p->experts;
  const char *name = p->op == MOEFFI_OP_NVFP4_SILU_QUANT ? "n" : "k";
  if (cols == 0 || E == 0) FAIL(MOEFFI_INVALID, "a dimension of op %u is zero", p->op);
  if (cols % 16) FAIL(MOEFFI_INVALID, "%s = %lld is not a multiple of 16", name, (long long)cols);
  if (p->m + 127 * E > MAX_ROWS)
    FAIL(MOEFFI_UNSUPPORTED, "m + 127 * experts is above 2^30 (rows are int32 on this backend, with room for the grid stride)");
  if (zero_units((int)E, (int)ceil_div(cols, 64), scale_bytes(p->m, E, cols)) > MAX_UNITS)
    FAIL(MOEFFI_UNSUPPORTED, "the scale buffer is too large for this backend (more than 2^31 zeroing units)");
  return MOEFFI_OK;
}

int32_t check_all(const moeffi_problem *p, char *msg, uint32_t cap) {
  const int32_t st = check_problem(p, msg, cap);
  return st ? st : check_dims(p, msg, cap);
}

// Launch size: `work` thread-trips in blocks of THREADS, halved down to MIN_THREADS while that
// leaves SMs idle, and at most what is resident at once (the grid-stride loop covers the rest).
void launch_shape(const void *kernel, int64_t work, int device, size_t smem, int *grid, int *threads) {
  const int sms = sm_count(device);
  int t = THREADS;
  while (t > MIN_THREADS && ceil_div(work, t) < sms) t /= 2;
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, t, smem) != cudaSuccess || per_sm < 1) per_sm = 1;
  *threads = t;
  *grid = (int)std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, t), (int64_t)sms * per_sm));
}

// moeffi_run's amax: on the packed bf16 words for the quant op (3.5% faster at 65536 x 7168), on the
// unpacked floats for the silu op (there the packed form measured 1.2% slower: its h words come out
// of the SiLU already unpacked). Variant FLOAT_AMAX swaps the two forms.
template <bool SILU> constexpr bool packed_amax() { return !SILU; }

template <int LOOKUP, bool SILU, bool PACKED> cudaError_t launch_fast(const Args &a, int device, cudaStream_t s) {
  const auto kernel = nvfp4_kernel<LOOKUP, SILU, PACKED>;
  const size_t smem = LOOKUP == SMEM ? (size_t)(2 * a.E + 2) * sizeof(int) : 0;
  // each thread-trip handles U items; zeroing units count as a quarter of an item each
  const int64_t work = std::max(ceil_div(a.items, items_per_trip<SILU>()), zero_units(a.E, a.ktiles, a.sf_bytes) / 4);
  int grid, threads;
  launch_shape((const void *)kernel, work, device, smem, &grid, &threads);
  if (LOOKUP == GLOBAL) nvfp4_plan_kernel<<<1, PLAN_THREADS, 0, s>>>(a);
  kernel<<<grid, threads, smem, s>>>(a);
  return cudaGetLastError();
}

template <bool SILU, bool PACKED> cudaError_t launch_packed(const Args &a, int lookup, int device, cudaStream_t s) {
  switch (lookup) {
  case REG: return launch_fast<REG, SILU, PACKED>(a, device, s);
  case SMEM: return launch_fast<SMEM, SILU, PACKED>(a, device, s);
  default: return launch_fast<GLOBAL, SILU, PACKED>(a, device, s);
  }
}

// The flat kernel (one scale block per thread and stream): one thread per block and per zeroing unit
// up to what is resident at once.
template <int LOOKUP, bool SILU, int U, bool PF, int MINB, bool MIN3, int MODE>
cudaError_t launch_flat(const Args &a, int device, cudaStream_t s) {
  const auto kernel = nvfp4_flat_kernel<LOOKUP, SILU, U, PF, MINB, MIN3, MODE>;
  const size_t smem = LOOKUP == SMEM ? (size_t)(2 * a.E + 2) * sizeof(int) : 0;
  const int64_t work = ceil_div(ceil_div(a.items / 2, U), 32) * 32 + zero_units(a.E, a.ktiles, a.sf_bytes);
  int grid, threads;
  launch_shape((const void *)kernel, work, device, smem, &grid, &threads);
  if (LOOKUP == GLOBAL) nvfp4_plan_kernel<<<1, PLAN_THREADS, 0, s>>>(a);
  kernel<<<grid, threads, smem, s>>>(a);
  return cudaGetLastError();
}

template <bool SILU, int U, bool PF, int MINB, bool MIN3 = true, int MODE = MODE_FULL>
cudaError_t launch_flat_lookup(const Args &a, int lookup, int device, cudaStream_t s) {
  switch (lookup) {
  case REG: return launch_flat<REG, SILU, U, PF, MINB, MIN3, MODE>(a, device, s);
  case SMEM: return launch_flat<SMEM, SILU, U, PF, MINB, MIN3, MODE>(a, device, s);
  default: return launch_flat<GLOBAL, SILU, U, PF, MINB, MIN3, MODE>(a, device, s);
  }
}

// Whether the flat kernel's 32-bit block indices hold: nb + (U + 1) * stride < 2^32 with the largest
// grid (a generous bound: 2^24 threads), and 8-byte code stores.
bool flat_fits(const Args &a) { return a.items / 2 + 3 * ((int64_t)1 << 24) < ((int64_t)1 << 32) && (uintptr_t)a.out % 8 == 0; }

// The sector kernel: a warp per unit (8 rows x 32 blocks of the experts' tiles, at most M / 128 + E
// of them) up to what is resident at once.
template <int LOOKUP, bool SILU, int MODE = MODE_FULL>
cudaError_t launch_sector(const Args &a, int device, cudaStream_t s) {
  // 64 registers (quant) and 128 (silu): the unit state spills at the flat kernel's 48 and 80
  constexpr int MINB = SILU ? 2 : 4;
  const auto kernel = nvfp4_sector_kernel<LOOKUP, SILU, MINB, MODE>;
  const size_t smem = LOOKUP == SMEM ? (size_t)(2 * a.E + 2) * sizeof(int) : 0;
  const int64_t work = (ceil_div(a.M, 128) + a.E) * 16 * ceil_div(a.ipr / 2, 32) * 32;
  int grid, threads;
  launch_shape((const void *)kernel, work, device, smem, &grid, &threads);
  if (LOOKUP == GLOBAL) nvfp4_plan_kernel<<<1, PLAN_THREADS, 0, s>>>(a);
  kernel<<<grid, threads, smem, s>>>(a);
  return cudaGetLastError();
}

// Where the sector kernel runs (moeffi_run): the quant op from 16 rows per expert on the mean. Below
// that the padding rows, a warp-trip each, outweigh the real ones (8 x 7168, E = 8: 7.7 us against the
// flat kernel's 5.0, H100); the silu op needs 100 registers in it (2 blocks of 256 per SM) and ran 20%
// slower than on the flat kernel (NOTES.md).
bool sector_pays(bool silu, int64_t M, int64_t E) { return !silu && M >= 16 * E; }

template <bool SILU> cudaError_t launch_lookup(const Args &a, int lookup, int variant, int device, cudaStream_t s) {
  if (variant == NOOP) {
    nvfp4_noop_kernel<<<1, 32, 0, s>>>(a);
    return cudaGetLastError();
  }
  if constexpr (!SILU)
    if (flat_fits(a) && variant == SECTOR_NO_SF) return lookup == REG ? launch_sector<REG, SILU, MODE_NO_SF>(a, device, s)
                                                : lookup == SMEM ? launch_sector<SMEM, SILU, MODE_NO_SF>(a, device, s)
                                                                 : launch_sector<GLOBAL, SILU, MODE_NO_SF>(a, device, s);
  if (flat_fits(a) && (variant == SECTOR || ((variant == AUTO || variant == FORCE_SMEM || variant == FORCE_GLOBAL ||
                                              variant == MEMSET) && sector_pays(SILU, a.M, a.E)))) {
    switch (lookup) {
    case REG: return launch_sector<REG, SILU>(a, device, s);
    case SMEM: return launch_sector<SMEM, SILU>(a, device, s);
    default: return launch_sector<GLOBAL, SILU>(a, device, s);
    }
  }
  if (variant != ITEMS && variant != FLOAT_AMAX && flat_fits(a)) {
    // one block per thread and trip, loaded a trip ahead; 48 registers (quant: 5 blocks of 256 per SM)
    // and 80 for the silu op (its SiLU spills below that)
    constexpr int MINB = SILU ? 3 : 5;
    switch (variant) {
    case FLAT2: return launch_flat_lookup<SILU, 2, true, 3>(a, lookup, device, s);
    case OLD_E2M1: return launch_flat_lookup<SILU, 1, true, MINB, false>(a, lookup, device, s);
    case NO_SF: if constexpr (!SILU) return launch_flat_lookup<SILU, 1, true, MINB, true, MODE_NO_SF>(a, lookup, device, s);
      break;
    case READ_ONLY: if constexpr (!SILU) return launch_flat_lookup<SILU, 1, true, MINB, true, MODE_READ_ONLY>(a, lookup, device, s);
      break;
    default: break;
    }
    return launch_flat_lookup<SILU, 1, true, MINB>(a, lookup, device, s);
  }
  return variant == FLOAT_AMAX ? launch_packed<SILU, !packed_amax<SILU>()>(a, lookup, device, s)
                               : launch_packed<SILU, packed_amax<SILU>()>(a, lookup, device, s);
}

template <bool SILU> cudaError_t launch_plain(const Args &a, cudaStream_t s) {
  cudaError_t err = cudaMemsetAsync(a.sf, 0, (size_t)a.sf_bytes, s);
  if (err != cudaSuccess) return err;
  nvfp4_plan_kernel<<<1, PLAN_THREADS, 0, s>>>(a);
  if (a.M > 0) nvfp4_plain_kernel<SILU><<<(unsigned)a.M, (unsigned)std::min<int64_t>(ceil_div(a.ipr, 32) * 32, 1024), 0, s>>>(a);
  return cudaGetLastError();
}

// A NULL tensor is an error only when it has elements.
#define NEED(ptr, count, slot) \
  if (!(ptr) && (count) != 0) FAIL(MOEFFI_INVALID, "tensors->%s is NULL", slot)
#define ALIGNED(ptr, n, slot) \
  if ((uintptr_t)(ptr) % (n)) FAIL(MOEFFI_INVALID, "tensors->%s must be %d-byte aligned", slot, n)

int32_t run_variant(const moeffi_problem *p, const moeffi_tensors *t, int variant, char *msg, uint32_t cap) {
  int32_t st;
  if ((st = check_all(p, msg, cap))) return st;
  if (!t || t->size < sizeof(moeffi_tensors)) FAIL(MOEFFI_INVALID, "tensors struct too small");
  const bool silu = p->op == MOEFFI_OP_NVFP4_SILU_QUANT;
  const int64_t M = p->m, E = p->experts, cols = cols_of(p), in_cols = silu ? 2 * cols : cols;
  const int lookup = variant == PLAIN ? GLOBAL : lookup_of(E, variant);
  const uint64_t need = workspace_bytes(E, lookup);
  NEED(t->x, (uint64_t)(M * in_cols), "x");
  NEED(t->out, (uint64_t)(M * cols / 2), "out");
  NEED(t->out_aux, 1, "out_aux");
  NEED(t->expert_offsets, 1, "expert_offsets");
  NEED(t->global_scale, (uint64_t)E, "global_scale");
  ALIGNED(t->x, 16, "x");
  ALIGNED(t->out, 4, "out");
  ALIGNED(t->out_aux, 16, "out_aux");
  if (t->workspace_bytes < need || (need && !t->workspace) || (uintptr_t)t->workspace % 16)
    FAIL(MOEFFI_INVALID, "workspace must be %llu bytes, 16-byte aligned (got %llu)", (unsigned long long)need,
         (unsigned long long)t->workspace_bytes);
  MOEFFI_CUDA_TRY(cudaSetDevice(p->device_index));
  (void)cudaGetLastError(); // forget a stale error of an earlier runtime call (this library's own runtime)
  const cudaStream_t s = (cudaStream_t)t->stream;
  Args a = {};
  a.x = (const uint16_t *)t->x, a.off = (const int32_t *)t->expert_offsets, a.gscale = (const float *)t->global_scale;
  a.out = (uint8_t *)t->out, a.sf = (uint8_t *)t->out_aux, a.error_flags = t->error_flags;
  a.ws_ok = (int *)t->workspace, a.ws_base = need ? (int *)((char *)t->workspace + 16) : nullptr;
  a.E = (int)E, a.ktiles = (int)ceil_div(cols, 64), a.ipr = (int)(cols / 8);
  a.M = M, a.rows = (int)M, a.cols = cols, a.items = M * (cols / 8), a.sf_bytes = scale_bytes(M, E, cols);
  cudaError_t err;
  if (variant == MEMSET) {
    MOEFFI_CUDA_TRY(cudaMemsetAsync(a.sf, 0, (size_t)a.sf_bytes, s));
  }
  if (variant == PLAIN) err = silu ? launch_plain<true>(a, s) : launch_plain<false>(a, s);
  else err = silu ? launch_lookup<true>(a, lookup, variant, p->device_index, s) : launch_lookup<false>(a, lookup, variant, p->device_index, s);
  if (err != cudaSuccess) FAIL(MOEFFI_DEVICE, "nvfp4 kernels: %s", cudaGetErrorString(err));
  return MOEFFI_OK;
}

} // namespace

// ---- exported entry points ----

MOEFFI_API uint32_t moeffi_abi_version(void) { return MOEFFI_ABI_VERSION; }

MOEFFI_API int32_t moeffi_describe(moeffi_manifest *out) {
  const uint32_t ops = (1u << MOEFFI_OP_NVFP4_EXPERTS_QUANT) | (1u << MOEFFI_OP_NVFP4_SILU_QUANT);
  // batch invariant: every row depends on its own values and its expert only
  return moeffi_fill_manifest(out, "nvfp4", "0.2.0", "sm_80+", MOEFFI_DEVICE_CUDA, ops, 0, 0, ops, 20);
}

MOEFFI_API int32_t moeffi_supported(const moeffi_problem *problem, char *reason, uint32_t capacity) {
  if (check_all(problem, reason, capacity) != MOEFFI_OK) return -1;
  const DeviceInfo *d = device_info(problem->device_index);
  if (!d) {
    moeffi_say(reason, capacity, "cannot query cuda:%d", problem->device_index);
    return -1;
  }
  const int lookup = lookup_of(problem->experts, AUTO);
  const bool sector = sector_pays(problem->op == MOEFFI_OP_NVFP4_SILU_QUANT, problem->m, problem->experts);
  moeffi_say(reason, capacity, "%s NVFP4 kernel on %s (sm_%d%d), %s expert lookup", sector ? "sector" : "flat", d->name,
             d->major, d->minor, lookup == REG ? "register" : lookup == SMEM ? "shared-memory" : "global-memory");
  return 20;
}

MOEFFI_API int32_t moeffi_workspace_size(const moeffi_problem *problem, uint64_t *bytes) {
  if (!bytes) return MOEFFI_INVALID;
  *bytes = 0;
  const int32_t st = check_all(problem, NULL, 0);
  if (st) return st;
  *bytes = workspace_bytes(problem->experts, lookup_of(problem->experts, AUTO));
  return MOEFFI_OK;
}

MOEFFI_API int32_t moeffi_prepare(const moeffi_problem *problem, const moeffi_weights *weights, void **handle,
                                  char *message, uint32_t capacity) {
  (void)weights;
  if (!handle) {
    moeffi_say(message, capacity, "handle is NULL");
    return MOEFFI_INVALID;
  }
  *handle = NULL; // no weights
  return check_all(problem, message, capacity);
}

MOEFFI_API void moeffi_release(void *handle) { (void)handle; }

MOEFFI_API int32_t moeffi_run(const moeffi_problem *problem, void *handle, const moeffi_tensors *tensors, char *message,
                              uint32_t capacity) {
  (void)handle;
  return run_variant(problem, tensors, AUTO, message, capacity);
}

/* Benchmark entry (not part of moeffi.h; bench/nvfp4.ts binds it): moeffi_run with a forced variant.
 * 0 auto (= moeffi_run), 1 plain (memset, planning kernel, one row per block, global binary search),
 * 2 auto with the shared-memory lookup, 3 auto with the planning kernel and the global lookup, 4 auto
 * after a memset of the whole scale buffer, 5 the previous (items) kernel with the other block-amax form
 * (quant: from unpacked floats; silu: from the packed bf16 words), 6 the previous kernel, 7 the flat
 * kernel with two blocks per thread and trip, 8 the flat kernel with e2m1x8_magnitudes, 12 the sector
 * kernel, 13 the flat kernel (whatever the shape). Timing only, not bit-exact (quant op; the silu op runs
 * auto): 9 the flat kernel without per-block scale byte stores, 10 an empty kernel, 11 no stores at all,
 * 14 the sector kernel without scale stores. Variants 1 and 3 need a workspace of at least 16 + 4 (E + 1) bytes. */
MOEFFI_API int32_t moeffi_nvfp4_variant_run(const moeffi_problem *problem, const moeffi_tensors *tensors, uint32_t variant,
                                            char *message, uint32_t capacity) {
  if (variant > LAST_VARIANT) {
    moeffi_say(message, capacity, "unknown variant %u", variant);
    return MOEFFI_INVALID;
  }
  return run_variant(problem, tensors, (int)variant, message, capacity);
}
