// Property tests: every op of the CPU reference backend against the independent float64 reference
// (tests/reference64.ts) over hundreds of fresh random problems per run. Outputs are poisoned first.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Context, Fp8Linear, MoeLayer, nvfp4ExpertsQuant, nvfp4ScaleRows, tensor, toBf16, topkSoftmax } from "../mod.ts";
import { fp8MoeRef, nvfp4QuantRef, nvfp4SiluQuantRef, scaledMmRef, siluRows, topkSoftmaxRef } from "./reference64.ts";
import { nvfp4SiluQuant } from "../core/ops.ts";
import {
  compareBf16,
  dim16,
  firstDiff,
  fp8Weights,
  moeTensors,
  poisonedBf16,
  randomMoe,
  relativeL2,
  Rng,
  seed,
} from "./helpers.ts";
import { ACT_SCALES, WEIGHT_SCALES } from "../ffi/abi.ts";
import { weightScaleShape } from "../core/validate.ts";

const SEED = seed();
console.log(`ops.test.ts: MOEFFI_TEST_SEED=${SEED}`);
const ctx = new Context({ device: "cpu", backend: "reference" });

// fp8_moe is checked twice.
// 1. Per element (compareBf16): 2^-8 |ref| for the bf16 output plus 2^-4 of the row's largest output.
//    The second term is for the intermediate h: the backend computes it in fp32, the reference in
//    float64, so an element of h lying within rounding of an fp8 midpoint can quantize one fp8 step
//    apart (up to 2^-3 of itself). With few experts' rows and N = 16..64 such a flip has moved an
//    output by up to 2^-6 of the row maximum in our runs (about 1 row in 15,000); 2^-4 leaves 4x margin
//    and still catches any wrong expert, scale, block index or lost slot (O(1) errors).
// 2. In aggregate: the mean relative L2 error over all problems. bf16 rounding alone gives
//    2^-8 / sqrt(3) = 2.26e-3 rms; 3.5e-3 fails any systematic bias above about 2.7e-3 (a missed
//    promotion, a wrong rounding mode), which a per-element bound would let through.
const MOE_ROW_TOL = 2 ** -4;
const MOE_MEAN_L2 = 3.5e-3;
// fp8_scaled_mm quantizes x bit-identically to the reference, so only fp32 accumulation remains.
const MM_ROW_TOL = 2 ** -14;

test("fp8_moe: 200 random problems match the float64 reference", async () => {
  const r = new Rng(SEED);
  let l2 = 0, counted = 0;
  for (let i = 0; i < 200; i++) {
    // every scheme pair is visited; E, topk, M, K, N are random (see randomMoe)
    const c = randomMoe(r, { weightScale: WEIGHT_SCALES[i % 3], actScale: ACT_SCALES[Math.floor(i / 3) % 4] });
    const t = moeTensors(c);
    using layer = new MoeLayer({
      hidden: c.k,
      intermediate: c.n,
      experts: c.experts,
      topk: c.topk,
      weightScale: c.weightScale,
      actScale: c.actScale,
      context: ctx,
    }).load(t.weights);
    const out = await layer.forward(t.x, t.topkIds, t.topkWeights, { out: poisonedBf16([c.m, c.k]) });
    const ref = fp8MoeRef(c, c);
    const bad = compareBf16(out.data, ref, c.k, MOE_ROW_TOL);
    assert.equal(
      bad,
      undefined,
      `problem ${i} (E=${c.experts} topk=${c.topk} M=${c.m} K=${c.k} N=${c.n} ${c.weightScale}/${c.actScale}): ${bad}`,
    );
    if (ref.some((v) => v !== 0)) (l2 += relativeL2(out.data, ref)), counted++;
  }
  console.log(`fp8_moe: mean relative L2 error ${(l2 / counted).toExponential(3)} over ${counted} problems`);
  assert.ok(l2 / counted <= MOE_MEAN_L2, `mean relative L2 error ${(l2 / counted).toExponential(3)} > ${MOE_MEAN_L2}`);
});

