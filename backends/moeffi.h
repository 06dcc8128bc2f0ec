/* moeffi.h: the one contract between the moeffi core and a backend plugin.
 *
 * A backend is a shared library that exports every function declared at the bottom of this file
 * (Bun refuses a whole dlopen when one symbol is missing, so the set is fixed). Everything crosses
 * the boundary as pointers to the plain structs below: fixed-width fields, a leading `size`, never a
 * struct by value. Errors come back as a status code plus a message written into a caller-provided
 * buffer (a thread-local "last error" is invisible after a Deno nonblocking call).
 *
 * Semantics of every op: docs in README.md ("The ops") and shared reference moe.md.
 * Bump MOEFFI_ABI_VERSION on any change to a struct, an enum value or a signature. */
#ifndef MOEFFI_H
#define MOEFFI_H

#include <stddef.h>
#include <stdint.h>

#define MOEFFI_ABI_VERSION 1u

#if defined(_WIN32)
#define MOEFFI_EXPORT __declspec(dllexport)
#else
#define MOEFFI_EXPORT __attribute__((visibility("default")))
#endif
#ifdef __cplusplus
#define MOEFFI_EXTERN extern "C"
#else
#define MOEFFI_EXTERN
#endif
#define MOEFFI_API MOEFFI_EXTERN MOEFFI_EXPORT

/* ---- enums (all values travel as uint32_t) ---- */
enum moeffi_op {
  MOEFFI_OP_FP8_MOE = 0,             /* fused experts: quant, GEMM1, SiLU*up, requant, GEMM2, combine */
  MOEFFI_OP_FP8_SCALED_MM = 1,       /* y[M,N] = dequant(quant(x[M,K])) @ dequant(W[N,K])^T (+ bias) */
  MOEFFI_OP_TOPK_SOFTMAX = 2,        /* router logits [M,E] -> topk ids and weights */
  MOEFFI_OP_NVFP4_EXPERTS_QUANT = 3, /* expert-grouped NVFP4 quantization, swizzled block scales */
  MOEFFI_OP_NVFP4_SILU_QUANT = 4,    /* SiLU-and-mul of GEMM 1's output, then nvfp4_experts_quant */
  MOEFFI_OP_COUNT = 5
};

/* nvfp4_silu_quant, exactly: x is GEMM 1's output, bf16 [M, 2N] in expert-contiguous rows (gate =
 * columns [0, N), up = [N, 2N)), with expert_offsets [E+1] and global_scale [E] as for
 * nvfp4_experts_quant. For each row and column c < N, with g = x[r, c], u = x[r, N + c] as fp32:
 *   e = exp(-g) correctly rounded to fp32,  h = bf16_rne(RN(RN(g / RN(1 + e)) * u)),
 * every step an IEEE fp32 round-to-nearest-even operation, a NaN h being the canonical 0x7FC0.
 * Then exactly nvfp4_experts_quant of h [M, N] (bf16): out uint8 [M, N/2], out_aux the swizzled
 * scales [M + 127 E rows, ceil(N/64) * 4]. So the fused op equals SiLU-then-quant bit for bit.
 * Problem dims: m = M, n = N (N % 16 == 0), experts = E; k is unused (0). */

enum moeffi_status {
  MOEFFI_OK = 0,
  MOEFFI_UNSUPPORTED = 1, /* this backend cannot run this problem (prepare/run called anyway) */
  MOEFFI_INVALID = 2,     /* bad input the backend caught itself (out-of-range id, bad offsets) */
  MOEFFI_DEVICE = 3,      /* a device or driver call failed */
  MOEFFI_NO_MEMORY = 4,
  MOEFFI_INTERNAL = 5
};

enum moeffi_device { MOEFFI_DEVICE_CPU = 0, MOEFFI_DEVICE_CUDA = 1 };

/* Weight scales. Block scales are [rows/128, cols/128] per matrix, ceil where not divisible. */
enum moeffi_weight_scale {
  MOEFFI_W_PER_TENSOR = 0,  /* one fp32 per matrix (per expert for fp8_moe) */
  MOEFFI_W_PER_CHANNEL = 1, /* one fp32 per output row */
  MOEFFI_W_BLOCK_128 = 2    /* one fp32 per 128x128 block */
};

