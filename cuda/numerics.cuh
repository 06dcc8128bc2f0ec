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
#ifdef __CUDACC__
// Four or eight consecutive bf16 values, loaded as one 8- or 16-byte word, as floats (exact).
__device__ __forceinline__ void bf16x4_values(const uint2 &b, float (&v)[4]) {
  v[0] = float_of(b.x << 16), v[1] = float_of(b.x & 0xFFFF0000u), v[2] = float_of(b.y << 16), v[3] = float_of(b.y & 0xFFFF0000u);
}
__device__ __forceinline__ void bf16x8_values(const uint4 &b, float (&v)[8]) {
  const uint32_t w[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int k = 0; k < 4; k++) v[2 * k] = float_of(w[k] << 16), v[2 * k + 1] = float_of(w[k] & 0xFFFF0000u);
}
#endif

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

// f32_to_e4m3(f), and in *value what e4m3_to_f32 decodes from it, in one pass without branches:
// |f| + 2^20 times its binade (at least 2^14: the subnormal step 2^-9, at most 2^28) rounds |f| to 3
// mantissa bits, ties to even; the sum gives the subnormal codes, the rounded value the normal ones.
// The same code and value bits as the two functions for every one of the 2^32 inputs (checked
// exhaustively, tests/nvfp4_numerics_check.cu).
MOEFFI_HD uint8_t f32_to_e4m3_value(float f, float *value) {
  const uint32_t u = bits_of(f), a = u & 0x7FFFFFFFu, sign = u & 0x80000000u;
  uint32_t m = (a & 0x7F800000u) + (20u << 23);
  m = m < 0x46800000u ? 0x46800000u : m > 0x4D800000u ? 0x4D800000u : m;
  const float sum = add_rn(float_of(a), float_of(m)), r = add_rn(sum, -float_of(m)); // exact
  uint32_t code = r < 0.015625f ? bits_of(sum) - m : (bits_of(r) >> 20) - 960u;    // below 2^-6: units of 2^-9
  code = code < 0x7Eu ? code : 0x7Eu;                                               // saturate to 448
  const float v = r < 448.0f ? r : 448.0f;
  if (a > 0x7F800000u) {                                                            // NaN
    *value = float_of(sign | 0x7FC00000u);
    return (uint8_t)((sign >> 24) | 0x7Fu);
  }
  *value = float_of(bits_of(v) | sign);
  return (uint8_t)((sign >> 24) | code);
}

MOEFFI_HD float e4m3_to_f32(uint8_t c) {
  const uint32_t sign = (uint32_t)(c & 0x80u) << 24, e = (c >> 3) & 15u, m = c & 7u;
  if (e == 15 && m == 7) return float_of(sign | 0x7FC00000u); // NaN
  if (e == 0) return float_of(sign | bits_of((float)m * 0.001953125f)); // m * 2^-9, exact
  return float_of(sign | ((e + 120u) << 23) | (m << 20));
}

// fp32 -> e2m1 (0, .5, 1, 1.5, 2, 3, 4, 6): RNE with ties to the even code, saturating; the sign
// comes from the float's sign bit (-0 gives 0x8); NaN lands on 6 (code 7), as in the reference's
// comparison chain (a <= 0.25 ? 0 : a < 0.75 ? 1 : ... : a <= 5 ? 6 : 7). Computed without that
// chain: |f| + 2^22, 2^23 or 2^24 (by |f|'s binade: below 2, below 4, above; more from 8 on, which
// saturates) rounds |f| to the e2m1 step of its binade (0.5, 1, 2) and the sum's low bits count the
// steps; RN ties go to even step counts, which are the even codes. Half the instructions of the
// chain, and the same code for every one of the 2^32 inputs (checked exhaustively against the chain,
// tests/nvfp4_numerics_check.cu).
MOEFFI_HD uint32_t e2m1_magnitude(float f) { // the code of |f|, 0..7
#ifdef __CUDA_ARCH__
  const float a = fminf(fabsf(f), 16.0f); // NaN and everything from 16 on give 16, hence 7
#else
  const float a = fabsf(f) < 16.0f ? fabsf(f) : 16.0f;
#endif
  uint32_t m = (bits_of(a) & 0x7F800000u) + 0x0B000000u; // 2^22 times a's binade, at least 2^22
  m = m < 0x4A800000u ? 0x4A800000u : m;
  const int n = (int)(bits_of(add_rn(a, float_of(m))) - m) + (int)((m - 0x4A800000u) >> 22);
  return (uint32_t)(n < 7 ? n : 7);
}