test("fp8_scaled_mm: 150 random problems match the float64 reference", async () => {
  const r = new Rng(SEED + 1);
  for (let i = 0; i < 150; i++) {
    const weightScale = WEIGHT_SCALES[i % 3], actScale = ACT_SCALES[Math.floor(i / 3) % 4];
    const k = dim16(r, 640), n = r.int(1, 400), m = r.pick([0, 1, 3, 16, 65, r.int(0, 300)]), bias = r.next() < 0.5;
    const x = toBf16(r.values(m * k)), w = fp8Weights(r, n * k);
    const wScale = r.scales(weightScaleShape(weightScale, n, k).reduce((a, b) => a * b), 1 / 4096);
    const b = bias ? toBf16(r.values(n)) : undefined;
    const a1Scale = actScale === "static-tensor" ? 4 / 448 : undefined;
    using lin = new Fp8Linear({ inFeatures: k, outFeatures: n, weightScale, actScale, bias, context: ctx }).load({
      w: tensor("fp8_e4m3", [n, k], w),
      wScale: tensor("f32", weightScaleShape(weightScale, n, k), wScale),
      ...(b ? { bias: tensor("bf16", [n], b) } : {}),
      ...(a1Scale ? { a1Scale: tensor("f32", [1], [a1Scale]) } : {}),
    });
    const out = await lin.forward(tensor("bf16", [m, k], x), { out: poisonedBf16([m, n]) });
    const ref = scaledMmRef({ m, n, k, weightScale, actScale }, { x, w, wScale, bias: b, a1Scale });
    const bad = compareBf16(out.data, ref, n, MM_ROW_TOL);
    assert.equal(bad, undefined, `problem ${i} (M=${m} N=${n} K=${k} ${weightScale}/${actScale} bias=${bias}): ${bad}`);
  }
});

test("topk_softmax: 100 random problems, ids exact and weights within fp32 rounding", async () => {
  const r = new Rng(SEED + 2);
  for (let i = 0; i < 100; i++) {
    const experts = r.pick([1, 2, 8, 60, 64, 128, 257, r.int(1, 300)]), topk = r.int(1, Math.min(8, experts));
    const m = r.pick([0, 1, 7, r.int(0, 300)]), renormalize = r.next() < 0.5;
    // a quarter of the problems draw logits from a few values, so exact ties are common
    const ties = r.next() < 0.25;
    const logits = Float32Array.from({ length: m * experts }, () => ties ? r.int(0, 3) : r.normal() * 4);
    const { ids, weights } = await topkSoftmax(tensor("f32", [m, experts], logits), topk, {
      renormalize,
      context: ctx,
      ids: tensor("i32", [m, topk], new Int32Array(m * topk).fill(-7)),
      weights: tensor("f32", [m, topk], new Float32Array(m * topk).fill(NaN)),
    });
    const ref = topkSoftmaxRef(logits, m, experts, topk, renormalize);
    assert.equal(firstDiff(ids.data, ref.ids), -1, `problem ${i}: ids`);
    // fp32 softmax: exp and divide within a few ulps, the row sum within E ulps (E <= 300)
    weights.data.forEach((w, j) =>
      assert.ok(
        Math.abs(w - ref.weights[j]) <= 4e-5 * ref.weights[j] + 1e-9,
        `problem ${i} weight ${j}: ${w} vs ${ref.weights[j]}`,
      )
    );
  }
});

test("nvfp4_experts_quant: 100 random problems are bit-exact, scales swizzled, padding zero", async () => {
  const r = new Rng(SEED + 3);
  for (let i = 0; i < 100; i++) {
    const experts = r.pick([1, 3, 4, 15, 16, 17, 60, 257, r.int(1, 300)]), k = dim16(r, 320);
    const counts = Array.from({ length: experts }, () => (r.next() < 0.3 ? 0 : r.int(0, r.pick([3, 40, 200]))));
    const offsets = new Int32Array(experts + 1);
    counts.forEach((c, e) => (offsets[e + 1] = offsets[e] + c));
    const m = offsets[experts];
    const x = toBf16(r.values(m * k, 3));
    const gs = Float32Array.from({ length: experts }, () => 448 * 6 / (20 * 2 ** (r.next() * 4 - 2)));
    const { packed, scales } = await nvfp4ExpertsQuant(
      tensor("bf16", [m, k], x),
      tensor("i32", [experts + 1], offsets),
      tensor("f32", [experts], gs),
      {
        context: ctx,
        packed: tensor("u8", [m, k / 2], new Uint8Array(m * k / 2).fill(0xa5)),
        scales: tensor(
          "u8",
          [nvfp4ScaleRows(m, experts), Math.ceil(k / 64) * 4],
          new Uint8Array(nvfp4ScaleRows(m, experts) * Math.ceil(k / 64) * 4).fill(0xa5),
        ),
      },
    );
    const ref = nvfp4QuantRef(x, offsets, gs, m, k, experts);
    assert.equal(firstDiff(packed.data, ref.packed), -1, `problem ${i} (E=${experts} M=${m} K=${k}): packed values`);
    assert.equal(firstDiff(scales.data, ref.scales), -1, `problem ${i} (E=${experts} M=${m} K=${k}): swizzled scales`);
  }
});

