// Host checks of the number-format shortcuts in cuda/numerics.cuh that the nvfp4 backend relies on
// (no GPU needed; nvcc compiles the __host__ __device__ code for the host). Exhaustive unless QUICK:
//   nvcc -O2 -Xcompiler -fopenmp -I cuda -I backends tests/nvfp4_numerics_check.cu -o /tmp/nc && /tmp/nc
//   (about a minute on 2 cores; `/tmp/nc quick` samples the 2^32 inputs 1 in 61: tests/nvfp4_numerics.test.ts)
// 1. f32_to_e2m1 (the magic-add form) against the comparison chain of backends/reference/reference.c.
// 2. f32_to_e4m3_value against f32_to_e4m3 and e4m3_to_f32 (code and value bits).
// 3. div6_bf16 against IEEE division for every non-negative bf16 value.
// 4. exp(-g) in double, rounded once, is the correctly rounded fp32 exp for every bf16 g: the exact
//    value (long double) lies at least 4 double ulps from every fp32 rounding midpoint, so any exp()
//    within 1 ulp (glibc, CUDA, V8, JavaScriptCore) rounds to the same fp32.
// 5. The device fast path of silu_mul_bf16 with e = the correctly rounded exp moved by up to 2 fp32 ulps
//    (CUDA's expf bound): when it keeps h, h is the bf16 of the exact definition (random u per g).
// 6. bf16x8_sign_nibbles (prmt) against a plain loop, on random words (the host prmt follows the PTX
//    ISA; the GPU suite checks the device one through NaN and negative-zero inputs).
// Prints one line per check and `N passed, N failed`.
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "numerics.cuh"

using namespace moeffi;

static uint8_t e2m1_chain(float f) { // reference.c's f32_to_e2m1
  const uint8_t sign = (uint8_t)((bits_of(f) >> 28) & 0x8u);
  const float a = fabsf(f);
  const uint8_t q = a <= 0.25f ? 0 : a < 0.75f ? 1 : a <= 1.25f ? 2 : a < 1.75f ? 3 : a <= 2.5f ? 4 : a < 3.5f ? 5 : a <= 5.0f ? 6 : 7;
  return sign | q;
}

// The device fast path of silu_mul_bf16 (numerics.cuh) for a given e; -1 where it defers.
static int silu_fast(float g, float u, float e) {
  const float s = div_rn(g, add_rn(1.0f, e)), h = mul_rn(s, u);
  const uint32_t bs = (bits_of(s) >> 23) & 0xFFu, bh = (bits_of(h) >> 23) & 0xFFu;
  const int mid = (int)(bits_of(h) & 0xFFFFu) - 0x8000;
  const bool stable = (g > -80.0f && bs >= 27u && bs <= 254u && bh >= 27u && bh <= 254u && (mid > 64 || mid < -64)) ||
                      ((g == 0.0f || u == 0.0f) && h == h);
  return stable ? f32_to_bf16(h) : -1;
}