// e2m1_magnitude(f) in a form that packs cheaply: the bits of r = RN(|f| to its e2m1 step) + 2,
// capped at 7 (|f| capped at 6 first, NaN included), which are exactly (512 + code) << 21 (r lies on
// the grid 2, 2.5, 3, 3.5, 4, 5, 6, 7, whose low 21 bits are zero). |f| + 2^22 times its binade (at
// least 1) rounds as in e2m1_magnitude, in one FMA, and the same binade gives m - 2 exactly, so one
// subtraction (exact: Sterbenz) gives r. About 7 instructions a value and no shift to pack it
// (e2m1x8_magnitudes). Checked against e2m1_magnitude for all 2^32 inputs (backends/nvfp4/NOTES.md).
MOEFFI_HD uint32_t e2m1_magnitude_field(float f) {
#ifdef __CUDA_ARCH__
  const float a = fminf(fabsf(f), 6.0f); // NaN gives 6, hence 7
  const float e = __uint_as_float(max(__float_as_uint(a), 0x3F800000u) & 0x7F800000u); // binade, at least 1
  const float sum = __fmaf_rn(e, 4194304.0f, a), m2 = __fmaf_rn(e, 4194304.0f, -2.0f);
  return __float_as_uint(fminf(__fadd_rn(sum, -m2), 7.0f));
#else
  const float a = fabsf(f) < 6.0f ? fabsf(f) : 6.0f;
  const uint32_t ab = bits_of(a);
  const float e = float_of((ab > 0x3F800000u ? ab : 0x3F800000u) & 0x7F800000u);
  const float sum = fmaf(e, 4194304.0f, a), m2 = fmaf(e, 4194304.0f, -2.0f);
  const float r = sum - m2;
  return bits_of(r < 7.0f ? r : 7.0f);
#endif
}

// The e2m1 magnitude codes of x[0..7] packed a nibble each (x[j] at bits 4j..4j+2): each field is
// (512 + code) << 21 with zero low bits, so shifting it by 4j - 21 places 512 + code at nibble j
// (mod 2^32), and one constant removes the 512s at the end.
MOEFFI_HD uint32_t e2m1x8_magnitudes(const float (&x)[8]) {
  uint32_t acc = 0, bias = 0;
#pragma unroll
  for (int j = 0; j < 8; j++) {
    const uint32_t fb = e2m1_magnitude_field(x[j]);
    acc += 4 * j >= 21 ? fb << (4 * j - 21) : fb >> (21 - 4 * j);
    bias += 512u << (4 * j);
  }
  return acc - bias;
}