/* Activation scales. */
enum moeffi_act_scale {
  MOEFFI_A_STATIC_TENSOR = 0,  /* caller gives a1_scale (and a2_scale for fp8_moe) */
  MOEFFI_A_DYNAMIC_TENSOR = 1, /* one scale from the amax of the whole batch: not batch invariant */
  MOEFFI_A_DYNAMIC_TOKEN = 2,  /* one scale per row */
  MOEFFI_A_DYNAMIC_GROUP_128 = 3 /* one scale per row and 128-wide group along K ("1x128") */
};

/* problem.flags */
#define MOEFFI_FLAG_BATCH_INVARIANT (1u << 0) /* caller requires bit-identical rows whatever the batch */
#define MOEFFI_FLAG_HAS_BIAS (1u << 1)        /* fp8_scaled_mm: bias [N] bf16 is given */
#define MOEFFI_FLAG_RENORMALIZE (1u << 2)     /* topk_softmax: topk weights renormalized to sum 1 */

/* ---- structs ---- */

/* The shape of one call. Dimension meaning per op:
 *   fp8_moe:             m tokens, k hidden, n expert intermediate, experts E, topk
 *   fp8_scaled_mm:       m rows, k in, n out
 *   topk_softmax:        m tokens, experts E (logit columns), topk
 *   nvfp4_experts_quant: m rows (already expert-contiguous), k columns, experts E
 *   nvfp4_silu_quant:    m rows (already expert-contiguous), n = half the input columns, experts E */
typedef struct moeffi_problem {
  uint32_t size; /* sizeof(moeffi_problem) */
  uint32_t op;
  int64_t m;
  int64_t n;
  int64_t k;
  int64_t experts;
  int64_t topk;
  uint32_t weight_scale; /* enum moeffi_weight_scale */
  uint32_t act_scale;    /* enum moeffi_act_scale */
  uint32_t device;       /* enum moeffi_device where the tensors live */
  int32_t device_index;  /* CUDA ordinal, -1 for the CPU */
  uint32_t flags;
  uint32_t reserved;
} moeffi_problem;

/* Canonical weights, as the user loads them (row-major). prepare() converts them once. */
typedef struct moeffi_weights {
  uint32_t size; /* sizeof(moeffi_weights) */
  uint32_t reserved;
  const void *w13;       /* fp8_moe: fp8 [E, 2N, K] (gate rows, then up rows); fp8_scaled_mm: fp8 W [N, K] */
  const void *w13_scale; /* fp32, per weight_scale: [E] | [E, 2N] | [E, ceil(2N/128), ceil(K/128)]; mm: [1] | [N] | [ceil(N/128), ceil(K/128)] */
  const void *w2;        /* fp8_moe: fp8 [E, K, N]; unused by mm */
  const void *w2_scale;  /* fp32: [E] | [E, K] | [E, ceil(K/128), ceil(N/128)] */
} moeffi_weights;

/* Per-call tensors. Unused slots are NULL. Pointers live on problem.device. */
typedef struct moeffi_tensors {
  uint32_t size; /* sizeof(moeffi_tensors) */
  uint32_t reserved;
  const void *x;            /* bf16 [M, K] (moe, mm, nvfp4); bf16 [M, 2N] (nvfp4_silu); fp32 logits [M, E] (topk) */
  const void *topk_ids;     /* int32 [M, topk] (moe input), -1 = empty slot */
  const void *topk_weights; /* fp32 [M, topk] (moe input) */
  const void *a1_scale;     /* fp32 [1], static activation scale of x */
  const void *a2_scale;     /* fp32 [1], static activation scale of the intermediate (moe) */
  const void *bias;         /* bf16 [N] (mm, with MOEFFI_FLAG_HAS_BIAS) */
  const void *expert_offsets; /* int32 [E+1] row starts (nvfp4) */
  const void *global_scale;   /* fp32 [E] (nvfp4) */
  void *out;           /* bf16 [M, K] (moe); bf16 [M, N] (mm); uint8 [M, K/2] (nvfp4; [M, N/2] silu); int32 ids [M, topk] (topk) */
  void *out_aux;       /* uint8 swizzled scales [M + 127*E rows, ceil(K/64)*4] (nvfp4; N for silu); fp32 weights [M, topk] (topk) */
  void *workspace;     /* workspace_bytes bytes on problem.device, owned by the caller */
  uint64_t workspace_bytes;
  void *stream;        /* cudaStream_t for CUDA backends; NULL = default stream; ignored on the CPU */
  uint32_t *error_flags; /* host-visible word (mapped pinned memory for CUDA); kernels OR in a
                            MOEFFI_ERROR_* bit when they meet invalid device data, and the core reads
                            it after synchronizing. NULL = do not report. */
} moeffi_tensors;

