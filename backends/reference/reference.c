/* reference.c: the exact CPU reference backend of moeffi.
 *
 * Every op of moeffi.h computed on the host in fp32 with the rounding steps spelled out in
 * shared/reference/moe.md (sections 1-5). It is the ground truth the GPU backends are compared
 * against, so it favours a fixed, documented order of operations over speed: each output element
 * is reduced by exactly one thread in one order, which makes results deterministic and
 * independent of M, the thread count and the rest of the batch.
 *
 * Choices where the text leaves room:
 *  - amax ignores NaN (a NaN element quantizes to the NaN code but does not poison the scale);
 *  - e2m1 encodes NaN as the saturated code 0x7 with the NaN's sign, and the sign bit always comes
 *    from the float (-0.0 and small negatives give 0x8);
 *  - nvfp4 tests "SF != 0" on the decoded fp32 value of SF, as the upstream kernels do. */
#include "moeffi.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#define PARALLEL_FOR _Pragma("omp parallel for schedule(static)")
#define PARALLEL_FOR_DYNAMIC _Pragma("omp parallel for schedule(dynamic)")
#else
#define PARALLEL_FOR
#define PARALLEL_FOR_DYNAMIC
#endif

MOEFFI_DEFINE_LAYOUT()

enum { QBLK = 128,     /* K block of the promotion rule and of block / group scales */
       ROW_BLOCK = 16, /* weight rows per GEMM work item */
       ALIGN = 64 };
#define FP8_MAX 448.0f
#define MIN_SCALE (1.0f / (FP8_MAX * 512.0f))
#define TOO_LARGE (UINT64_C(1) << 62) /* byte counts at or above this are refused */

/* Writes the message and returns the status; needs `msg` and `cap` in scope. */
#define FAIL(status, ...)                  \
  do {                                     \
    moeffi_say(msg, cap, __VA_ARGS__);     \
    return (status);                       \
  } while (0)

/* Invalid data found in the tensors: also OR the bit into tensors->error_flags when one is given. */
#define FAIL_FLAG(t, bit, ...)                        \
  do {                                                \
    if ((t)->error_flags) *(t)->error_flags |= (bit); \
    FAIL(MOEFFI_INVALID, __VA_ARGS__);                \
  } while (0)

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline uint64_t mul_sat(uint64_t a, uint64_t b) { return a && b > UINT64_MAX / a ? UINT64_MAX : a * b; }
static inline uint64_t add_sat(uint64_t a, uint64_t b) { return a > UINT64_MAX - b ? UINT64_MAX : a + b; }

/* ---- number formats ---- */

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }

static inline float bf16_to_f32(uint16_t h) { return float_of((uint32_t)h << 16); }

static inline uint16_t f32_to_bf16(float f) {
  uint32_t u = bits_of(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)(((u >> 16) & 0x8000u) | 0x7FC0u);
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16); /* RNE; overflow carries into inf */
}

/* fp32 -> e4m3fn, round to nearest even, saturating to +-448 (CUDA's __NV_SATFINITE). */
static inline uint8_t f32_to_e4m3(float f) {
  uint32_t u = bits_of(f), a = u & 0x7FFFFFFFu;
  uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
  if (a > 0x7F800000u) return sign | 0x7Fu;  /* NaN */
  if (a >= 0x43E00000u) return sign | 0x7Eu; /* >= 448, inf included */
  if (a >= 0x3C800000u) {                    /* >= 2^-6: normal; round away the 20 low bits */
    uint32_t r = (a + 0x7FFFFu + ((a >> 20) & 1u)) >> 20;
    return sign | (uint8_t)(r - (120u << 3)); /* rebias the exponent 127 -> 7 */
  }
  uint32_t e = a >> 23; /* subnormal: count units of 2^-9 */
  if (e < 117) return sign; /* below 2^-10, the half unit */
  uint32_t m = (a & 0x7FFFFFu) | 0x800000u, shift = 141 - e; /* |f| = m * 2^-shift units */
  uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
  q += rem > half || (rem == half && (q & 1u));
  return sign | (uint8_t)q; /* q == 8 is 2^-6, the first normal code */
}

static float e4m3_table[256];

/* Built at load time so no entry point races on it. */
__attribute__((constructor)) static void build_e4m3_table(void) {
  for (int c = 0; c < 256; c++) {
    int e = (c >> 3) & 15, m = c & 7;
    float v = e == 15 && m == 7 ? NAN : e == 0 ? ldexpf((float)m, -9) : ldexpf((float)(8 + m), e - 10);
    e4m3_table[c] = c & 0x80 ? -v : v;
  }
}

/* fp32 -> e2m1 (0, .5, 1, 1.5, 2, 3, 4, 6), RNE with ties to the even code, saturating;
 * NaN fails every comparison and lands on 6. */
static inline uint8_t f32_to_e2m1(float f) {
  uint8_t sign = (uint8_t)((bits_of(f) >> 28) & 0x8u);
  float a = fabsf(f);
  uint8_t q = a <= 0.25f ? 0 : a < 0.75f ? 1 : a <= 1.25f ? 2 : a < 1.75f ? 3
            : a <= 2.5f ? 4 : a < 3.5f ? 5 : a <= 5.0f ? 6 : 7;
  return sign | q;
}