// e2m1_magnitude(f) as the bits 0x4A800000 + code of a float in [2^22, 2^22 + 3.5]: with a = min(|f|, 6)
// (NaN gives 6), the e2m1 grid 0, .5, 1, 1.5 | 2, 3 | 4, 6 is y = min(a, 1 + a/2, 2 + a/4) on the even
// grid 0, .5, ..., 3.5 (the three pieces meet at a = 2 and 4), and RN to that grid is 2^22 + y
// rounded to fp32. Each piece is one rounding of an exact value (a + 2^22, fma(a, 1/2, 2^22 + 1),
// fma(a, 1/4, 2^22 + 2)), and RN is monotone, so the min of the rounded pieces is the rounded min;
// ties go to even steps, the even codes. 3 FMA-pipe operations and 3 min (the cap included), against 3
// and 4 for e2m1_magnitude_field. The same code as e2m1_magnitude for every one of the 2^32 inputs
// (checked exhaustively on the host, backends/nvfp4/NOTES.md).
MOEFFI_HD uint32_t e2m1_code_bits(float f) {
#ifdef __CUDA_ARCH__
  const float a = fminf(fabsf(f), 6.0f); // NaN gives 6, hence 7
  const float s1 = __fadd_rn(a, 4194304.0f), s2 = __fmaf_rn(a, 0.5f, 4194305.0f), s3 = __fmaf_rn(a, 0.25f, 4194306.0f);
  return __float_as_uint(fminf(fminf(s1, s2), s3));
#else
  const float af = fabsf(f), a = af < 6.0f ? af : 6.0f;
  const float s1 = a + 4194304.0f, s2 = fmaf(a, 0.5f, 4194305.0f), s3 = fmaf(a, 0.25f, 4194306.0f);
  const float m = s1 < s2 ? s1 : s2;
  return bits_of(m < s3 ? m : s3);
#endif
}

// The e2m1 magnitude codes of x[0..7] packed a nibble each (x[j] at bits 4j..4j+2), from
// e2m1_code_bits: each (0x4A800000 + code) << 4j is (0x4A800000 << 4j) + (code << 4j) mod 2^32, and one
// constant removes the first terms at the end.
MOEFFI_HD uint32_t e2m1x8_codes(const float (&x)[8]) {
  uint32_t acc = 0, bias = 0;
#pragma unroll
  for (int j = 0; j < 8; j++) {
    acc += e2m1_code_bits(x[j]) << (4 * j);
    bias += 0x4A800000u << (4 * j);
  }
  return acc - bias;
}

MOEFFI_HD uint8_t f32_to_e2m1(float f) { return (uint8_t)(((bits_of(f) >> 28) & 0x8u) | e2m1_magnitude(f)); }

// max(m, |v|) as the reference's amax_of: a NaN v never wins. (fmaxf is not the same: glibc's
// returns NaN for a signaling NaN.)
MOEFFI_HD float amax_step(float m, float v) {
#ifdef __CUDA_ARCH__
  return fmaxf(m, fabsf(v)); // the same: m is never NaN, and CUDA's fmaxf returns the non-NaN operand
#else
  const float a = fabsf(v);
  return a > m ? a : m;
#endif
}

// a / 6 correctly rounded (div_rn) for a non-negative bf16 value a (an NVFP4 block amax): a product
// and two FMAs, equal to the division for all 2^15 of them but +inf, which the product gives.
MOEFFI_HD float div6_bf16(float a) {
  const float c = 1.0f / 6.0f, q0 = mul_rn(a, c), q = fmaf(fmaf(-q0, 6.0f, a), c, q0);
  return a == INFINITY ? q0 : q;
}

// v * s as the reference gets it on the CPU, where a NaN v comes out with its own sign; GPU
// arithmetic returns the canonical positive NaN, which would change the sign bit of the code.
MOEFFI_HD float scale_value(float v, float s) { return v != v ? v : mul_rn(v, s); }

// Dynamic fp8 scale of a group whose largest magnitude is amax (NaN never enters an amax).
MOEFFI_HD float dynamic_scale(float amax) { return fmaxf(div_rn(amax, FP8_MAX), MIN_SCALE); }

// h = silu(g) * u, in the reference's order of roundings (expf differs from glibc by an ulp at most).
MOEFFI_HD float silu_mul(float g, float u) { return mul_rn(div_rn(g, add_rn(1.0f, expf(-g))), u); }
// h = silu(g) * u with the fast exponential and reciprocal (about 2 ulp), for GPU kernels whose h is
// quantized to fp8 next (hopper_fp8: the exact form's IEEE division and expf cost it time that the
// fp8 rounding makes moot). silu(-inf) = -0, NaN stays NaN.
__device__ __forceinline__ float silu_mul_fast(float g, float u) { return __fdividef(g, 1.0f + __expf(-g)) * u; }

