// The number formats every op is defined by: bf16, fp8 e4m3fn and e2m1, checked exhaustively
// against brute-force nearest-value searches.
import { test } from "node:test";
import assert from "node:assert/strict";
import { bf16ToF32, decodeE2m1, decodeE4m3, encodeE2m1, encodeE4m3, f32ToBf16, fromBf16, toBf16 } from "../mod.ts";

/** Nearest code by brute force; ties go to the even code (even mantissa). */
function nearest(x: number, codes: number[], decode: (c: number) => number): number {
  let best = codes[0];
  for (const c of codes) {
    const d = Math.abs(decode(c) - x), db = Math.abs(decode(best) - x);
    if (d < db || (d === db && (c & 1) === 0 && (best & 1) === 1)) best = c;
  }
  return best;
}

test("e4m3: every finite code round-trips; midpoints and neighbours round to nearest even", () => {
  const pos = Array.from({ length: 127 }, (_, c) => c); // 0x00..0x7E
  for (const c of pos) {
    assert.equal(encodeE4m3(decodeE4m3(c)), c);
    assert.equal(encodeE4m3(-decodeE4m3(c)), c === 0 ? 0x80 : c | 0x80);
  }
  for (let c = 0; c < 126; c++) {
    const mid = (decodeE4m3(c) + decodeE4m3(c + 1)) / 2;
    for (const x of [mid, Math.fround(mid * (1 + 2 ** -20)), Math.fround(mid * (1 - 2 ** -20))]) {
      assert.equal(encodeE4m3(x), nearest(x, pos, decodeE4m3), `x = ${x}`);
    }
  }
  assert.equal(encodeE4m3(448), 0x7e);
  assert.equal(encodeE4m3(1e9), 0x7e); // saturation
  assert.equal(encodeE4m3(-Infinity), 0xfe);
  assert.equal(encodeE4m3(NaN) & 0x7f, 0x7f);
  assert.ok(Number.isNaN(decodeE4m3(0x7f)));
  assert.equal(decodeE4m3(0x01), 2 ** -9); // smallest subnormal
  assert.equal(encodeE4m3(2 ** -10), 0); // exact tie with zero goes to even
});

test("e2m1: the eight magnitudes, ties to even, saturation, sign", () => {
  assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 7].map(decodeE2m1), [0, 0.5, 1, 1.5, 2, 3, 4, 6]);
  const cases: [number, number][] = [[0.25, 0], [0.75, 2], [1.25, 2], [1.75, 4], [2.5, 4], [3.5, 6], [5, 6], [7, 7], [-6, 0xf], [
    -0.1,
    0x8,
  ]];
  for (const [x, code] of cases) assert.equal(encodeE2m1(x), code, `x = ${x}`);
  const codes = [0, 1, 2, 3, 4, 5, 6, 7];
  for (let x = 0; x <= 7; x += 1 / 64) assert.equal(encodeE2m1(x), nearest(Math.min(x, 6), codes, decodeE2m1), `x = ${x}`);
});

test("bf16: round to nearest even, every pattern round-trips, NaN stays NaN", () => {
  for (let h = 0; h < 0x10000; h++) {
    const v = bf16ToF32(h);
    if (!Number.isNaN(v)) assert.equal(f32ToBf16(v), h);
  }
  assert.equal(f32ToBf16(1 + 2 ** -8), 0x3f80); // tie -> even
  assert.equal(f32ToBf16(1 + 3 * 2 ** -8), 0x3f82); // tie -> even (up)
  assert.equal(f32ToBf16(1 + 2 ** -8 + 2 ** -20), 0x3f81);
  assert.ok(Number.isNaN(bf16ToF32(f32ToBf16(NaN))));
  assert.deepEqual([...fromBf16(toBf16([1, -2, 0.5]))], [1, -2, 0.5]);
});