/* Bits of *tensors->error_flags. */
#define MOEFFI_ERROR_TOPK_ID (1u << 0)        /* a topk id outside [-1, E): that slot contributed nothing */
#define MOEFFI_ERROR_EXPERT_OFFSETS (1u << 1) /* expert offsets not 0..M non-decreasing: nothing written */

/* What a backend is and claims. Filled by moeffi_describe(). */
typedef struct moeffi_manifest {
  uint32_t size; /* sizeof(moeffi_manifest) */
  uint32_t abi_version;
  char name[32];     /* unique, [a-z0-9_-]; built-in names cannot be taken */
  char version[16];
  char archs[32];    /* "cpu", "sm_80+", "sm_90a", ... (informational; supported() decides) */
  uint32_t device;   /* enum moeffi_device */
  uint32_t ops;      /* bit (1 << op) per implemented op */
  uint32_t weight_scales;   /* bit (1 << moeffi_weight_scale) per supported weight scale */
  uint32_t act_scales;      /* bit (1 << moeffi_act_scale) per supported activation scheme */
  uint32_t batch_invariant_ops; /* ops whose rows are bit-identical whatever the batch */
  int32_t priority;  /* default priority; supported() may return another for a given problem */
} moeffi_manifest;

/* ---- the symbols every plugin exports ---- */

/* MOEFFI_ABI_VERSION as the plugin was compiled. */
MOEFFI_API uint32_t moeffi_abi_version(void);

/* Size and field offsets of struct `which` (0 problem, 1 weights, 2 tensors, 3 manifest) into out
 * (out[0] = size, out[1..] = offsets in declaration order). Returns the count written, or -1. */
MOEFFI_API int32_t moeffi_layout(uint32_t which, uint64_t *out, uint32_t capacity);

/* Fills *out (out->size set by the caller). Returns a status. */
MOEFFI_API int32_t moeffi_describe(moeffi_manifest *out);

/* Can this backend run the problem? Returns its priority (>= 0, larger wins) when yes and -1 when
 * no; either way a one-line reason is written into reason (NUL-terminated, truncated to capacity). */
MOEFFI_API int32_t moeffi_supported(const moeffi_problem *problem, char *reason, uint32_t capacity);

/* Exact workspace bytes run() needs for this problem, into *bytes. Returns a status. */
MOEFFI_API int32_t moeffi_workspace_size(const moeffi_problem *problem, uint64_t *bytes);

/* Converts canonical weights into the backend's own layout, once. *handle receives an opaque
 * pointer for run() (NULL is allowed for ops without weights). The canonical weights are not
 * referenced after prepare returns. Returns a status; message gets the reason on failure. */
MOEFFI_API int32_t moeffi_prepare(const moeffi_problem *problem, const moeffi_weights *weights,
                                  void **handle, char *message, uint32_t capacity);

/* Frees what prepare made. NULL is a no-op. */
MOEFFI_API void moeffi_release(void *handle);

/* Runs the op. CUDA backends enqueue on tensors->stream and return without synchronizing.
 * Returns a status; message gets the reason on failure. */
MOEFFI_API int32_t moeffi_run(const moeffi_problem *problem, void *handle, const moeffi_tensors *tensors,
                              char *message, uint32_t capacity);

/* ---- helpers for plugin authors ---- */

/* Implements moeffi_layout() from this header's own view of the structs: a plugin built against
 * another header version reports other offsets and the core rejects it. Use once per plugin. */
