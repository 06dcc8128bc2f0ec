// Independent float64 reference of every moeffi op (test code: clear over fast).
// The first activation quantization mirrors the fp32 steps with Math.fround, so it is bit-identical
// to the backends; GEMMs, SiLU and the top-k combine are float64. nvfp4 is fully bit-exact.
import { bf16ToF32, decodeE4m3, dynamicScale, encodeE2m1, encodeE4m3, f32ToBf16, fromBf16 } from "../core/dtypes.ts";

export type WeightScale = "per-tensor" | "per-channel" | "block-128";
export type ActScale = "static-tensor" | "dynamic-tensor" | "dynamic-token" | "dynamic-group-128";

const cdiv = (a: number, b: number) => Math.ceil(a / b);

/** Quantize a [rows, cols] matrix to fp8 under an activation scheme; q holds the decoded fp8 values. */
export function quantizeRows64(
  v: Float64Array | Float32Array,
  rows: number,
  cols: number,
  act: ActScale,
  staticScale?: number,
): { q: Float64Array; scale: (row: number, col: number) => number } {
  // Scale groups: one per tensor, per row, or per (row, 128-wide column group).
  const groupsPerRow = act === "dynamic-group-128" ? cdiv(cols, 128) : 1;
  const perRow = act === "dynamic-token" || act === "dynamic-group-128";
  const scales = new Float64Array(perRow ? rows * groupsPerRow : 1);
  const groupOf = (r: number, c: number) =>
    act === "dynamic-group-128" ? r * groupsPerRow + Math.floor(c / 128) : act === "dynamic-token" ? r : 0;

  if (act === "static-tensor") {
    if (staticScale === undefined) throw new Error("static-tensor needs a static scale");
    scales[0] = Math.fround(staticScale);
  } else {
    const amax = new Float64Array(scales.length); // all zero
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        const g = groupOf(r, c);
        const a = Math.abs(Math.fround(v[r * cols + c]));
        if (a > amax[g]) amax[g] = a;
      }
    }
    for (let g = 0; g < scales.length; g++) scales[g] = dynamicScale(amax[g]);
  }

  const q = new Float64Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const inv = Math.fround(1 / scales[groupOf(r, c)]);
      q[r * cols + c] = decodeE4m3(encodeE4m3(Math.fround(Math.fround(v[r * cols + c]) * inv)));
    }
  }
  return { q, scale: (row, col) => scales[groupOf(row, col)] };
}

/** Dequantized activations q * s of a quantizeRows64 result. */
function dequant(a: ReturnType<typeof quantizeRows64>, rows: number, cols: number): Float64Array {
  const out = new Float64Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) out[r * cols + c] = a.q[r * cols + c] * a.scale(r, c);
  }
  return out;
}

/** Weight scale of output row n and reduction block kb, for matrix e of shape [rows, cols]. */
function weightScaleAt(
  ws: WeightScale,
  scales: Float32Array,
  e: number,
  rows: number,
  cols: number,
  n: number,
  kb: number,
): number {
  if (ws === "per-tensor") return scales[e];
  if (ws === "per-channel") return scales[e * rows + n];
  const rb = cdiv(rows, 128), cb = cdiv(cols, 128);
  return scales[e * rb * cb + Math.floor(n / 128) * cb + kb];
}

/** out[outOff + n] = sum_k a[aOff + k] * w_e[n, k] * sw(n, k) for n < rows; w_e is [rows, cols] fp8. */
function gemmRow(
  a: Float64Array,
  aOff: number,
  w: Uint8Array,
  ws: WeightScale,
  wScale: Float32Array,
  e: number,
  rows: number,
  cols: number,
  out: Float64Array,
  outOff: number,
): void {
  const wOff = e * rows * cols;
  for (let n = 0; n < rows; n++) {
    let acc = 0;
    for (let kb = 0; kb * 128 < cols; kb++) { // every scheme's scale is constant within 128 columns
      let part = 0;
      for (let k = kb * 128; k < Math.min(kb * 128 + 128, cols); k++) {
        part += a[aOff + k] * decodeE4m3(w[wOff + n * cols + k]);
      }
      acc += part * weightScaleAt(ws, wScale, e, rows, cols, n, kb);
    }
    out[outOff + n] = acc;
  }
}

