/* example_topk.c: a complete moeffi backend plugin, small enough to read in one sitting.
 *
 * It implements ONE op of backends/moeffi.h, topk_softmax, on the CPU, and computes exactly what the
 * built-in reference computes (backends/reference/reference.c, run_topk_softmax), so its ids and
 * weights equal the reference's bit for bit. Its priority (5) is above the reference's (0), so once it
 * is loaded the oracle picks it for every topk_softmax problem it says yes to; everything else still
 * goes to the other backends. Copy this file as the starting point of your own plugin.
 *
 * Build (walkthrough: examples/plugin/README.md):
 *   cc -std=c11 -O2 -Wall -Wextra -fPIC -shared -fvisibility=hidden -I backends \
 *      examples/plugin/example_topk.c -o <dir>/libexample_topk.so -lm
 * then run with MOEFFI_PLUGIN_PATH=<dir>, or new Context({ pluginPaths: [<dir>] }).
 *
 * The op, as moeffi.h and the reference define it. Router logits x are fp32 [M, E]; for each row:
 *   mx  = the largest logit (a plain running maximum from column 0),
 *   sum = sum over e = 0 .. E-1, in that order, of expf(x[e] - mx), in fp32,
 *   slot s (0 .. topk-1) takes the expert with the s-th largest logit, ties to the lower id,
 *   ids[s] = that expert (int32, into tensors->out),
 *   weights[s] = expf(x[id] - mx) / sum (fp32, into tensors->out_aux),
 *   with MOEFFI_FLAG_RENORMALIZE: weights[s] /= (weights[0] + ... + weights[topk-1]), summed in slot order.
 * Every step is one IEEE fp32 operation in a fixed order, which is what makes "bit for bit" possible:
 * do not reorder the sum, and do not build with -ffast-math. The core has already checked the tensor
 * shapes and that every logit is finite before run() is called. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "moeffi.h"

#define NAME "example_topk"
#define PRIORITY 5
/* Claim only what your tests cover: tests/example_plugin.test.ts compares this plugin with the
 * reference for experts up to 300 and topk up to 8, so larger problems are refused (and go to the
 * reference). Real routers are inside these limits (DeepSeek-V3: 256 experts, top-8). */
#define MAX_EXPERTS 300
#define MAX_TOPK 8
/* The problem flags this op understands; any other bit is refused rather than ignored. */
#define KNOWN_FLAGS (MOEFFI_FLAG_BATCH_INVARIANT | MOEFFI_FLAG_RENORMALIZE)

/* Symbol 1: the ABI version this file was compiled against. A plugin built against another header
 * version is skipped by the core with "ABI version N, core expects M". */
MOEFFI_API uint32_t moeffi_abi_version(void) { return MOEFFI_ABI_VERSION; }

/* Symbol 2: moeffi_layout, the size and field offsets of every struct as this compiler laid them out.
 * The macro writes the whole function; the core compares it with its own view of the structs. */
MOEFFI_DEFINE_LAYOUT()

/* Symbol 3: who we are and what we claim. The core calls it once, at load. */
MOEFFI_API int32_t moeffi_describe(moeffi_manifest *out) {
  if (!out || out->size < sizeof(moeffi_manifest)) return MOEFFI_INVALID;
  memset(out, 0, sizeof *out); /* unused fields (weight_scales, act_scales: topk has none) stay 0 */
  out->size = sizeof *out;
  out->abi_version = MOEFFI_ABI_VERSION;
  strcpy(out->name, NAME); /* 1-31 of [a-z0-9_-]; built-in names (reference, fallback, ...) are refused */
  strcpy(out->version, "0.1.0");
  strcpy(out->archs, "cpu"); /* informational; supported() decides */
  out->device = MOEFFI_DEVICE_CPU;
  out->ops = 1u << MOEFFI_OP_TOPK_SOFTMAX;
  out->batch_invariant_ops = out->ops; /* each row depends on that row only, in a fixed order */
  out->priority = PRIORITY;
  return MOEFFI_OK;
}

/* One check shared by supported(), workspace_size(), prepare() and run(), so that they refuse the
 * same problems with the same words. Returns a status and writes the reason into (msg, cap). */
static int32_t check_problem(const moeffi_problem *p, char *msg, uint32_t cap) {
  if (!p) {
    moeffi_say(msg, cap, "problem is NULL");
    return MOEFFI_INVALID;
  }
  if (p->size < sizeof(moeffi_problem)) {
    moeffi_say(msg, cap, "problem struct too small (%u bytes)", p->size);
    return MOEFFI_INVALID;
  }
  if (p->op != MOEFFI_OP_TOPK_SOFTMAX) {
    moeffi_say(msg, cap, NAME " implements topk_softmax only (op %u asked)", p->op);
    return MOEFFI_UNSUPPORTED;
  }
  if (p->device != MOEFFI_DEVICE_CPU) {
    moeffi_say(msg, cap, NAME " runs on the CPU; tensors are on device %u (index %d)", p->device, p->device_index);
    return MOEFFI_UNSUPPORTED;
  }
  if (p->flags & ~(uint32_t)KNOWN_FLAGS) {
    moeffi_say(msg, cap, NAME " does not know problem flags 0x%x", p->flags & ~(uint32_t)KNOWN_FLAGS);
    return MOEFFI_UNSUPPORTED;
  }
  if (p->m < 0 || p->m > INT32_MAX || p->experts < 1 || p->topk < 1 || p->topk > p->experts) {
    moeffi_say(msg, cap, "bad topk_softmax shape: m = %lld, experts = %lld, topk = %lld", (long long)p->m,
               (long long)p->experts, (long long)p->topk);
    return MOEFFI_INVALID;
  }
  if (p->experts > MAX_EXPERTS || p->topk > MAX_TOPK) {
    moeffi_say(msg, cap, NAME " is tested for experts <= %d and topk <= %d; got experts = %lld, topk = %lld",
               MAX_EXPERTS, MAX_TOPK, (long long)p->experts, (long long)p->topk);
    return MOEFFI_UNSUPPORTED;
  }
  return MOEFFI_OK;
}