static inline float amax_of(const float *v, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; i++) {
    float a = fabsf(v[i]);
    if (a > m) m = a;
  }
  return m;
}

static inline float dynamic_scale(float amax) { return fmaxf(amax / FP8_MAX, MIN_SCALE); }

/* ---- problem checks ---- */

static int is_fp8(uint32_t op) { return op == MOEFFI_OP_FP8_MOE || op == MOEFFI_OP_FP8_SCALED_MM; }

/* What supported() reports; prepare/run/workspace_size refuse the same problems. */
static int32_t check_problem(const moeffi_problem *p, char *msg, uint32_t cap) {
  if (!p) FAIL(MOEFFI_INVALID, "problem is NULL");
  if (p->size < sizeof(moeffi_problem)) FAIL(MOEFFI_INVALID, "problem struct too small");
  if (p->op >= MOEFFI_OP_COUNT) FAIL(MOEFFI_UNSUPPORTED, "unknown op %u", p->op);
  if (p->device == MOEFFI_DEVICE_CUDA)
    FAIL(MOEFFI_UNSUPPORTED, "reference runs on the CPU; tensors are on cuda:%d", p->device_index);
  if (p->device != MOEFFI_DEVICE_CPU) FAIL(MOEFFI_UNSUPPORTED, "unknown device %u", p->device);
  if (!is_fp8(p->op)) return MOEFFI_OK;
  if (p->weight_scale > MOEFFI_W_BLOCK_128) FAIL(MOEFFI_UNSUPPORTED, "unknown weight scale %u", p->weight_scale);
  if (p->act_scale > MOEFFI_A_DYNAMIC_GROUP_128) FAIL(MOEFFI_UNSUPPORTED, "unknown activation scale %u", p->act_scale);
  if ((p->flags & MOEFFI_FLAG_BATCH_INVARIANT) && p->act_scale == MOEFFI_A_DYNAMIC_TENSOR)
    FAIL(MOEFFI_UNSUPPORTED,
         "dynamic per-tensor activation scales depend on the whole batch, so they are not batch invariant");
  return MOEFFI_OK;
}

/* The core validates shapes; these checks only keep index arithmetic in range. */
static int32_t check_dims(const moeffi_problem *p, char *msg, uint32_t cap) {
  const int64_t d[] = {p->m, p->n, p->k, p->experts, p->topk};
  const char *names[] = {"m", "n", "k", "experts", "topk"};
  for (int i = 0; i < 5; i++)
    if (d[i] < 0 || d[i] > INT32_MAX) FAIL(MOEFFI_INVALID, "%s = %lld is out of range", names[i], (long long)d[i]);
  int need_n = is_fp8(p->op) || p->op == MOEFFI_OP_NVFP4_SILU_QUANT, need_e = p->op != MOEFFI_OP_FP8_SCALED_MM;
  int need_topk = p->op == MOEFFI_OP_FP8_MOE || p->op == MOEFFI_OP_TOPK_SOFTMAX;
  int need_k = p->op != MOEFFI_OP_TOPK_SOFTMAX && p->op != MOEFFI_OP_NVFP4_SILU_QUANT;
  if ((need_n && p->n == 0) || (need_k && p->k == 0) || (need_e && p->experts == 0) || (need_topk && p->topk == 0))
    FAIL(MOEFFI_INVALID, "a dimension of op %u is zero", p->op);
  if (p->op == MOEFFI_OP_TOPK_SOFTMAX && p->topk > p->experts)
    FAIL(MOEFFI_INVALID, "topk = %lld exceeds experts = %lld", (long long)p->topk, (long long)p->experts);
  if (p->op == MOEFFI_OP_NVFP4_EXPERTS_QUANT && p->k % 16)
    FAIL(MOEFFI_INVALID, "k = %lld is not a multiple of 16", (long long)p->k);
  if (p->op == MOEFFI_OP_NVFP4_SILU_QUANT && p->n % 16)
    FAIL(MOEFFI_INVALID, "n = %lld is not a multiple of 16", (long long)p->n);
  return MOEFFI_OK;
}

static int32_t check_all(const moeffi_problem *p, char *msg, uint32_t cap) {
  int32_t st = check_problem(p, msg, cap);
  return st ? st : check_dims(p, msg, cap);
}

/* A NULL tensor is an error only when it has elements. */
static int32_t need(const void *ptr, uint64_t count, const char *slot, char *msg, uint32_t cap) {
  if (!ptr && count) FAIL(MOEFFI_INVALID, "tensors->%s is NULL", slot);
  return MOEFFI_OK;
}

static int32_t static_scale(const void *ptr, const char *slot, float *s, char *msg, uint32_t cap) {
  if (!ptr) FAIL(MOEFFI_INVALID, "tensors->%s is NULL (static activation scale)", slot);
  *s = *(const float *)ptr;
  if (!(isfinite(*s) && *s > 0.0f)) FAIL(MOEFFI_INVALID, "%s = %g must be finite and > 0", slot, (double)*s);
  return MOEFFI_OK;
}

/* ---- prepared weights ---- */

/* One fp8 weight matrix [rows, len] (per expert) and the count of its fp32 scales. */
typedef struct {
  int64_t rows, len, nscales;
} geometry;