#define MOEFFI_F(s, f) (uint64_t) offsetof(s, f)
#define MOEFFI_DEFINE_LAYOUT()                                                                      \
  MOEFFI_API int32_t moeffi_layout(uint32_t which, uint64_t *out, uint32_t capacity) {              \
    uint64_t p[] = {sizeof(moeffi_problem), MOEFFI_F(moeffi_problem, op), MOEFFI_F(moeffi_problem, m),  \
                    MOEFFI_F(moeffi_problem, n), MOEFFI_F(moeffi_problem, k),                       \
                    MOEFFI_F(moeffi_problem, experts), MOEFFI_F(moeffi_problem, topk),              \
                    MOEFFI_F(moeffi_problem, weight_scale), MOEFFI_F(moeffi_problem, act_scale),    \
                    MOEFFI_F(moeffi_problem, device), MOEFFI_F(moeffi_problem, device_index),       \
                    MOEFFI_F(moeffi_problem, flags)};                                               \
    uint64_t w[] = {sizeof(moeffi_weights), MOEFFI_F(moeffi_weights, w13),                          \
                    MOEFFI_F(moeffi_weights, w13_scale), MOEFFI_F(moeffi_weights, w2),              \
                    MOEFFI_F(moeffi_weights, w2_scale)};                                            \
    uint64_t t[] = {sizeof(moeffi_tensors), MOEFFI_F(moeffi_tensors, x),                            \
                    MOEFFI_F(moeffi_tensors, topk_ids), MOEFFI_F(moeffi_tensors, topk_weights),     \
                    MOEFFI_F(moeffi_tensors, a1_scale), MOEFFI_F(moeffi_tensors, a2_scale),         \
                    MOEFFI_F(moeffi_tensors, bias), MOEFFI_F(moeffi_tensors, expert_offsets),       \
                    MOEFFI_F(moeffi_tensors, global_scale), MOEFFI_F(moeffi_tensors, out),          \
                    MOEFFI_F(moeffi_tensors, out_aux), MOEFFI_F(moeffi_tensors, workspace),         \
                    MOEFFI_F(moeffi_tensors, workspace_bytes), MOEFFI_F(moeffi_tensors, stream),    \
                    MOEFFI_F(moeffi_tensors, error_flags)};                                         \
    uint64_t f[] = {sizeof(moeffi_manifest), MOEFFI_F(moeffi_manifest, abi_version),                \
                    MOEFFI_F(moeffi_manifest, name), MOEFFI_F(moeffi_manifest, version),            \
                    MOEFFI_F(moeffi_manifest, archs), MOEFFI_F(moeffi_manifest, device),            \
                    MOEFFI_F(moeffi_manifest, ops), MOEFFI_F(moeffi_manifest, weight_scales),       \
                    MOEFFI_F(moeffi_manifest, act_scales),                                          \
                    MOEFFI_F(moeffi_manifest, batch_invariant_ops),                                 \
                    MOEFFI_F(moeffi_manifest, priority)};                                           \
    const uint64_t *src[] = {p, w, t, f};                                                           \
    const uint32_t len[] = {sizeof p / 8, sizeof w / 8, sizeof t / 8, sizeof f / 8};                \
    if (which > 3 || !out || capacity < len[which]) return -1;                                      \
    for (uint32_t i = 0; i < len[which]; i++) out[i] = src[which][i];                               \
    return (int32_t)len[which];                                                                     \
  }

/* Every weight / activation scheme, for manifests that take them all. */
#define MOEFFI_ALL_WEIGHT_SCALES ((1u << MOEFFI_W_PER_TENSOR) | (1u << MOEFFI_W_PER_CHANNEL) | (1u << MOEFFI_W_BLOCK_128))
#define MOEFFI_ALL_ACT_SCALES                                                                       \
  ((1u << MOEFFI_A_STATIC_TENSOR) | (1u << MOEFFI_A_DYNAMIC_TENSOR) | (1u << MOEFFI_A_DYNAMIC_TOKEN) | \
   (1u << MOEFFI_A_DYNAMIC_GROUP_128))

/* Fills *out for moeffi_describe(): checks the caller's size, clears the struct and sets the version
 * fields, so a plugin states only what it is. Strings longer than their field are truncated. */
#include <string.h>
static inline int32_t moeffi_fill_manifest(moeffi_manifest *out, const char *name, const char *version,
                                           const char *archs, uint32_t device, uint32_t ops,
                                           uint32_t weight_scales, uint32_t act_scales,
                                           uint32_t batch_invariant_ops, int32_t priority) {
  if (!out || out->size < sizeof(moeffi_manifest)) return MOEFFI_INVALID;
  memset(out, 0, sizeof *out);
  out->size = sizeof *out;
  out->abi_version = MOEFFI_ABI_VERSION;
  strncpy(out->name, name, sizeof out->name - 1);
  strncpy(out->version, version, sizeof out->version - 1);
  strncpy(out->archs, archs, sizeof out->archs - 1);
  out->device = device;
  out->ops = ops;
  out->weight_scales = weight_scales;
  out->act_scales = act_scales;
  out->batch_invariant_ops = batch_invariant_ops;
  out->priority = priority;
  return MOEFFI_OK;
}

/* Writes a formatted, truncated, NUL-terminated message into (buf, capacity); tolerates NULL. */
#include <stdarg.h>
#include <stdio.h>
static inline void moeffi_say(char *buf, uint32_t capacity, const char *fmt, ...) {
  if (!buf || capacity == 0) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, capacity, fmt, ap);
  va_end(ap);
}

#endif /* MOEFFI_H */
