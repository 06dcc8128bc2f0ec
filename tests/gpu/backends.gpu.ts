// The GPU suite (`deno task test:gpu`): every CUDA backend x op x scheme against the exact CPU
// reference on fresh random data, outputs poisoned before each run. MOEFFI_GPU_PROBLEMS scales the
// problem count (the sanitizer runs use a few). Needs a CUDA device.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  Context,
  type DeviceTensor,
  Fp8Linear,
  MoeLayer,
  nvfp4ExpertsQuant,
  nvfp4ScaleRows,
  tensor,
  toBf16,
  topkSoftmax,
} from "../../mod.ts";
import { ACT_SCALES, FLAG_HAS_BIAS, WEIGHT_SCALES } from "../../ffi/abi.ts";
import { weightScaleShape } from "../../core/validate.ts";
import {
  buildFixture,
  compareBf16,
  dim16,
  firstDiff,
  fp8Weights,
  type MoeCase,
  moeTensors,
  poisonedBf16,
  randomMoe,
  relativeL2,
  Rng,
  seed,
} from "../helpers.ts";
import { fp8MoeRef, scaledMmRef } from "../reference64.ts";

const SEED = seed();
const SCALE = Number(process.env.MOEFFI_GPU_PROBLEMS ?? 1);
const count = (n: number) => Math.max(1, Math.round(n * SCALE));
console.log(`backends.gpu.ts: MOEFFI_TEST_SEED=${SEED} MOEFFI_GPU_PROBLEMS=${SCALE}`);

const gpu = new Context({ device: "cuda:0" });
const cpu = new Context({ device: "cpu", backend: "reference" });
const BACKENDS = gpu.registry.backends.filter((b) => b.manifest.device === "cuda").map((b) => b.name);
console.log(`GPU: ${gpu.cuda!.name} (sm_${gpu.cuda!.capability.join("")}); CUDA backends: ${BACKENDS.join(", ")}`);

// GPU vs CPU reference, both rounded to bf16 (see tests/ops.test.ts for the derivation): per element
// 2^-7 |ref| (two bf16 roundings) + 2^-4 of the row maximum (an intermediate fp8 flip, since the two
// sum in different orders); in aggregate a mean relative L2 of 5e-3 (two roundings: sqrt(2) x 2.26e-3).
const ROW_TOL = 2 ** -4, MEAN_L2 = 5e-3;
// Tensor-core fp8 backends sum each 128-wide K block inside the WGMMA (products aligned to the
// largest exponent and kept to about 14 bits; DeepSeek-V3 section 3.3.2) and promote to fp32
// between blocks, as DeepGEMM does. Their contract is the bar, DeepGEMM's similarity
// 1 - 2 sum(xy) / sum(x^2 + y^2) < 1e-3 against float64 on the dequantized inputs: per problem for
// a GEMM (fp8_scaled_mm), over the whole test set for fp8_moe. Per MoE problem the bound is 1e-2:
// the block error (~2^-11 of the row max) can flip an intermediate fp8 code of h, and one flip of a
// dominant term moves a small layer's output by up to one e4m3 ulp (2^-3 relative), i.e. a
// similarity error up to 2^-7 (~7.8e-3; seen: 9.5e-4 in one run of 100 problems). Per element the
// bound above with 2^-3 of the row max, for the same reason.
const TENSOR_CORE_FP8 = new Set(["hopper_fp8", "batch_invariant_fp8"]);
const SIMILARITY_BAR = 1e-3, MOE_SIMILARITY_PER_PROBLEM = 1e-2;
const rowTol = (backend: string) => TENSOR_CORE_FP8.has(backend) ? 2 ** -3 : ROW_TOL;
const asF64 = (t: { toFloat32(): Float32Array }) => Float64Array.from(t.toFloat32());
const compare = (backend: string, got: Uint16Array, want: { toFloat32(): Float32Array }, cols: number) =>
  compareBf16(got, asF64(want), cols, rowTol(backend), 2 ** -7);