static geometry geom(uint32_t wscheme, int64_t rows, int64_t len) {
  geometry g = {rows, len, 1};
  if (wscheme == MOEFFI_W_PER_CHANNEL) g.nscales = rows;
  if (wscheme == MOEFFI_W_BLOCK_128) g.nscales = ceil_div(rows, QBLK) * ceil_div(len, QBLK);
  return g;
}

/* w13 is [E, 2N, K] (mm: W [N, K] as a single "expert"); w2 is [E, K, N]. */
static void weight_geometry(const moeffi_problem *p, geometry *g13, geometry *g2, int64_t *experts) {
  int moe = p->op == MOEFFI_OP_FP8_MOE;
  *g13 = geom(p->weight_scale, moe ? 2 * p->n : p->n, p->k);
  *g2 = geom(p->weight_scale, moe ? p->k : 0, p->n);
  *experts = moe ? p->experts : 1;
}

typedef struct {
  uint32_t op, weight_scale, act_scale;
  int64_t n, k, experts;
  uint8_t *w13, *w2;
  float *w13_scale, *w2_scale;
} ref_handle;

/* Bump allocator over byte offsets, ALIGN-aligned, saturating on overflow. */
static uint64_t take(uint64_t *cursor, uint64_t count, uint64_t elem) {
  uint64_t at = mul_sat(add_sat(*cursor, ALIGN - 1) / ALIGN, ALIGN);
  *cursor = add_sat(at, mul_sat(count, elem));
  return at;
}

/* ---- workspace plan, shared by workspace_size and run ---- */

typedef struct {
  uint64_t xa, xs;          /* quantized x as decoded fp8 [M, K] floats, its scales [M, ngx] */
  uint64_t acc;             /* moe: GEMM1 out [P, 2N], later GEMM2 out [P, K]; mm: [M, N] */
  uint64_t hq, hs;          /* moe: quantized intermediate [P, N], its scales [P, ngh] */
  uint64_t cursor, offsets; /* moe: per-expert fill cursor [E], row starts [E+1] (int32) */
  uint64_t list, tokens;    /* moe: (t * topk + j) grouped by expert, and its t [P] (int32) */
  uint64_t total;
} ws_plan;

/* Scales per row of an activation of length len: one per 128 group, or one for the row. */
static int64_t act_groups(uint32_t act, int64_t len) { return act == MOEFFI_A_DYNAMIC_GROUP_128 ? ceil_div(len, QBLK) : 1; }

static int32_t plan_workspace(const moeffi_problem *p, ws_plan *w, char *msg, uint32_t cap) {
  memset(w, 0, sizeof *w);
  if (!is_fp8(p->op) || p->m == 0) return MOEFFI_OK;
  uint64_t m = (uint64_t)p->m, n = (uint64_t)p->n, k = (uint64_t)p->k, c = 0, f = sizeof(float);
  w->xa = take(&c, m * k, f);
  w->xs = take(&c, m * (uint64_t)act_groups(p->act_scale, p->k), f);
  if (p->op == MOEFFI_OP_FP8_SCALED_MM) {
    w->acc = take(&c, m * n, f);
  } else {
    uint64_t pairs = m * (uint64_t)p->topk, e = (uint64_t)p->experts;
    if (pairs > INT32_MAX) FAIL(MOEFFI_INVALID, "m * topk = %llu exceeds the int32 row index", (unsigned long long)pairs);
    w->acc = take(&c, mul_sat(pairs, 2 * n > k ? 2 * n : k), f);
    w->hq = take(&c, pairs * n, f);
    w->hs = take(&c, pairs * (uint64_t)act_groups(p->act_scale, p->n), f);
    w->cursor = take(&c, e, sizeof(int32_t));
    w->offsets = take(&c, e + 1, sizeof(int32_t));
    w->list = take(&c, pairs, sizeof(int32_t));
    w->tokens = take(&c, pairs, sizeof(int32_t));
  }
  if (c >= TOO_LARGE) FAIL(MOEFFI_NO_MEMORY, "workspace size overflows");
  w->total = c;
  return MOEFFI_OK;
}

/* The caller's workspace, checked against the plan run() will use. */
static int32_t workspace_of(const moeffi_problem *p, const moeffi_tensors *t, ws_plan *w, char **base, char *msg,
                            uint32_t cap) {
  int32_t st = plan_workspace(p, w, msg, cap);
  if (st) return st;
  if (t->workspace_bytes < w->total || !t->workspace || (uintptr_t)t->workspace % sizeof(float))
    FAIL(MOEFFI_INVALID, "workspace must be %llu bytes, 4-byte aligned (got %llu)", (unsigned long long)w->total,
         (unsigned long long)t->workspace_bytes);
  *base = t->workspace;
  return MOEFFI_OK;
}

/* ---- quantization of activations ---- */

/* Replaces each listed row of v [*, len] by its decoded fp8 quantization under scheme `act` and
 * writes the dequant scales [row, group]. rows == NULL means rows 0..nrows-1. */
