// numerics.cuh: the number formats of moeffi (shared/reference/moe.md sections 2 and 4), bit for bit
// the same as backends/reference/reference.c. Everything here is __host__ __device__ so a host
// program can check it exhaustively against the reference without a GPU.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MOEFFI_HD __host__ __device__ __forceinline__

namespace moeffi {

constexpr float FP8_MAX = 448.0f;
constexpr float MIN_SCALE = 1.0f / (FP8_MAX * 512.0f);
constexpr int QBLK = 128; // K block of block scales, 1x128 groups and fp32 promotion

MOEFFI_HD uint32_t bits_of(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

MOEFFI_HD float float_of(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// IEEE round-to-nearest arithmetic that nvcc never fuses into an FMA nor approximates (even under
// --use_fast_math), so each step rounds exactly where the reference's does.
MOEFFI_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

MOEFFI_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

MOEFFI_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

MOEFFI_HD float bf16_to_f32(uint16_t h) { return float_of((uint32_t)h << 16); }

// Round to nearest even; NaN keeps its sign and becomes the quiet 0x7FC0 (as the reference).
MOEFFI_HD uint16_t f32_to_bf16(float f) {
  const uint32_t u = bits_of(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)(((u >> 16) & 0x8000u) | 0x7FC0u);
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// fp32 -> e4m3fn, round to nearest even, saturating to +-448. In software rather than
// __nv_cvt_float_to_fp8: the sm_89+ instruction returns 0x7F for every NaN where the reference
// keeps the sign (0xFF), and software gives the same bits on every architecture.
MOEFFI_HD uint8_t f32_to_e4m3(float f) {
  const uint32_t u = bits_of(f), a = u & 0x7FFFFFFFu;
  const uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
  if (a > 0x7F800000u) return sign | 0x7Fu;  // NaN
  if (a >= 0x43E00000u) return sign | 0x7Eu; // >= 448, inf included
  if (a >= 0x3C800000u) {                    // >= 2^-6: normal; round away the 20 low bits
    const uint32_t r = (a + 0x7FFFFu + ((a >> 20) & 1u)) >> 20;
    return sign | (uint8_t)(r - (120u << 3)); // rebias the exponent 127 -> 7
  }
  const uint32_t e = a >> 23; // subnormal: count units of 2^-9
  if (e < 117) return sign;   // below 2^-10, the half unit
  const uint32_t m = (a & 0x7FFFFFu) | 0x800000u, shift = 141 - e;
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
  q += rem > half || (rem == half && (q & 1u));
  return sign | (uint8_t)q; // q == 8 is 2^-6, the first normal code
}

MOEFFI_HD float e4m3_to_f32(uint8_t c) {
  const uint32_t sign = (uint32_t)(c & 0x80u) << 24, e = (c >> 3) & 15u, m = c & 7u;
  if (e == 15 && m == 7) return float_of(sign | 0x7FC00000u); // NaN
  if (e == 0) return float_of(sign | bits_of((float)m * 0.001953125f)); // m * 2^-9, exact
  return float_of(sign | ((e + 120u) << 23) | (m << 20));
}

// fp32 -> e2m1 (0, .5, 1, 1.5, 2, 3, 4, 6): RNE with ties to the even code, saturating; the sign
// comes from the float's sign bit (-0 gives 0x8); NaN fails every comparison and lands on 6.
MOEFFI_HD uint8_t f32_to_e2m1(float f) {
  const uint8_t sign = (uint8_t)((bits_of(f) >> 28) & 0x8u);
  const float a = fabsf(f);
  const uint8_t q = a <= 0.25f ? 0 : a < 0.75f ? 1 : a <= 1.25f ? 2 : a < 1.75f ? 3
                  : a <= 2.5f  ? 4 : a < 3.5f  ? 5 : a <= 5.0f  ? 6 : 7;
  return sign | q;
}

// max(m, |v|) as the reference's amax_of: a NaN v never wins. (fmaxf is not the same: glibc's
// returns NaN for a signaling NaN.)
MOEFFI_HD float amax_step(float m, float v) {
  const float a = fabsf(v);
  return a > m ? a : m;
}

// v * s as the reference gets it on the CPU, where a NaN v comes out with its own sign; GPU
// arithmetic returns the canonical positive NaN, which would change the sign bit of the code.
MOEFFI_HD float scale_value(float v, float s) { return v != v ? v : mul_rn(v, s); }

// Dynamic fp8 scale of a group whose largest magnitude is amax (NaN never enters an amax).
MOEFFI_HD float dynamic_scale(float amax) { return fmaxf(div_rn(amax, FP8_MAX), MIN_SCALE); }

// h = silu(g) * u, in the reference's order of roundings (expf differs from glibc by an ulp at most).
MOEFFI_HD float silu_mul(float g, float u) { return mul_rn(div_rn(g, add_rn(1.0f, expf(-g))), u); }

// One 16-element NVFP4 block: x[16] bf16 -> out[8] e2m1 pairs (low nibble first); returns the e4m3
// scale code.
MOEFFI_HD uint8_t nvfp4_block(const uint16_t *x, float gs, uint8_t *out) {
  float v[16], amax = 0.0f;
  for (int k = 0; k < 16; k++) {
    v[k] = bf16_to_f32(x[k]);
    amax = amax_step(amax, v[k]);
  }
  const uint8_t code = f32_to_e4m3(mul_rn(gs, div_rn(amax, 6.0f)));
  const float sf = e4m3_to_f32(code);
  const float scale = sf != 0.0f ? div_rn(1.0f, mul_rn(sf, div_rn(1.0f, gs))) : 0.0f;
  for (int k = 0; k < 16; k += 2)
    out[k / 2] = (uint8_t)(f32_to_e2m1(scale_value(v[k], scale)) | (f32_to_e2m1(scale_value(v[k + 1], scale)) << 4));
  return code;
}

// Byte of the 128x4-swizzled scale of row i (inside its expert) and scale column c; expert_base is
// the expert's first scale row (each expert starts on a 128-row tile), ktiles = ceil(K / 64).
MOEFFI_HD int64_t nvfp4_scale_offset(int64_t expert_base, int64_t ktiles, int64_t i, int64_t c) {
  return expert_base * ktiles * 4 + ((i / 128) * ktiles + c / 4) * 512 + (i % 32) * 16 + ((i % 128) / 32) * 4 + c % 4;
}

} // namespace moeffi