/** sum(xy) and sum(x^2 + y^2) of DeepGEMM's similarity measure, for per-problem and aggregate use. */
function similaritySums(got: Uint16Array, ref: Float64Array): { xy: number; sq: number } {
  let xy = 0, sq = 0;
  const g = tensor("bf16", [got.length], got).toFloat32();
  for (let i = 0; i < ref.length; i++) (xy += g[i] * ref[i]), (sq += g[i] * g[i] + ref[i] * ref[i]);
  return { xy, sq };
}
/** DeepGEMM's similarity error: 0 for identical outputs. */
const dissimilarity = (s: { xy: number; sq: number }) => s.sq > 0 ? 1 - (2 * s.xy) / s.sq : 0;

/** Whether `backend` claims `op` at all (tests of other ops are skipped for it). */
const claims = (backend: string, op: string) =>
  gpu.registry.backends.find((b) => b.name === backend)!.manifest.ops.includes(op as never);
/** The fp8_moe problem of case c on the GPU. */
const moeProblem = (c: MoeCase) =>
  gpu.problem({
    op: "fp8_moe",
    m: c.m,
    n: c.n,
    k: c.k,
    experts: c.experts,
    topk: c.topk,
    weightScale: c.weightScale,
    actScale: c.actScale,
  });
/** Whether `backend` accepts this MoE problem: a backend may refuse schemes or shapes, with a reason. */
function inScope(backend: string, c: MoeCase): boolean {
  return gpu.registry.backends.find((x) => x.name === backend)!.supported(moeProblem(c)).priority !== null;
}

/** The special cases the issue names, then random problems. */
function moeCases(r: Rng, n: number): MoeCase[] {
  const fixed: Partial<MoeCase>[] = [
    { experts: 60, topk: 4, m: 1 },
    { experts: 257, topk: 8, m: 257, k: 64, n: 32 },
    { experts: 8, topk: 8, m: 0 },
    { experts: 16, topk: 2, m: 4096, k: 64, n: 32 },
    { experts: 3, topk: 1, m: 1 },
    { experts: 8, topk: 2, m: 64 }, // about 16, 32 and 64 rows per expert (swapped decode tiles)
    { experts: 4, topk: 2, m: 64 },
    { experts: 4, topk: 2, m: 128, k: 512, n: 256 },
    { experts: 2, topk: 1, m: 700, k: 384, n: 192 }, // wide tiles with ragged expert ends
    { experts: 4, topk: 2, m: 1, k: 256, n: 1024 }, // decode GEMM 2 with K split in two (partial sums)
    { experts: 8, topk: 2, m: 16, k: 512, n: 1536 },
    // wide tiles with SiLU fused into GEMM 1 under per-token scales (hopper_fp8's bf16 h, then quantized): a partial
    // last n-tile with 640-wide h (a warp a row); 16416-wide h (past the register kernels: the looping one)
    { experts: 4, topk: 2, m: 300, k: 256, n: 640, weightScale: "per-channel", actScale: "dynamic-token" },
    { experts: 1, topk: 1, m: 100, k: 64, n: 16416, weightScale: "per-tensor", actScale: "dynamic-token" },
  ];
  const cases = fixed.map((o, i) => randomMoe(r, { weightScale: WEIGHT_SCALES[i % 3], actScale: ACT_SCALES[(i + 1) % 4], ...o }));
  const oneExpert = randomMoe(r, { experts: 32, topk: 1, m: 300, weightScale: "block-128", actScale: "dynamic-group-128" });
  oneExpert.topkIds.fill(5); // all tokens on one expert
  const empties = randomMoe(r, { experts: 64, topk: 8, m: 33, weightScale: "per-channel", actScale: "dynamic-token" });
  empties.topkIds.forEach((_, i) => i % 3 === 0 && (empties.topkIds[i] = -1)); // a third of the slots empty
  cases.push(oneExpert, empties);
  for (let i = cases.length; i < n; i++) {
    cases.push(randomMoe(r, { weightScale: WEIGHT_SCALES[i % 3], actScale: ACT_SCALES[Math.floor(i / 3) % 4] }));
  }
  return cases;
}