static void quantize_rows(float *v, int64_t len, const int32_t *rows, int64_t nrows, uint32_t act, float fixed_scale,
                          float *scales) {
  int64_t ng = act_groups(act, len), width = act == MOEFFI_A_DYNAMIC_GROUP_128 ? QBLK : len;
  if (act == MOEFFI_A_DYNAMIC_TENSOR) { /* amax over every listed row; row maxima first, in parallel */
    PARALLEL_FOR
    for (int64_t i = 0; i < nrows; i++) {
      int64_t r = rows ? rows[i] : i;
      scales[r] = amax_of(v + r * len, len);
    }
    float amax = 0.0f;
    for (int64_t i = 0; i < nrows; i++) amax = fmaxf(amax, scales[rows ? rows[i] : i]);
    fixed_scale = dynamic_scale(amax);
  }
  int one_scale = act == MOEFFI_A_STATIC_TENSOR || act == MOEFFI_A_DYNAMIC_TENSOR; /* same s for all rows */
  PARALLEL_FOR
  for (int64_t i = 0; i < nrows; i++) {
    int64_t r = rows ? rows[i] : i;
    float *row = v + r * len;
    for (int64_t g = 0; g < ng; g++) {
      int64_t lo = g * width, hi = min64(lo + width, len);
      float s = one_scale ? fixed_scale : dynamic_scale(amax_of(row + lo, hi - lo)), inv = 1.0f / s;
      for (int64_t c = lo; c < hi; c++) row[c] = e4m3_table[f32_to_e4m3(row[c] * inv)];
      scales[r * ng + g] = s;
    }
  }
}

/* ---- dequant GEMM ---- */

/* out[list[i], r] = dequant(a[arows[i]]) . dequant(w[r]) for the listed rows i. */
typedef struct {
  const uint8_t *w; /* fp8 [rows, len] */
  const float *ws;  /* its scales, per the weight scheme */
  uint32_t wscheme;
  int64_t len, nkb;            /* reduction length and its count of 128 blocks */
  const float *a, *as;         /* decoded activations [*, len] and their scales [*, a_ng] */
  int64_t a_ng;
  const int32_t *list;         /* output rows (NULL = 0..count-1) */
  const int32_t *arows;        /* activation row of each listed output row (NULL = the same row) */
  int64_t count;
  float *out;
  int64_t out_stride;
  int kblocked; /* scales applied per 128 block rather than once at the end */
} gemm_job;

static inline float weight_scale(const gemm_job *g, int64_t r, int64_t kb) {
  if (g->wscheme == MOEFFI_W_PER_TENSOR) return g->ws[0];
  if (g->wscheme == MOEFFI_W_PER_CHANNEL) return g->ws[r];
  return g->ws[(r / QBLK) * g->nkb + kb];
}

static inline float act_scale(const gemm_job *g, int64_t row, int64_t kb) {
  return g->as[row * g->a_ng + (g->a_ng > 1 ? kb : 0)];
}

/* 8 fixed lanes combined in a fixed order: gcc vectorizes it without reassociating. */
static inline float dot_block(const float *restrict a, const float *restrict b, int64_t n) {
  float acc[8] = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; l++) acc[l] += a[i + l] * b[i + l];
  for (; i < n; i++) acc[i % 8] += a[i] * b[i]; /* tail: lane i % 8, as if zero-padded */
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* Weight rows [r0, r1): each 128-block of a weight row is decoded once and dotted with every
 * listed activation row; the fp32 accumulator lives in out and goes through kb in order. */
static void gemm_rows(const gemm_job *g, int64_t r0, int64_t r1) {
  float wdec[QBLK];
  for (int64_t kb = 0; kb < g->nkb; kb++) {
    int64_t k0 = kb * QBLK, n = min64(QBLK, g->len - k0);
    int last = kb + 1 == g->nkb;
    for (int64_t r = r0; r < r1; r++) {
      const uint8_t *w = g->w + r * g->len + k0;
      for (int64_t i = 0; i < n; i++) wdec[i] = e4m3_table[w[i]];
      for (int64_t i = 0; i < g->count; i++) {
        int64_t p = g->list ? g->list[i] : i, ar = g->arows ? g->arows[i] : p;
        float partial = dot_block(g->a + ar * g->len + k0, wdec, n);
        float *o = g->out + p * g->out_stride + r, acc = kb ? *o : 0.0f;
        if (g->kblocked) {
          acc += partial * act_scale(g, ar, kb) * weight_scale(g, r, kb);
        } else {
          acc += partial;
          if (last) acc = acc * act_scale(g, ar, 0) * weight_scale(g, r, 0);
        }
        *o = acc;
      }
    }
  }
}

/* Runs job over every expert with routed rows (offsets != NULL: expert e owns
 * list[offsets[e]..offsets[e+1]), weights at w + e * w_stride) or over the one matrix of job. */
static void run_gemm(const gemm_job *job, int64_t rows, int64_t experts, const int32_t *offsets, int64_t w_stride,
                     int64_t s_stride) {
  int64_t nblk = ceil_div(rows, ROW_BLOCK);
  PARALLEL_FOR_DYNAMIC
  for (int64_t it = 0; it < experts * nblk; it++) {
    int64_t e = it / nblk, r0 = (it % nblk) * ROW_BLOCK;
    gemm_job g = *job;
    if (offsets) {
      if (offsets[e] == offsets[e + 1]) continue;
      g.w += e * w_stride;
      g.ws += e * s_stride;
      g.list += offsets[e];
      g.arows += g.arows ? offsets[e] : 0;
      g.count = offsets[e + 1] - offsets[e];
    }
    gemm_rows(&g, r0, min64(rows, r0 + ROW_BLOCK));
  }
}