/** Fused experts: out[t] = sum_j topk_weights[t,j] * W2_e(requant(silu(g) * u)), float64 [M*K]. */
export function fp8MoeRef(
  p: { m: number; n: number; k: number; experts: number; topk: number; weightScale: WeightScale; actScale: ActScale },
  t: {
    x: Uint16Array;
    topkIds: Int32Array;
    topkWeights: Float32Array;
    w13: Uint8Array;
    w13Scale: Float32Array;
    w2: Uint8Array;
    w2Scale: Float32Array;
    a1Scale?: number;
    a2Scale?: number;
  },
): Float64Array {
  const { m: M, n: N, k: K, experts: E, topk } = p;
  const a = dequant(quantizeRows64(fromBf16(t.x), M, K, p.actScale, t.a1Scale), M, K);

  // Valid (token, slot) pairs, in order.
  const slots: number[] = [];
  for (let i = 0; i < M * topk; i++) {
    const e = t.topkIds[i];
    if (e === -1) continue;
    if (!(e >= 0 && e < E)) throw new Error(`topk_ids[${i}] = ${e} out of range`);
    slots.push(i);
  }

  // GEMM1 + SiLU*up for every valid slot: h [slots, N].
  const h = new Float64Array(slots.length * N);
  const gu = new Float64Array(2 * N);
  slots.forEach((i, s) => {
    const tok = Math.floor(i / topk);
    gemmRow(a, tok * K, t.w13, p.weightScale, t.w13Scale, t.topkIds[i], 2 * N, K, gu, 0);
    for (let j = 0; j < N; j++) {
      const g = gu[j];
      h[s * N + j] = (g / (1 + Math.exp(-g))) * gu[N + j];
    }
  });

  // Requantize the intermediate (dynamic-tensor: amax over all valid slots), GEMM2, weighted combine.
  const qh = dequant(quantizeRows64(h, slots.length, N, p.actScale, t.a2Scale), slots.length, N);
  const out = new Float64Array(M * K);
  const y = new Float64Array(K);
  slots.forEach((i, s) => {
    const tok = Math.floor(i / topk);
    gemmRow(qh, s * N, t.w2, p.weightScale, t.w2Scale, t.topkIds[i], K, N, y, 0);
    for (let c = 0; c < K; c++) out[tok * K + c] += t.topkWeights[i] * y[c];
  });
  return out;
}

/** y[m, n] = quant(x[m]) . w[n] (dequantized) + bias[n], float64 [M*N]. */
export function scaledMmRef(
  p: { m: number; n: number; k: number; weightScale: WeightScale; actScale: ActScale },
  t: { x: Uint16Array; w: Uint8Array; wScale: Float32Array; bias?: Uint16Array; a1Scale?: number },
): Float64Array {
  const { m: M, n: N, k: K } = p;
  const a = dequant(quantizeRows64(fromBf16(t.x), M, K, p.actScale, t.a1Scale), M, K);
  const out = new Float64Array(M * N);
  for (let r = 0; r < M; r++) {
    gemmRow(a, r * K, t.w, p.weightScale, t.wScale, 0, N, K, out, r * N);
    if (t.bias) { for (let n = 0; n < N; n++) out[r * N + n] += bf16ToF32(t.bias[n]); }
  }
  return out;
}

/** Softmax per row (float64), topk largest logits (ties: lower id first), optional renormalization. */
export function topkSoftmaxRef(
  logits: Float32Array,
  m: number,
  experts: number,
  topk: number,
  renormalize: boolean,
): { ids: Int32Array; weights: Float64Array } {
  if (topk > experts) throw new Error("topk > experts");
  const ids = new Int32Array(m * topk);
  const weights = new Float64Array(m * topk);
  const prob = new Float64Array(experts);
  const taken = new Uint8Array(experts);
  for (let r = 0; r < m; r++) {
    const row = logits.subarray(r * experts, (r + 1) * experts);
    let max = -Infinity;
    for (let e = 0; e < experts; e++) max = Math.max(max, row[e]);
    let sum = 0;
    for (let e = 0; e < experts; e++) sum += prob[e] = Math.exp(row[e] - max);
    taken.fill(0);
    let chosen = 0;
    for (let j = 0; j < topk; j++) {
      let best = -1;
      for (let e = 0; e < experts; e++) {
        if (!taken[e] && (best < 0 || row[e] > row[best])) best = e; // strict ">" keeps the lower id
      }
      taken[best] = 1;
      ids[r * topk + j] = best;
      weights[r * topk + j] = prob[best] / sum;
      chosen += prob[best] / sum;
    }
    if (renormalize) { for (let j = 0; j < topk; j++) weights[r * topk + j] /= chosen; }
  }
  return { ids, weights };
}