/* Symbol 4: can we run this problem? Our priority (>= 0, larger wins) or -1, and a one-line reason
 * either way: the reason is what context.explain(), MOEFFI_LOG=debug and `deno task doctor` show. */
MOEFFI_API int32_t moeffi_supported(const moeffi_problem *problem, char *reason, uint32_t capacity) {
  if (check_problem(problem, reason, capacity) != MOEFFI_OK) return -1;
  moeffi_say(reason, capacity, "example plugin: exact CPU topk_softmax (single thread)");
  return PRIORITY;
}

/* Symbol 5: exact scratch bytes run() needs. We need none; the caller would own it otherwise. */
MOEFFI_API int32_t moeffi_workspace_size(const moeffi_problem *problem, uint64_t *bytes) {
  if (!bytes) return MOEFFI_INVALID;
  *bytes = 0;
  return check_problem(problem, NULL, 0);
}

/* Symbol 6: convert canonical weights once. topk_softmax has no weights, so the handle is NULL (the
 * ABI allows that). A backend with weights would copy them here: they are not valid after return. */
MOEFFI_API int32_t moeffi_prepare(const moeffi_problem *problem, const moeffi_weights *weights, void **handle,
                                  char *message, uint32_t capacity) {
  (void)weights;
  if (!handle) {
    moeffi_say(message, capacity, "handle is NULL");
    return MOEFFI_INVALID;
  }
  *handle = NULL;
  return check_problem(problem, message, capacity);
}

/* Symbol 7: free what prepare() made. We made nothing; NULL must be a no-op anyway. */
MOEFFI_API void moeffi_release(void *handle) { (void)handle; }

/* Does expert a rank before expert b? Larger logit first, then the lower id. */
static inline int ranks_before(const float *l, int64_t a, int64_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); }

/* Symbol 8: run the op. On the CPU, return when the outputs are written (Deno calls this on a worker
 * thread, so keep it reentrant: no globals). Validate every pointer before touching memory and
 * return a status with a message: the core raises it as a MoeffiError naming this backend. */
MOEFFI_API int32_t moeffi_run(const moeffi_problem *problem, void *handle, const moeffi_tensors *tensors, char *message,
                              uint32_t capacity) {
  (void)handle; /* always NULL here: see prepare() */
  int32_t st = check_problem(problem, message, capacity);
  if (st != MOEFFI_OK) return st;
  if (!tensors || tensors->size < sizeof(moeffi_tensors)) {
    moeffi_say(message, capacity, "tensors struct is NULL or too small");
    return MOEFFI_INVALID;
  }
  const int64_t M = problem->m, E = problem->experts, topk = problem->topk;
  /* A NULL tensor is an error only when it has elements (M = 0 is a valid, empty call). */
  if (M > 0 && (!tensors->x || !tensors->out || !tensors->out_aux)) {
    moeffi_say(message, capacity, "tensors->%s is NULL", !tensors->x ? "x" : !tensors->out ? "out" : "out_aux");
    return MOEFFI_INVALID;
  }
  const float *logits = tensors->x;
  int32_t *ids = tensors->out;
  float *weights = tensors->out_aux;
  const int renormalize = (problem->flags & MOEFFI_FLAG_RENORMALIZE) != 0;

  for (int64_t r = 0; r < M; r++) {
    const float *l = logits + r * E;
    float mx = l[0], sum = 0.0f, chosen = 0.0f;
    for (int64_t e = 1; e < E; e++) mx = l[e] > mx ? l[e] : mx;
    for (int64_t e = 0; e < E; e++) sum += expf(l[e] - mx); /* expert order: do not reorder */
    /* Slot s takes the best expert ranking after slot s-1's: no sort, no scratch, and ties are
     * broken the same way on every call. O(topk * E) per row, fine for topk <= 8. */
    int64_t prev = -1;
    for (int64_t s = 0; s < topk; s++) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; e++)
        if ((prev < 0 || ranks_before(l, prev, e)) && (best < 0 || ranks_before(l, e, best))) best = e;
      const float w = expf(l[best] - mx) / sum;
      ids[r * topk + s] = (int32_t)best;
      weights[r * topk + s] = w;
      chosen += w; /* slot order */
      prev = best;
    }
    if (renormalize)
      for (int64_t s = 0; s < topk; s++) weights[r * topk + s] /= chosen;
  }
  return MOEFFI_OK;
}

/* That is all eight functions declared in moeffi.h (moeffi_layout comes from the macro). Bun refuses
 * to open a library that lacks any one of them, so a plugin exports all eight even when some
 * (prepare, release, workspace_size here) have nothing to do. */