static int kblocked(const moeffi_problem *p) {
  return p->act_scale == MOEFFI_A_DYNAMIC_GROUP_128 || p->weight_scale == MOEFFI_W_BLOCK_128;
}

/* x bf16 [M, K] -> decoded fp8 rows in xa with their scales in xs. */
static void quantize_input(const moeffi_problem *p, const uint16_t *x, float a1, float *xa, float *xs) {
  int64_t total = p->m * p->k;
  PARALLEL_FOR
  for (int64_t i = 0; i < total; i++) xa[i] = bf16_to_f32(x[i]);
  quantize_rows(xa, p->k, NULL, p->m, p->act_scale, a1, xs);
}

/* ---- ops ---- */

static int32_t check_handle(const moeffi_problem *p, const ref_handle *h, char *msg, uint32_t cap) {
  if (!h) FAIL(MOEFFI_INVALID, "handle is NULL: call prepare first");
  if (h->op != p->op || h->n != p->n || h->k != p->k || h->experts != p->experts ||
      h->weight_scale != p->weight_scale || h->act_scale != p->act_scale)
    FAIL(MOEFFI_INVALID, "problem (op, n, k, experts or scheme) differs from the one the handle was prepared for");
  return MOEFFI_OK;
}

static int32_t run_fp8_moe(const moeffi_problem *p, const ref_handle *h, const moeffi_tensors *t, char *msg,
                           uint32_t cap) {
  const int64_t M = p->m, N = p->n, K = p->k, E = p->experts, topk = p->topk, P = M * topk;
  int32_t st;
  if ((st = need(t->x, (uint64_t)(M * K), "x", msg, cap)) || (st = need(t->out, (uint64_t)(M * K), "out", msg, cap)) ||
      (st = need(t->topk_ids, (uint64_t)P, "topk_ids", msg, cap)) ||
      (st = need(t->topk_weights, (uint64_t)P, "topk_weights", msg, cap)))
    return st;
  if (M == 0) return MOEFFI_OK;
  const int32_t *ids = t->topk_ids;
  for (int64_t i = 0; i < P; i++)
    if (ids[i] < -1 || ids[i] >= E)
      FAIL_FLAG(t, MOEFFI_ERROR_TOPK_ID, "topk_ids[%lld, %lld] = %d is outside [-1, %lld)", (long long)(i / topk),
                (long long)(i % topk), ids[i], (long long)E);
  float a1 = 0.0f, a2 = 0.0f;
  if (p->act_scale == MOEFFI_A_STATIC_TENSOR &&
      ((st = static_scale(t->a1_scale, "a1_scale", &a1, msg, cap)) || (st = static_scale(t->a2_scale, "a2_scale", &a2, msg, cap))))
    return st;
  ws_plan w;
  char *base;
  if ((st = workspace_of(p, t, &w, &base, msg, cap))) return st;
  float *xa = (float *)(base + w.xa), *xs = (float *)(base + w.xs), *acc = (float *)(base + w.acc);
  float *hq = (float *)(base + w.hq), *hs = (float *)(base + w.hs);
  int32_t *cursor = (int32_t *)(base + w.cursor), *offsets = (int32_t *)(base + w.offsets);
  int32_t *list = (int32_t *)(base + w.list), *tokens = (int32_t *)(base + w.tokens);

  /* Group the (t, j) pairs by expert, stable in (t, j) order: a counting sort. */
  memset(offsets, 0, (size_t)(E + 1) * sizeof(int32_t));
  for (int64_t i = 0; i < P; i++)
    if (ids[i] >= 0) offsets[ids[i] + 1]++;
  for (int64_t e = 0; e < E; e++) offsets[e + 1] += offsets[e], cursor[e] = offsets[e];
  for (int64_t i = 0; i < P; i++)
    if (ids[i] >= 0) {
      tokens[cursor[ids[i]]] = (int32_t)(i / topk);
      list[cursor[ids[i]]++] = (int32_t)i;
    }
  const int64_t routed = offsets[E];

  quantize_input(p, t->x, a1, xa, xs);

  gemm_job job = {.w = h->w13, .ws = h->w13_scale, .wscheme = p->weight_scale, .len = K, .nkb = ceil_div(K, QBLK),
                  .a = xa, .as = xs, .a_ng = act_groups(p->act_scale, K), .list = list, .arows = tokens,
                  .out = acc, .out_stride = 2 * N, .kblocked = kblocked(p)};
  run_gemm(&job, 2 * N, E, offsets, 2 * N * K, geom(p->weight_scale, 2 * N, K).nscales);

  PARALLEL_FOR
  for (int64_t i = 0; i < routed; i++) {
    const float *g = acc + (int64_t)list[i] * 2 * N, *u = g + N;
    float *hrow = hq + (int64_t)list[i] * N;
    for (int64_t c = 0; c < N; c++) hrow[c] = (g[c] / (1.0f + expf(-g[c]))) * u[c];
  }
  quantize_rows(hq, N, list, routed, p->act_scale, a2, hs);

  gemm_job job2 = {.w = h->w2, .ws = h->w2_scale, .wscheme = p->weight_scale, .len = N, .nkb = ceil_div(N, QBLK),
                   .a = hq, .as = hs, .a_ng = act_groups(p->act_scale, N), .list = list,
                   .out = acc, .out_stride = K, .kblocked = kblocked(p)};
  run_gemm(&job2, K, E, offsets, K * N, geom(p->weight_scale, K, N).nscales);

  /* Combine in slot order 0..topk-1, in fp32 from 0. */
  const float *tw = t->topk_weights;
  uint16_t *out = t->out;
  PARALLEL_FOR
  for (int64_t tok = 0; tok < M; tok++)
    for (int64_t c = 0; c < K; c++) {
      float sum = 0.0f;
      for (int64_t j = 0; j < topk; j++) {
        int64_t i = tok * topk + j;
        if (ids[i] >= 0) sum += tw[i] * acc[i * K + c];
      }
      out[tok * K + c] = f32_to_bf16(sum);
    }
  return MOEFFI_OK;
}