/** NVFP4 expert quantization (moe.md section 4), bit-exact: packed [m, k/2], swizzled scales. */
export function nvfp4QuantRef(
  x: Uint16Array,
  offsets: Int32Array,
  globalScale: Float32Array,
  m: number,
  k: number,
  experts: number,
): { packed: Uint8Array; scales: Uint8Array } {
  if (k % 16 !== 0) throw new Error("k must be a multiple of 16");
  const numKTiles = cdiv(k, 64);
  const packed = new Uint8Array((m * k) / 2);
  const scales = new Uint8Array((m + 127 * experts) * numKTiles * 4);
  let bsOffset = 0; // blockscale_offsets[e]
  for (let e = 0; e < experts; e++) {
    const start = offsets[e], end = offsets[e + 1];
    if (!(start >= 0 && start <= end && end <= m)) throw new Error(`bad expert offsets at ${e}`);
    const gs = Math.fround(globalScale[e]);
    for (let i = 0; i < end - start; i++) {
      const row = start + i;
      for (let c = 0; c < k / 16; c++) {
        const base = row * k + c * 16;
        let vmax = 0;
        for (let j = 0; j < 16; j++) vmax = Math.max(vmax, Math.abs(bf16ToF32(x[base + j])));
        const sf = encodeE4m3(Math.fround(gs * Math.fround(vmax / 6)));
        const sfv = decodeE4m3(sf);
        const outScale = sfv !== 0 ? Math.fround(1 / Math.fround(sfv * Math.fround(1 / gs))) : 0;
        for (let j = 0; j < 16; j += 2) {
          const lo = encodeE2m1(Math.fround(bf16ToF32(x[base + j]) * outScale));
          const hi = encodeE2m1(Math.fround(bf16ToF32(x[base + j + 1]) * outScale));
          packed[base / 2 + j / 2] = lo | (hi << 4);
        }
        const idx = bsOffset * numKTiles * 4 +
          (Math.floor(i / 128) * numKTiles + Math.floor(c / 4)) * 512 +
          (i % 32) * 16 + Math.floor((i % 128) / 32) * 4 + (c % 4);
        scales[idx] = sf;
      }
    }
    bsOffset += cdiv(end - start, 128) * 128;
  }
  return { packed, scales };
}

/** h of nvfp4_silu_quant (moeffi.h) as bf16 bits: e = exp(-g) correctly rounded to fp32 (Math.exp is within
 * an ulp of double, and exp(-g) of a bf16 g is 4 double ulps or more from every fp32 rounding midpoint), then
 * each step rounded to fp32; a NaN h is the canonical 0x7FC0. */
export function siluH(gate: number, up: number): number {
  const g = bf16ToF32(gate), u = bf16ToF32(up);
  const e = Math.fround(Math.exp(-g));
  const h = Math.fround(Math.fround(g / Math.fround(1 + e)) * u);
  return Number.isNaN(h) ? 0x7fc0 : f32ToBf16(h);
}

/** h bf16 [m, n] of x bf16 [m, 2n] (gate columns, then up). */
export function siluRows(x: Uint16Array, m: number, n: number): Uint16Array {
  const h = new Uint16Array(m * n);
  for (let r = 0; r < m; r++) {
    for (let c = 0; c < n; c++) h[r * n + c] = siluH(x[r * 2 * n + c], x[r * 2 * n + n + c]);
  }
  return h;
}

/** nvfp4_silu_quant: nvfp4QuantRef of h = siluRows(x), bit-exact. */
export function nvfp4SiluQuantRef(
  x: Uint16Array,
  offsets: Int32Array,
  globalScale: Float32Array,
  m: number,
  n: number,
  experts: number,
): { packed: Uint8Array; scales: Uint8Array } {
  return nvfp4QuantRef(siluRows(x, m, n), offsets, globalScale, m, n, experts);
}
