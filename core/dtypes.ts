// Number formats used by moeffi: bf16, fp8 e4m3fn and fp4 e2m1, plus the fp8 dynamic-scale rule.
// Every conversion starts from an fp32 value (Math.fround) and rounds to nearest, ties to even,
// so results match CUDA/C conversions bit for bit.

// Scratch view to read/write the bits of an fp32 value.
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

function f32Bits(x: number): number {
  f32[0] = x;
  return u32[0];
}

// Round a non-negative number to the nearest integer, ties to even.
function rintEven(v: number): number {
  const n = Math.floor(v);
  const frac = v - n;
  return frac > 0.5 || (frac === 0.5 && n % 2 === 1) ? n + 1 : n;
}

// ---- bf16 ----

/** bf16 bits -> fp32 value (the bits are the top half of an fp32). */
export function bf16ToF32(h: number): number {
  u32[0] = (h & 0xffff) << 16;
  return f32[0];
}

/** number -> bf16 bits: round to fp32 first, then round-to-nearest-even on the fp32 bits. */
export function f32ToBf16(x: number): number {
  const bits = f32Bits(Math.fround(x));
  if (Number.isNaN(x)) return 0x7fc0 | ((bits >>> 16) & 0x8000);
  const lsb = (bits >>> 16) & 1;
  return ((bits + 0x7fff + lsb) >>> 16) & 0xffff;
}

/** fp32 values to bf16 bits, rounding to nearest even. */
export function toBf16(a: ArrayLike<number>): Uint16Array {
  const out = new Uint16Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = f32ToBf16(a[i]);
  return out;
}

/** bf16 bits to fp32 values (exact). */
export function fromBf16(a: Uint16Array): Float32Array {
  const out = new Float32Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = bf16ToF32(a[i]);
  return out;
}

// ---- fp8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa; max 448; NaN 0x7F/0xFF; no infinities ----

/** Largest finite e4m3fn value. */
export const E4M3_MAX = 448;
/** Smallest dynamic scale, 1/(448*512), as an fp32 value. */
export const FP8_MIN_SCALE: number = Math.fround(1 / (448 * 512));

// Decode table: code -> fp32 value.
const E4M3_TABLE = new Float32Array(256);
for (let b = 0; b < 256; b++) {
  const e = (b >> 3) & 0xf;
  const m = b & 7;
  const mag = e === 0 ? m * 2 ** -9 : (1 + m / 8) * 2 ** (e - 7);
  E4M3_TABLE[b] = (b & 0x7f) === 0x7f ? NaN : b & 0x80 ? -mag : mag;
}

/** number -> e4m3fn code: fp32 first, RNE, saturate to +-448, NaN -> 0x7F|sign. */
export function encodeE4m3(x: number): number {
  x = Math.fround(x);
  const sign = (f32Bits(x) >>> 24) & 0x80;
  if (Number.isNaN(x)) return 0x7f | sign;
  const a = Math.abs(x);
  let code: number;
  if (a < 2 ** -6) {
    // Subnormal range: quantum 2^-9; code 8 (=2^-6, the smallest normal) falls out naturally.
    code = rintEven(a * 512);
  } else if (a >= 512) {
    code = 0x7e; // far above the max (also +-Infinity)
  } else {
    // Normal: a = v * 2^(e-3) with v in [8, 16); v == 16 after rounding carries into the exponent.
    const e = ((f32Bits(a) >>> 23) & 0xff) - 127;
    const v = rintEven(a * 2 ** (3 - e));
    code = ((e + 7) << 3) + (v - 8);
  }
  return Math.min(code, 0x7e) | sign; // saturation: anything above 448 (incl. 0x7F) becomes 448
}

/** e4m3fn code -> fp32 value (0x7F/0xFF -> NaN). */
export function decodeE4m3(b: number): number {
  return E4M3_TABLE[b & 0xff];
}

/** fp32 values to e4m3fn codes (round to nearest even, saturating). */
export function toE4m3(a: ArrayLike<number>): Uint8Array {
  const out = new Uint8Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = encodeE4m3(a[i]);
  return out;
}

/** e4m3fn codes to fp32 values (exact; 0x7F/0xFF are NaN). */
export function fromE4m3(a: Uint8Array): Float32Array {
  const out = new Float32Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = E4M3_TABLE[a[i]];
  return out;
}

/** Dynamic fp8 scale of a group: max(amax / 448, FP8_MIN_SCALE), in fp32. */
export function dynamicScale(amax: number): number {
  return Math.fround(Math.max(Math.fround(amax / E4M3_MAX), FP8_MIN_SCALE));
}

// ---- fp4 e2m1: magnitudes [0, 0.5, 1, 1.5, 2, 3, 4, 6] are codes 0..7, sign bit 0x8 ----

/** Largest e2m1 (fp4) magnitude. */
export const E2M1_MAX = 6;
const E2M1_VALUES = [0, 0.5, 1, 1.5, 2, 3, 4, 6];

/** number -> 4-bit e2m1 code: fp32 first, RNE (ties to the even code), saturate to 6, NaN -> 0x7|sign. */
export function encodeE2m1(x: number): number {
  x = Math.fround(x);
  const sign = (f32Bits(x) >>> 28) & 0x8;
  if (Number.isNaN(x)) return 0x7 | sign;
  const a = Math.abs(x);
  // Midpoints between neighbours; "<=" at a midpoint picks the lower (even) code, "<" the upper.
  let code: number;
  if (a <= 0.25) code = 0;
  else if (a < 0.75) code = 1;
  else if (a <= 1.25) code = 2;
  else if (a < 1.75) code = 3;
  else if (a <= 2.5) code = 4;
  else if (a < 3.5) code = 5;
  else if (a <= 5) code = 6;
  else code = 7;
  return code | sign;
}

/** 4-bit e2m1 code -> value. */
export function decodeE2m1(n: number): number {
  const mag = E2M1_VALUES[n & 7];
  return n & 0x8 ? -mag : mag;
}