static int32_t run_fp8_mm(const moeffi_problem *p, const ref_handle *h, const moeffi_tensors *t, char *msg,
                          uint32_t cap) {
  const int64_t M = p->m, N = p->n, K = p->k;
  const int has_bias = (p->flags & MOEFFI_FLAG_HAS_BIAS) != 0;
  int32_t st;
  if ((st = need(t->x, (uint64_t)(M * K), "x", msg, cap)) || (st = need(t->out, (uint64_t)(M * N), "out", msg, cap)) ||
      (has_bias && (st = need(t->bias, (uint64_t)N, "bias", msg, cap))))
    return st;
  if (M == 0) return MOEFFI_OK;
  float a1 = 0.0f;
  if (p->act_scale == MOEFFI_A_STATIC_TENSOR && (st = static_scale(t->a1_scale, "a1_scale", &a1, msg, cap))) return st;
  ws_plan w;
  char *base;
  if ((st = workspace_of(p, t, &w, &base, msg, cap))) return st;
  float *xa = (float *)(base + w.xa), *xs = (float *)(base + w.xs), *acc = (float *)(base + w.acc);

  quantize_input(p, t->x, a1, xa, xs);
  gemm_job job = {.w = h->w13, .ws = h->w13_scale, .wscheme = p->weight_scale, .len = K, .nkb = ceil_div(K, QBLK),
                  .a = xa, .as = xs, .a_ng = act_groups(p->act_scale, K), .count = M,
                  .out = acc, .out_stride = N, .kblocked = kblocked(p)};
  run_gemm(&job, N, 1, NULL, 0, 0);

  const uint16_t *bias = t->bias;
  uint16_t *out = t->out;
  PARALLEL_FOR
  for (int64_t i = 0; i < M * N; i++) out[i] = f32_to_bf16(has_bias ? acc[i] + bf16_to_f32(bias[i % N]) : acc[i]);
  return MOEFFI_OK;
}

/* Does expert a rank before expert b? Larger logit first, then lower id. */
static inline int ranks_before(const float *l, int64_t a, int64_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); }

static int32_t run_topk_softmax(const moeffi_problem *p, const moeffi_tensors *t, char *msg, uint32_t cap) {
  const int64_t M = p->m, E = p->experts, topk = p->topk;
  const int renorm = (p->flags & MOEFFI_FLAG_RENORMALIZE) != 0;
  int32_t st;
  if ((st = need(t->x, (uint64_t)(M * E), "x", msg, cap)) || (st = need(t->out, (uint64_t)(M * topk), "out", msg, cap)) ||
      (st = need(t->out_aux, (uint64_t)(M * topk), "out_aux", msg, cap)))
    return st;
  const float *logits = t->x;
  int32_t *ids = t->out;
  float *weights = t->out_aux;
  PARALLEL_FOR
  for (int64_t r = 0; r < M; r++) {
    const float *l = logits + r * E;
    float mx = l[0], sum = 0.0f, chosen = 0.0f;
    for (int64_t e = 1; e < E; e++) mx = l[e] > mx ? l[e] : mx;
    for (int64_t e = 0; e < E; e++) sum += expf(l[e] - mx);
    /* Slot s takes the best expert ranking after slot s-1's: no per-row marks needed. */
    int64_t prev = -1;
    for (int64_t s = 0; s < topk; s++) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; e++)
        if ((prev < 0 || ranks_before(l, prev, e)) && (best < 0 || ranks_before(l, e, best))) best = e;
      float w = expf(l[best] - mx) / sum;
      ids[r * topk + s] = (int32_t)best;
      weights[r * topk + s] = w;
      chosen += w;
      prev = best;
    }
    if (renorm)
      for (int64_t s = 0; s < topk; s++) weights[r * topk + s] /= chosen;
  }
  return MOEFFI_OK;
}

/* Byte of the 128x4-swizzled scale of row i (inside its expert) and scale column c. */
static inline int64_t swizzled(int64_t expert_base, int64_t ktiles, int64_t i, int64_t c) {
  return expert_base * ktiles * 4 + ((i / 128) * ktiles + c / 4) * 512 + (i % 32) * 16 + ((i % 128) / 32) * 4 + c % 4;
}