/**
 * A layer for case `c` on ctx's device with its weights uploaded and prepared. The uploaded weights
 * are freed at once (prepare copies them); static activation scales stay with the layer.
 */
function layerOn(ctx: Context, backend: string, c: MoeCase): MoeLayer {
  const { a1Scale, a2Scale, ...weights } = moeTensors(c).weights;
  const up = Object.fromEntries(Object.entries(weights).map(([k, v]) => [k, ctx.upload(v)])) as unknown as typeof weights;
  const statics = a1Scale ? { a1Scale: ctx.upload(a1Scale), a2Scale: ctx.upload(a2Scale!) } : {};
  const { k: hidden, n: intermediate, experts, topk, weightScale, actScale } = c;
  const layer = new MoeLayer({ hidden, intermediate, experts, topk, weightScale, actScale, context: ctx, backend }).load({
    ...up,
    ...statics,
  });
  for (const v of Object.values(up)) (v as Partial<Disposable>)[Symbol.dispose]?.();
  return layer;
}

/** One forward of case `c` on ctx's device (output poisoned first), downloaded to the host. */
async function moeOn(ctx: Context, backend: string, c: MoeCase, poison: boolean) {
  const t = moeTensors(c);
  using layer = layerOn(ctx, backend, c);
  const out = poison ? ctx.upload(poisonedBf16([c.m, c.k])) : undefined;
  const y = await layer.forward(ctx.upload(t.x), ctx.upload(t.topkIds), ctx.upload(t.topkWeights), { out: out as never });
  return "download" in y ? await (y as DeviceTensor<"bf16">).download() : y;
}