// The bf16 h of nvfp4_silu_quant (moeffi.h): e = exp(-g) correctly rounded to fp32, then
// h = bf16(RN(RN(g / RN(1 + e)) * u)), a NaN h being the canonical 0x7FC0. g and u are bf16 values.
// exp(-g) computed in double and rounded once is correctly rounded for every bf16 g: the exact value
// is at least 4 double ulps from every fp32 rounding midpoint (checked exhaustively, NOTES.md), and
// exp() errs by 1 ulp at most (glibc, CUDA). That double exp is the host path and the device's
// fallback; the device first tries CUDA's expf (2 ulp at most, not --use_fast_math), whose h is
// taken when it cannot round differently: for g > -80 (e far below overflow) the correctly rounded
// e moves h by at most 12 fp32 ulps (relative error 6 * 2^-23 through three roundings), and h is
// kept only when it lies over 64 ulps from a bf16 rounding midpoint with s = g / (1 + e) and h
// normal and above 2^-100, or when g or u is zero (h = +-0 or NaN whatever e is).
MOEFFI_HD float silu_h_of(float g, float u, float e) { return mul_rn(div_rn(g, add_rn(1.0f, e)), u); }

MOEFFI_HD uint16_t silu_h_bf16(float h) { return h != h ? (uint16_t)0x7FC0u : f32_to_bf16(h); }

#ifdef __CUDA_ARCH__
__device__ __noinline__ uint16_t silu_mul_bf16_slow(float g, float u) {
  return silu_h_bf16(silu_h_of(g, u, (float)exp(-(double)g)));
}
#endif

MOEFFI_HD uint16_t silu_mul_bf16(float g, float u) {
#ifdef __CUDA_ARCH__
  const float e = expf(-g), s = div_rn(g, add_rn(1.0f, e)), h = mul_rn(s, u);
  const uint32_t bs = (bits_of(s) >> 23) & 0xFFu, bh = (bits_of(h) >> 23) & 0xFFu;
  const int mid = (int)(bits_of(h) & 0xFFFFu) - 0x8000;
  const bool stable = (g > -80.0f && bs >= 27u && bs <= 254u && bh >= 27u && bh <= 254u && (mid > 64 || mid < -64)) ||
                      ((g == 0.0f || u == 0.0f) && h == h);
  return stable ? f32_to_bf16(h) : silu_mul_bf16_slow(g, u);
#else
  return silu_h_bf16(silu_h_of(g, u, (float)exp(-(double)g)));
#endif
}

// PTX prmt.b32 (default mode): byte n of the result is byte (s >> 4n) & 7 of the 8 bytes {y:x},
// or that byte's sign bit replicated over the byte when (s >> 4n) & 8. The host form follows the
// PTX ISA text, for host checks.
MOEFFI_HD uint32_t prmt(uint32_t x, uint32_t y, uint32_t s) {
#ifdef __CUDA_ARCH__
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(y), "r"(s));
  return r;
#else
  const uint64_t in = (uint64_t)y << 32 | x;
  uint32_t r = 0;
  for (int n = 0; n < 4; n++) {
    const uint32_t sel = (s >> (4 * n)) & 15u;
    uint32_t b = (uint32_t)(in >> (8 * (sel & 7u))) & 0xFFu;
    if (sel & 8u) b = b & 0x80u ? 0xFFu : 0u;
    r |= b << (8 * n);
  }
  return r;
#endif
}

// The sign bits of 8 bf16 (w_k holds elements 2k and 2k + 1, low half first) at bit 3 of each
// nibble, element i's at bit 4i + 3: where e2m1 codes packed two per byte keep their signs.
MOEFFI_HD uint32_t bf16x8_sign_nibbles(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3) {
  // p = signs of elements 0, 2, 1, 3 as 0x00 / 0xFF bytes; q = of 4, 6, 5, 7
  const uint32_t p = prmt(w0, w1, 0xFBD9u), q = prmt(w2, w3, 0xFBD9u);
  return (prmt(p, q, 0x5410u) & 0x08080808u) | (prmt(p, q, 0x7632u) & 0x80808080u);
}

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