/* h of nvfp4_silu_quant (moeffi.h): e = exp(-g) correctly rounded to fp32, which exp() in double
 * rounded once is for every bf16 g (its exact value is at least 4 double ulps from each fp32
 * rounding midpoint: tests/nvfp4_numerics_check.cu), then fp32 steps; NaN -> the canonical bf16 NaN. */
static inline float silu_h(uint16_t gate, uint16_t up) {
  const float g = bf16_to_f32(gate), u = bf16_to_f32(up), e = (float)exp(-(double)g);
  const float h = (g / (1.0f + e)) * u;
  return h != h ? bf16_to_f32(0x7FC0u) : bf16_to_f32(f32_to_bf16(h));
}

/* nvfp4_experts_quant of x [M, K] (silu = 0), or of h [M, N] from x [M, 2N] (silu = 1, cols = N). */
static int32_t run_nvfp4(const moeffi_problem *p, const moeffi_tensors *t, int silu, char *msg, uint32_t cap) {
  const int64_t M = p->m, K = silu ? p->n : p->k, E = p->experts, ktiles = ceil_div(K, 64), in_cols = silu ? 2 * K : K;
  const uint64_t aux_bytes = mul_sat((uint64_t)(M + 127 * E), (uint64_t)ktiles * 4);
  int32_t st;
  if ((st = need(t->x, (uint64_t)(M * in_cols), "x", msg, cap)) || (st = need(t->out, (uint64_t)(M * K / 2), "out", msg, cap)) ||
      (st = need(t->out_aux, aux_bytes, "out_aux", msg, cap)) ||
      (st = need(t->expert_offsets, (uint64_t)E + 1, "expert_offsets", msg, cap)) ||
      (st = need(t->global_scale, (uint64_t)E, "global_scale", msg, cap)))
    return st;
  const int32_t *off = t->expert_offsets;
  if (off[0] != 0) FAIL_FLAG(t, MOEFFI_ERROR_EXPERT_OFFSETS, "expert_offsets[0] = %d, must be 0", off[0]);
  for (int64_t e = 0; e < E; e++)
    if (off[e + 1] < off[e])
      FAIL_FLAG(t, MOEFFI_ERROR_EXPERT_OFFSETS, "expert_offsets[%lld] = %d is below expert_offsets[%lld] = %d",
                (long long)(e + 1), off[e + 1], (long long)e, off[e]);
  if (off[E] != M)
    FAIL_FLAG(t, MOEFFI_ERROR_EXPERT_OFFSETS, "expert_offsets[%lld] = %d, must equal m = %lld", (long long)E, off[E],
              (long long)M);

  const uint16_t *x = t->x;
  const float *gscale = t->global_scale;
  uint8_t *out = t->out, *sf = t->out_aux;
  memset(sf, 0, (size_t)aux_bytes); /* padding rows and columns are zero */
  int64_t base = 0;                  /* blockscale_offsets[e]: each expert starts on a 128-row tile */
  for (int64_t e = 0; e < E; e++) {
    const int64_t rows = off[e + 1] - off[e];
    const float gs = gscale[e];
    PARALLEL_FOR
    for (int64_t i = 0; i < rows; i++) {
      const int64_t r = off[e] + i;
      for (int64_t c = 0; c < K / 16; c++) {
        float v[16];
        for (int k = 0; k < 16; k++) {
          const int64_t at = r * in_cols + c * 16 + k;
          v[k] = silu ? silu_h(x[at], x[at + K]) : bf16_to_f32(x[at]);
        }
        const uint8_t code = f32_to_e4m3(gs * (amax_of(v, 16) / 6.0f));
        const float sfv = e4m3_table[code], out_scale = sfv != 0.0f ? 1.0f / (sfv * (1.0f / gs)) : 0.0f;
        for (int k = 0; k < 16; k += 2)
          out[r * (K / 2) + c * 8 + k / 2] =
              (uint8_t)(f32_to_e2m1(v[k] * out_scale) | (f32_to_e2m1(v[k + 1] * out_scale) << 4));
        sf[swizzled(base, ktiles, i, c)] = code;
      }
    }
    base += ceil_div(rows, 128) * 128;
  }
  return MOEFFI_OK;
}

/* ---- exported entry points ---- */

MOEFFI_API uint32_t moeffi_abi_version(void) { return MOEFFI_ABI_VERSION; }

MOEFFI_API int32_t moeffi_describe(moeffi_manifest *out) {
  const uint32_t ops = (1u << MOEFFI_OP_COUNT) - 1;
  /* batch invariant for every op, except dynamic per-tensor scales, which supported() refuses */
  return moeffi_fill_manifest(out, "reference", "0.1.0", "cpu", MOEFFI_DEVICE_CPU, ops, MOEFFI_ALL_WEIGHT_SCALES,
                              MOEFFI_ALL_ACT_SCALES, ops, 0);
}