for (const backend of BACKENDS) {
  test(
    `${backend} fp8_moe: ${
      count(100)
    } problems (E=60, 257; topk=8; M=0, 1, 257, 4096; one expert; -1 ids) match the CPU reference`,
    { skip: !claims(backend, "fp8_moe") },
    async () => {
      const r = new Rng(SEED);
      let l2 = 0, counted = 0, refused = 0, worst = 0, worstAt = "";
      const total = { xy: 0, sq: 0 };
      for (const [i, c] of moeCases(r, count(100)).entries()) {
        if (!inScope(backend, c)) {
          refused++;
          continue;
        }
        const got = await moeOn(gpu, backend, c, true);
        const want = await moeOn(cpu, "reference", c, true);
        const what = `problem ${i} (E=${c.experts} topk=${c.topk} M=${c.m} K=${c.k} N=${c.n} ${c.weightScale}/${c.actScale})`;
        const bad = compare(backend, got.data, want, c.k);
        assert.equal(bad, undefined, `${what}: ${bad}`);
        const ref = asF64(want);
        if (ref.some((v) => v !== 0)) (l2 += relativeL2(got.data, ref)), counted++;
        if (TENSOR_CORE_FP8.has(backend)) {
          const sums = similaritySums(got.data, fp8MoeRef(c, c)), d = dissimilarity(sums);
          (total.xy += sums.xy), (total.sq += sums.sq);
          if (d > worst) (worst = d), (worstAt = what);
          assert.ok(d < MOE_SIMILARITY_PER_PROBLEM, `${what}: similarity error ${d} against float64`);
        }
      }
      console.log(
        `${backend} fp8_moe: mean relative L2 to the CPU reference ${(l2 / counted).toExponential(3)}; ` +
          `DeepGEMM similarity error against float64 over all problems ${dissimilarity(total).toExponential(3)}, ` +
          `worst problem ${worst.toExponential(3)} (${worstAt}); ${refused} problems outside its claims`,
      );
      // an aggregate needs a sample: over a handful of problems (MOEFFI_GPU_PROBLEMS < 1, the sanitizer
      // runs) one small layer with an intermediate flip dominates the mean; the per-problem bars still hold
      if (counted >= 20) assert.ok(l2 / counted <= MEAN_L2, `mean relative L2 ${l2 / counted} over ${counted} problems`);
      assert.ok(dissimilarity(total) < SIMILARITY_BAR, `similarity error over all problems ${dissimilarity(total)}`);
    },
  );

  test(`${backend} fp8_moe is deterministic run to run, and rejects bad device ids with a flag`, {
    skip: !claims(backend, "fp8_moe"),
  }, async () => {
    const r = new Rng(SEED + 1);
    const c = randomMoe(r, { experts: 40, topk: 6, m: 129, weightScale: "per-channel", actScale: "dynamic-tensor" });
    if (!inScope(backend, c)) return; // batch-wide amax: the strictest determinism case
    const a = await moeOn(gpu, backend, c, true), b = await moeOn(gpu, backend, c, false);
    assert.equal(firstDiff(a.data, b.data), -1, "two runs differ");
    // an id outside [-1, E) only reachable on the device (host validation never sees it)
    const bad = { ...c, topkIds: c.topkIds.slice() };
    bad.topkIds[7] = 1000;
    await assert.rejects(moeOn(gpu, backend, bad, true), /topk id outside \[-1, E\)/);
    const asEmpty = { ...c, topkIds: c.topkIds.slice() };
    asEmpty.topkIds[7] = -1; // what the bad slot must have contributed: nothing
    const want = await moeOn(cpu, "reference", asEmpty, true);
    const t = moeTensors(bad);
    using layer = layerOn(gpu, backend, c);
    const y = await layer.forward(gpu.upload(t.x), gpu.upload(t.topkIds), gpu.upload(t.topkWeights));
    await assert.rejects(gpu.synchronize(), /topk id outside/);
    assert.equal(compare(backend, (await (y as DeviceTensor<"bf16">).download()).data, want, c.k), undefined);
  });

  test(
    `${backend} fp8_scaled_mm: ${count(50)} problems match the CPU reference`,
    { skip: !claims(backend, "fp8_scaled_mm") },
    async () => {
      const r = new Rng(SEED + 2);
      let ran = 0;
      for (let i = 0; i < count(50); i++) {
        // every fourth problem is a long-K decode one (hopper_fp8 splits K and adds the partial sums)
        // problems 2 (block-128 / 1x128, in the sanitizer runs' share) and 20 (per-channel / per-token) have
        // more tile pairs than an H100 has CTA pairs (hopper_fp8: 5 x 20, the last pair's second m-tile past
        // M), so persistent clusters walk several
        const splitK = i % 4 === 1, pairs = i === 2 || i === 20;
        const weightScale = pairs ? WEIGHT_SCALES[i === 2 ? 2 : 1] : WEIGHT_SCALES[i % 3];
        const actScale = pairs
          ? ACT_SCALES[i === 2 ? 3 : 2]
          : splitK
          ? ACT_SCALES[2 + (i >> 2) % 2]
          : ACT_SCALES[Math.floor(i / 3) % 4];
        // n a multiple of 16 half the time (what the TMA backends claim); m = 1..128 takes swapped tiles
        // and problem 7 (mod 25) a wide decode one (hopper_fp8: 33..64 rows as two 32-token tiles at N > 4224);
        // problem 10 runs in two passes (hopper_fp8: 4096 rows at K = 16384, then 4 rows that split K)
        const wide = i % 25 === 7, twoPass = i === 10;
        const k = splitK ? 2048 : wide ? 256 : twoPass ? 16384 : pairs ? 384 : dim16(r, 1024), bias = r.next() < 0.5;
        const n = splitK
          ? 128 * r.int(1, 8)
          : wide
          ? 16 * r.int(272, 448)
          : twoPass
          ? 16
          : pairs
          ? 3840
          : i % 2
          ? dim16(r, 700)
          : r.int(1, 700);
        const m = splitK
          ? r.pick([1, 16, 100, 128])
          : wide
          ? r.int(33, 64)
          : twoPass
          ? 4100
          : pairs
          ? 1100
          : r.pick([0, 1, 16, 40, 64, 100, 128, 257, r.int(0, 600)]);
        const mine = gpu.registry.backends.find((b) => b.name === backend)!;
        if (
          mine.supported(gpu.problem({ op: "fp8_scaled_mm", m, n, k, weightScale, actScale, flags: bias ? FLAG_HAS_BIAS : 0 }))
            .priority === null
        ) continue;
        const host = {
          w: tensor("fp8_e4m3", [n, k], fp8Weights(r, n * k)),
          wScale: tensor(
            "f32",
            weightScaleShape(weightScale, n, k),
            r.scales(weightScaleShape(weightScale, n, k).reduce((a, b) => a * b), 1 / 4096),
          ),
          ...(bias ? { bias: tensor("bf16", [n], toBf16(r.values(n))) } : {}),
          ...(actScale === "static-tensor" ? { a1Scale: tensor("f32", [1], [4 / 448]) } : {}),
        };
        const x = tensor("bf16", [m, k], toBf16(r.values(m * k)));
        const run = async (ctx: Context, backend: string) => {
          using lin = new Fp8Linear({ inFeatures: k, outFeatures: n, weightScale, actScale, bias, context: ctx, backend })
            .load(Object.fromEntries(Object.entries(host).map(([key, v]) => [key, ctx.upload(v)])) as never);
          const y = await lin.forward(ctx.upload(x), { out: ctx.upload(poisonedBf16([m, n])) as never });
          return "download" in y ? await (y as DeviceTensor<"bf16">).download() : y;
        };
        const got = await run(gpu, backend), want = await run(cpu, "reference");
        const bad = compare(backend, got.data, want, n), what = `problem ${i} (M=${m} N=${n} K=${k} ${weightScale}/${actScale})`;
        assert.equal(bad, undefined, `${what}: ${bad}`);
        if (TENSOR_CORE_FP8.has(backend) && m > 0) {
          const ref = scaledMmRef({ m, n, k, weightScale, actScale }, {
            x: x.data,
            w: host.w.data,
            wScale: host.wScale.data,
            bias: host.bias?.data,
          });
          const d = dissimilarity(similaritySums(got.data, ref));
          assert.ok(d < SIMILARITY_BAR, `${what}: similarity error ${d} against float64 >= ${SIMILARITY_BAR}`);
        }
        ran++;
      }
      console.log(`${backend} fp8_scaled_mm: ${ran} problems in its claims`);
      assert.ok(ran > 0 || !TENSOR_CORE_FP8.has(backend) || count(50) < 20, "no problem was in scope");
    },
  );

  test(`${backend} topk_softmax: ${count(30)} problems, ids exact`, { skip: !claims(backend, "topk_softmax") }, async () => {
    const r = new Rng(SEED + 3);
    for (let i = 0; i < count(30); i++) {
      const experts = r.pick([1, 8, 60, 128, 257, r.int(1, 300)]), topk = r.int(1, Math.min(8, experts));
      const m = r.pick([0, 1, 257, r.int(0, 2000)]), renormalize = r.next() < 0.5, ties = r.next() < 0.25;
      const logits = tensor(
        "f32",
        [m, experts],
        Float32Array.from({ length: m * experts }, () => ties ? r.int(0, 3) : r.normal() * 4),
      );
      const g = await topkSoftmax(gpu.upload(logits), topk, {
        renormalize,
        context: gpu,
        backend,
        ids: gpu.upload(tensor("i32", [m, topk], new Int32Array(m * topk).fill(-7))) as never,
        weights: gpu.upload(tensor("f32", [m, topk], new Float32Array(m * topk).fill(NaN))) as never,
      });
      const c = await topkSoftmax(logits, topk, { renormalize, context: cpu });
      assert.equal(firstDiff((await (g.ids as DeviceTensor<"i32">).download()).data, c.ids.data), -1, `problem ${i}: ids`);
      const gw = (await (g.weights as DeviceTensor<"f32">).download()).data;
      gw.forEach((w, j) =>
        assert.ok(
          Math.abs(w - c.weights.data[j]) <= 1e-5 * c.weights.data[j] + 1e-9,
          `problem ${i}: weight ${j} ${w} vs ${c.weights.data[j]}`,
        )
      );
    }
  });

  test(`${backend} nvfp4_experts_quant: ${count(30)} problems bit-exact (any E, padding zero)`, {
    skip: !claims(backend, "nvfp4_experts_quant"),
  }, async () => {
    const r = new Rng(SEED + 4);
    for (let i = 0; i < count(30); i++) {
      const experts = r.pick([1, 3, 15, 17, 60, 257, r.int(1, 300)]), k = dim16(r, 512);
      const offsets = new Int32Array(experts + 1);
      for (let e = 0; e < experts; e++) offsets[e + 1] = offsets[e] + (r.next() < 0.3 ? 0 : r.int(0, r.pick([3, 40, 300])));
      const m = offsets[experts];
      const x = tensor("bf16", [m, k], toBf16(r.values(m * k, 3)));
      const gs = tensor("f32", [experts], Float32Array.from({ length: experts }, () => 448 * 6 / (20 * 2 ** (r.next() * 4 - 2))));
      const off = tensor("i32", [experts + 1], offsets), rows = nvfp4ScaleRows(m, experts), cols = Math.ceil(k / 64) * 4;
      const g = await nvfp4ExpertsQuant(gpu.upload(x), gpu.upload(off), gpu.upload(gs), {
        context: gpu,
        backend,
        packed: gpu.upload(tensor("u8", [m, k / 2], new Uint8Array(m * k / 2).fill(0xa5))) as never,
        scales: gpu.upload(tensor("u8", [rows, cols], new Uint8Array(rows * cols).fill(0xa5))) as never,
      });
      const c = await nvfp4ExpertsQuant(x, off, gs, { context: cpu });
      assert.equal(
        firstDiff((await (g.packed as DeviceTensor<"u8">).download()).data, c.packed.data),
        -1,
        `problem ${i} (E=${experts} M=${m} K=${k}): packed`,
      );
      assert.equal(
        firstDiff((await (g.scales as DeviceTensor<"u8">).download()).data, c.scales.data),
        -1,
        `problem ${i} (E=${experts} M=${m} K=${k}): scales`,
      );
    }
  });
}

