// Benchmark inputs: a seeded xorshift stream (reproducible random data, never an all-zero tensor) and the median.
/** Random generators over one xorshift32 stream starting at seed. */
export function benchData(seed: number) {
  let state = seed;
  const next = () => ((state ^= state << 13), (state ^= state >>> 17), (state ^= state << 5), state >>> 0);
  return {
    /** e4m3 codes with |w| <= 240 and no NaN codes. */
    fp8Codes(n: number): Uint8Array {
      const a = new Uint8Array(n);
      for (let i = 0; i < n; i += 4) {
        const r = next();
        for (let j = 0; j < 4 && i + j < n; j++) a[i + j] = ((r >>> (8 * j)) & 0xff) % 0x6c | ((r >>> (8 * j)) & 0x80);
      }
      return a;
    },
    /** n values uniform in [-amp/2, amp/2). */
    uniform: (n: number, amp: number) => Float32Array.from({ length: n }, () => (next() / 2 ** 32 - 0.5) * amp),
  };
}

export const median = (v: number[]) => [...v].sort((a, b) => a - b)[Math.floor(v.length / 2)];