MOEFFI_API int32_t moeffi_supported(const moeffi_problem *problem, char *reason, uint32_t capacity) {
  if (check_problem(problem, reason, capacity) != MOEFFI_OK) return -1;
#ifdef _OPENMP
  moeffi_say(reason, capacity, "exact CPU reference (OpenMP, %d threads)", omp_get_max_threads());
#else
  moeffi_say(reason, capacity, "exact CPU reference (single thread, built without OpenMP)");
#endif
  return 0;
}

MOEFFI_API int32_t moeffi_workspace_size(const moeffi_problem *problem, uint64_t *bytes) {
  ws_plan w;
  int32_t st;
  if (!bytes) return MOEFFI_INVALID;
  *bytes = 0;
  if ((st = check_all(problem, NULL, 0)) || (st = plan_workspace(problem, &w, NULL, 0))) return st;
  *bytes = w.total;
  return MOEFFI_OK;
}

MOEFFI_API int32_t moeffi_prepare(const moeffi_problem *problem, const moeffi_weights *weights, void **handle,
                                  char *message, uint32_t capacity) {
  char *msg = message;
  uint32_t cap = capacity;
  int32_t st;
  if (!handle) FAIL(MOEFFI_INVALID, "handle is NULL");
  *handle = NULL;
  if ((st = check_all(problem, msg, cap))) return st;
  if (!is_fp8(problem->op)) return MOEFFI_OK; /* topk_softmax and the nvfp4 ops have no weights */
  if (!weights || weights->size < sizeof(moeffi_weights)) FAIL(MOEFFI_INVALID, "weights struct too small");
  const int moe = problem->op == MOEFFI_OP_FP8_MOE;
  if (!weights->w13 || !weights->w13_scale || (moe && (!weights->w2 || !weights->w2_scale)))
    FAIL(MOEFFI_INVALID, "weights->%s is NULL", !weights->w13 ? "w13" : !weights->w13_scale ? "w13_scale"
                                                : !weights->w2  ? "w2" : "w2_scale");
  geometry g13, g2;
  int64_t experts;
  weight_geometry(problem, &g13, &g2, &experts);
  const uint64_t ne = (uint64_t)experts, f = sizeof(float);
  const uint64_t n13 = mul_sat(ne, mul_sat((uint64_t)g13.rows, (uint64_t)g13.len));
  const uint64_t n2 = mul_sat(ne, mul_sat((uint64_t)g2.rows, (uint64_t)g2.len));
  const uint64_t s13 = mul_sat(ne, (uint64_t)g13.nscales), s2 = moe ? mul_sat(ne, (uint64_t)g2.nscales) : 0;
  uint64_t c = 0;
  take(&c, 1, sizeof(ref_handle));
  const uint64_t o13 = take(&c, n13, 1), os13 = take(&c, s13, f), o2 = take(&c, n2, 1), os2 = take(&c, s2, f);
  if (c >= TOO_LARGE || c > SIZE_MAX) FAIL(MOEFFI_NO_MEMORY, "prepared weights would need %llu bytes", (unsigned long long)c);
  char *mem = malloc((size_t)c);
  if (!mem) FAIL(MOEFFI_NO_MEMORY, "cannot allocate %llu bytes for the prepared weights", (unsigned long long)c);
  ref_handle *h = (ref_handle *)mem;
  *h = (ref_handle){.op = problem->op, .weight_scale = problem->weight_scale, .act_scale = problem->act_scale,
                    .n = problem->n, .k = problem->k, .experts = problem->experts, .w13 = (uint8_t *)(mem + o13),
                    .w2 = (uint8_t *)(mem + o2), .w13_scale = (float *)(mem + os13), .w2_scale = (float *)(mem + os2)};
  /* Own copies: the caller may free its buffers once prepare returns. */
  memcpy(h->w13, weights->w13, (size_t)n13);
  memcpy(h->w13_scale, weights->w13_scale, (size_t)(s13 * f));
  if (moe) {
    memcpy(h->w2, weights->w2, (size_t)n2);
    memcpy(h->w2_scale, weights->w2_scale, (size_t)(s2 * f));
  }
  *handle = h;
  return MOEFFI_OK;
}

MOEFFI_API void moeffi_release(void *handle) { free(handle); }

MOEFFI_API int32_t moeffi_run(const moeffi_problem *problem, void *handle, const moeffi_tensors *tensors, char *message,
                              uint32_t capacity) {
  char *msg = message;
  uint32_t cap = capacity;
  int32_t st;
  if ((st = check_all(problem, msg, cap))) return st;
  if (!tensors || tensors->size < sizeof(moeffi_tensors)) FAIL(MOEFFI_INVALID, "tensors struct too small");
  switch (problem->op) {
  case MOEFFI_OP_FP8_MOE:
    if ((st = check_handle(problem, handle, msg, cap))) return st;
    return run_fp8_moe(problem, handle, tensors, msg, cap);
  case MOEFFI_OP_FP8_SCALED_MM:
    if ((st = check_handle(problem, handle, msg, cap))) return st;
    return run_fp8_mm(problem, handle, tensors, msg, cap);
  case MOEFFI_OP_TOPK_SOFTMAX:
    return run_topk_softmax(problem, tensors, msg, cap);
  default:
    return run_nvfp4(problem, tensors, problem->op == MOEFFI_OP_NVFP4_SILU_QUANT, msg, cap);
  }
}