// Random expert row counts (a third empty) for E experts, as row starts [E + 1].
function randomOffsets(r: Rng, experts: number, sizes: number[]): Int32Array {
  const offsets = new Int32Array(experts + 1);
  for (let e = 0; e < experts; e++) offsets[e + 1] = offsets[e] + (r.next() < 0.3 ? 0 : r.int(0, r.pick(sizes)));
  return offsets;
}

test("nvfp4_silu_quant: 40 random problems are bit-exact, and equal quantizing h itself", async () => {
  const r = new Rng(SEED + 5);
  const poisoned = (m: number, n: number, experts: number) => ({
    packed: tensor("u8", [m, n / 2], new Uint8Array(m * n / 2).fill(0xa5)),
    scales: tensor(
      "u8",
      [nvfp4ScaleRows(m, experts), Math.ceil(n / 64) * 4],
      new Uint8Array(nvfp4ScaleRows(m, experts) * Math.ceil(n / 64) * 4).fill(0xa5),
    ),
  });
  for (let i = 0; i < 40; i++) {
    // problem 0 runs every finite bf16 value through the gate (the exp of each), against u = 1
    const experts = i === 0 ? 3 : r.pick([1, 3, 16, 17, 60, 257, r.int(1, 300)]), n = i === 0 ? 256 : dim16(r, 192);
    const offsets = i === 0 ? Int32Array.from([0, 100, 100, 256]) : randomOffsets(r, experts, [3, 40, 150]);
    const m = offsets[experts];
    const x = toBf16(r.values(m * 2 * n, 4));
    if (i === 0) {
      for (let row = 0, g = 0; row < m; row++) {
        for (let c = 0; c < n; c++, g++) {
          while ((g & 0x7f80) === 0x7f80) g++; // skip inf and NaN
          x[row * 2 * n + c] = g & 0xffff, x[row * 2 * n + n + c] = 0x3f80;
        }
      }
    }
    const gs = Float32Array.from({ length: experts }, () => 448 * 6 / (20 * 2 ** (r.next() * 4 - 2)));
    const off = tensor("i32", [experts + 1], offsets), g = tensor("f32", [experts], gs);
    const fused = await nvfp4SiluQuant(tensor("bf16", [m, 2 * n], x), off, g, { context: ctx, ...poisoned(m, n, experts) });
    const ref = nvfp4SiluQuantRef(x, offsets, gs, m, n, experts);
    const what = `problem ${i} (E=${experts} M=${m} N=${n})`;
    assert.equal(firstDiff(fused.packed.data, ref.packed), -1, `${what}: packed values`);
    assert.equal(firstDiff(fused.scales.data, ref.scales), -1, `${what}: swizzled scales`);
    const composed = await nvfp4ExpertsQuant(tensor("bf16", [m, n], siluRows(x, m, n)), off, g, {
      context: ctx,
      ...poisoned(m, n, experts),
    });
    assert.equal(firstDiff(fused.packed.data, composed.packed.data), -1, `${what}: fused != silu then quant`);
    assert.equal(firstDiff(fused.scales.data, composed.scales.data), -1, `${what}: fused scales != silu then quant`);
  }
});

test("the fp8_moe comparison can fail: a wrong expert or a flipped output bit is caught", async () => {
  const r = new Rng(SEED + 4);
  const c = randomMoe(r, { experts: 4, topk: 2, m: 8, k: 64, n: 32, weightScale: "per-channel", actScale: "dynamic-token" });
  c.topkIds.forEach((_, i) => (c.topkIds[i] = i % 4));
  const t = moeTensors(c);
  using layer = new MoeLayer({
    hidden: c.k,
    intermediate: c.n,
    experts: 4,
    topk: 2,
    weightScale: c.weightScale,
    actScale: c.actScale,
    context: ctx,
  }).load(t.weights);
  const out = await layer.forward(t.x, t.topkIds, t.topkWeights);
  assert.equal(compareBf16(out.data, fp8MoeRef(c, c), c.k, MOE_ROW_TOL), undefined);
  const wrong = { ...c, topkIds: c.topkIds.map((e) => (e + 1) % 4) };
  assert.notEqual(compareBf16(out.data, fp8MoeRef(c, wrong), c.k, MOE_ROW_TOL), undefined);
  const flipped = out.data.slice(), values = out.toFloat32();
  const largest = values.indexOf(values.reduce((a, v) => (Math.abs(v) > Math.abs(a) ? v : a), 0));
  flipped[largest] ^= 0x0080; // the lowest exponent bit of the largest output: a factor of 2
  assert.notEqual(compareBf16(flipped, fp8MoeRef(c, c), c.k, MOE_ROW_TOL), undefined);
});