test("libraries with a static and a shared CUDA runtime share the core's pointers and stream", async () => {
  // cudafix (shared cudart) routes on the device; the fallback (static cudart) consumes its ids with
  // no synchronization in between; the result matches the CPU reference on the same routing.
  const dir = await buildFixture("cudafix", [], "cuda_plugin.cu", [
    "-cudart",
    "shared",
    "-Xlinker",
    "-rpath,/usr/local/cuda/lib64",
  ]);
  using ctx = new Context({ device: "cuda:0", pluginPaths: [dir] });
  assert.deepEqual(ctx.registry.skipped, []);
  const r = new Rng(SEED + 6);
  const c = randomMoe(r, { experts: 32, topk: 4, m: 65, k: 256, n: 128, weightScale: "per-channel", actScale: "dynamic-token" });
  const logits = tensor("f32", [c.m, c.experts], r.values(c.m * c.experts));
  const routed = await topkSoftmax(ctx.upload(logits), c.topk, { context: ctx });
  assert.equal(
    ctx.explain({ op: "topk_softmax", m: c.m, experts: c.experts, topk: c.topk }).find((v) => v.chosen)?.backend,
    "cudafix",
  );
  const t = moeTensors(c);
  using layer = layerOn(ctx, "fallback", c);
  const y = await layer.forward(ctx.upload(t.x), routed.ids, routed.weights);
  const ids = await (routed.ids as DeviceTensor<"i32">).download(),
    weights = await (routed.weights as DeviceTensor<"f32">).download();
  assert.ok(weights.data.every((w) => w === 0.25), "the weights carry the fixture's mark");
  const want = await moeOn(cpu, "reference", { ...c, topkIds: ids.data, topkWeights: weights.data }, true);
  assert.equal(compare("fallback", (await (y as DeviceTensor<"bf16">).download()).data, want, c.k), undefined);
});