int main(int argc, char **argv) {
  const bool quick = argc > 1 && !strcmp(argv[1], "quick");
  const int64_t step = quick ? 61 : 1;
  int passed = 0, failed = 0;
  auto report = [&](const char *what, long bad, long cases) {
    printf("%s: %ld of %ld cases differ\n", what, bad, cases);
    bad ? failed++ : passed++;
  };

  long bad = 0, cases = 0;
#pragma omp parallel for reduction(+ : bad, cases) schedule(static)
  for (int64_t i = 0; i < (1ll << 32); i += step) {
    const float f = float_of((uint32_t)i);
    bad += f32_to_e2m1(f) != e2m1_chain(f);
    cases++;
  }
  report("f32_to_e2m1 vs the comparison chain", bad, cases);

  bad = 0, cases = 0;
#pragma omp parallel for reduction(+ : bad, cases) schedule(static)
  for (int64_t i = 0; i < (1ll << 32); i += step) {
    const float f = float_of((uint32_t)i);
    float v;
    const uint8_t c = f32_to_e4m3_value(f, &v), want = f32_to_e4m3(f);
    bad += c != want || bits_of(v) != bits_of(e4m3_to_f32(want));
    cases++;
  }
  report("f32_to_e4m3_value vs f32_to_e4m3 + e4m3_to_f32", bad, cases);

  bad = 0, cases = 0;
  for (uint32_t h = 0; h < 0x8000u; h++) {
    const float a = bf16_to_f32((uint16_t)h);
    if (a != a) continue;
    bad += bits_of(div6_bf16(a)) != bits_of(div_rn(a, 6.0f));
    cases++;
  }
  report("div6_bf16 vs a / 6 over the non-negative bf16 values", bad, cases);

  bad = 0, cases = 0;
  double worst = 1e9;
  for (uint32_t h = 0; h < 0x10000u; h++) {
    const float g = bf16_to_f32((uint16_t)h);
    if (g != g) continue;
    const long double e = expl(-(long double)g);
    cases++;
    bad += bits_of((float)e) != bits_of((float)exp(-(double)g));
    if (e == 0 || isinf(e) || e > 3.4e38L || e < 0x1p-149L) continue;
    int ex;
    frexpl(e, &ex);
    const long double fulp = ldexpl(1.0L, ex - 24 < -149 ? -149 : ex - 24), pos = e / fulp;
    const long double dist = fabsl(pos - floorl(pos) - 0.5L) * fulp, dulp = ldexpl(1.0L, ex - 53 < -1074 ? -1074 : ex - 53);
    worst = fmin(worst, (double)(dist / dulp));
  }
  bad += worst < 4.0;
  printf("exp(-g) midpoint margin over the bf16 g: %.1f double ulps at least\n", worst);
  report("(float)exp((double)-g) is correctly rounded for every bf16 g", bad, cases);

  bad = 0, cases = 0;
  const int per_g = quick ? 200 : 4000;
#pragma omp parallel for reduction(+ : bad, cases) schedule(dynamic, 64)
  for (int gi = 0; gi < 0x10000; gi++) {
    const float g = bf16_to_f32((uint16_t)gi), ecr = (float)exp(-(double)g);
    if (g != g) continue;
    uint32_t st = 0x9E3779B9u * (uint32_t)(gi + 1);
    for (int k = 0; k < per_g; k++) {
      st ^= st << 13, st ^= st >> 17, st ^= st << 5;
      uint16_t ub = (uint16_t)st; // mostly |u| in [2^-8, 2^9), one in 8 any bf16
      if (k % 8) ub = (uint16_t)((ub & 0x807Fu) | ((119u + (st >> 16) % 17u) << 7));
      const float u = bf16_to_f32(ub);
      const uint16_t want = silu_h_bf16(silu_h_of(g, u, ecr));
      for (int d = -2; d <= 2; d++) {
        const uint32_t eb = bits_of(ecr);
        if ((d < 0 && eb < (uint32_t)-d) || (d > 0 && eb >= 0x7F800000u)) continue;
        const int got = silu_fast(g, u, float_of(eb + d));
        cases++;
        bad += got >= 0 && (uint16_t)got != want;
      }
    }
  }
  report("silu_mul_bf16 fast path with expf within 2 ulps", bad, cases);

  bad = 0, cases = 0;
  uint32_t st = 12345;
  for (int i = 0; i < 1000000; i++) {
    uint32_t w[4], want = 0;
    for (int k = 0; k < 4; k++) {
      st ^= st << 13, st ^= st >> 17, st ^= st << 5;
      w[k] = st;
      want |= ((w[k] >> 15) & 1u) << (8 * k + 3) | ((w[k] >> 31) & 1u) << (8 * k + 7);
    }
    bad += bf16x8_sign_nibbles(w[0], w[1], w[2], w[3]) != want;
    cases++;
  }
  report("bf16x8_sign_nibbles vs a loop", bad, cases);

  printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