for (const backend of BACKENDS) {
  test(`${backend} fp8_moe: a whole forward captures into a CUDA graph (no host sync) and replays on new data`, {
    skip: !claims(backend, "fp8_moe"),
  }, async () => {
    const r = new Rng(SEED + 7);
    const c = randomMoe(r, {
      experts: 60,
      topk: 4,
      m: 40,
      k: 128,
      n: 128,
      weightScale: "block-128",
      actScale: "dynamic-group-128",
    });
    if (!inScope(backend, c)) return;
    const t = moeTensors(c);
    using layer = layerOn(gpu, backend, c);
    const x = gpu.cuda!.upload(t.x),
      ids = gpu.cuda!.upload(t.topkIds),
      w = gpu.cuda!.upload(t.topkWeights),
      out = gpu.cuda!.empty("bf16", [c.m, c.k]);
    await layer.forward(x, ids, w, { out }); // sizes the workspace outside the capture
    await gpu.synchronize();
    using graph = await gpu.cuda!.capture(() => layer.forward(x, ids, w, { out }));
    for (let replay = 0; replay < 2; replay++) {
      const next = {
        ...c,
        x: toBf16(r.values(c.m * c.k)),
        topkWeights: Float32Array.from({ length: c.m * c.topk }, () => r.next()),
        topkIds: Int32Array.from({ length: c.m * c.topk }, () => r.int(-1, c.experts - 1)),
      };
      const nt = moeTensors(next);
      gpu.cuda!.write(x, nt.x), gpu.cuda!.write(ids, nt.topkIds), gpu.cuda!.write(w, nt.topkWeights);
      gpu.cuda!.write(out, poisonedBf16([c.m, c.k]));
      graph.launch();
      const want = await moeOn(cpu, "reference", next, true);
      assert.equal(compare(backend, (await out.download()).data, want, c.k), undefined, `replay ${replay}`);
    }
  });

  test(`${backend} fp8_moe: the workspace query is exact (a canary past it survives, one byte less is refused) and bounded`, {
    skip: !claims(backend, "fp8_moe"),
  }, async () => {
    const b = gpu.registry.backends.find((x) => x.name === backend)!, cuda = gpu.cuda!;
    const r = new Rng(SEED + 8);
    for (const actScale of ["dynamic-token", "dynamic-tensor"] as const) {
      const c = randomMoe(r, { experts: 24, topk: 6, m: 300, k: 256, n: 256, weightScale: "per-channel", actScale });
      if (!inScope(backend, c)) continue;
      const p = moeProblem(c);
      const t = moeTensors(c), w = Object.fromEntries(Object.entries(t.weights).map(([k, v]) => [k, cuda.upload(v)]));
      const handle = b.prepare(p, {
        w13: w.w13.address(),
        w13Scale: w.w13Scale.address(),
        w2: w.w2.address(),
        w2Scale: w.w2Scale.address(),
      });
      const bytes = b.workspaceSize(p), ws = cuda.empty("u8", [bytes + 4096]);
      cuda.fill(ws, 0xa5);
      const x = cuda.upload(t.x),
        ids = cuda.upload(t.topkIds),
        tw = cuda.upload(t.topkWeights),
        out = cuda.empty("bf16", [c.m, c.k]);
      const slots = {
        x: x.address(),
        topkIds: ids.address(),
        topkWeights: tw.address(),
        out: out.address(),
        workspace: ws.address(),
        stream: cuda.stream,
        errorFlags: cuda.errorFlags,
      };
      await b.run(p, handle, { ...slots, workspaceBytes: BigInt(bytes) }, []);
      const tail = (await ws.download()).data.subarray(bytes);
      assert.ok(tail.every((v) => v === 0xa5), `${actScale}: the run wrote past its ${bytes}-byte workspace`);
      assert.equal(compare(backend, (await out.download()).data, await moeOn(cpu, "reference", c, true), c.k), undefined);
      if (bytes > 0) await assert.rejects(b.run(p, handle, { ...slots, workspaceBytes: BigInt(bytes - 1) }, []), /invalid/);
      b.release(handle);
      for (const d of [...Object.values(w), ws, x, ids, tw, out]) d[Symbol.dispose]();
      // chunked above a bound: the workspace stops growing with M
      if (actScale === "dynamic-token") {
        assert.equal(b.workspaceSize({ ...p, m: 100_000 }), b.workspaceSize({ ...p, m: 200_000 }));
      }
    }
  });
}
