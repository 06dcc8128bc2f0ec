// Batch invariance of the reference: a needle row put first and last in batches of random rows
// gives exactly the bits it gives alone (rtol = atol = 0), for every batch-invariant scheme.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Context, Fp8Linear, MoeLayer, tensor, toBf16 } from "../mod.ts";
import { firstDiff, fp8Weights, moeTensors, randomMoe, Rng, seed } from "./helpers.ts";
import type { ActScale, WeightScale } from "../ffi/abi.ts";

const SEED = seed();
const ctx = new Context({ device: "cpu", batchInvariant: true });
const SIZES = [1, 16, 17, 32, 64, 65, 256, 257];
const SCHEMES: [WeightScale, ActScale][] = [["per-channel", "dynamic-token"], ["block-128", "dynamic-group-128"], [
  "per-tensor",
  "static-tensor",
]];

/** Row r of a [rows, cols] bf16 batch. */
const rows = (a: Uint16Array, cols: number, r: number) => a.slice(r * cols, (r + 1) * cols);

for (const [weightScale, actScale] of SCHEMES) {
  test(`fp8_moe ${weightScale}/${actScale}: a needle row is bit-identical in batches of ${SIZES.join(", ")}`, async () => {
    const r = new Rng(SEED);
    const base = randomMoe(r, { experts: 16, topk: 4, m: 1, k: 256, n: 144, weightScale, actScale });
    using layer = new MoeLayer({ hidden: 256, intermediate: 144, experts: 16, topk: 4, weightScale, actScale, context: ctx })
      .load(moeTensors(base).weights);
    assert.equal(layer.backendName, "reference");
    const needle = moeTensors(base);
    const alone = await layer.forward(needle.x, needle.topkIds, needle.topkWeights);
    for (const m of SIZES) {
      const filler = randomMoe(r, { experts: 16, topk: 4, m, k: 256, n: 144, weightScale, actScale });
      for (const at of m === 1 ? [0] : [0, m - 1]) {
        const x = filler.x.slice(), ids = filler.topkIds.slice(), w = filler.topkWeights.slice();
        x.set(base.x, at * 256), ids.set(base.topkIds, at * 4), w.set(base.topkWeights, at * 4);
        const out = await layer.forward(tensor("bf16", [m, 256], x), tensor("i32", [m, 4], ids), tensor("f32", [m, 4], w));
        assert.equal(firstDiff(rows(out.data, 256, at), alone.data), -1, `batch ${m}, needle at row ${at}`);
      }
    }
  });
}

test("fp8_scaled_mm per-channel/dynamic-token: a needle row is bit-identical in every batch size", async () => {
  const r = new Rng(SEED + 1);
  const k = 2048, n = 1024; // the first shape of vLLM's batch-invariant linear test
  const w = fp8Weights(r, n * k);
  using lin = new Fp8Linear({
    inFeatures: k,
    outFeatures: n,
    weightScale: "per-channel",
    actScale: "dynamic-token",
    context: ctx,
  })
    .load({ w: tensor("fp8_e4m3", [n, k], w), wScale: tensor("f32", [n], r.scales(n, 1 / 4096)) });
  const needle = toBf16(r.values(k));
  const alone = await lin.forward(tensor("bf16", [1, k], needle));
  for (const m of SIZES) {
    for (const at of m === 1 ? [0] : [0, m - 1]) {
      const x = toBf16(r.values(m * k));
      x.set(needle, at * k);
      const out = await lin.forward(tensor("bf16", [m, k], x));
      assert.equal(firstDiff(rows(out.data, n, at), alone.data), -1, `batch ${m}, needle at row ${at}`);
    }
  }
});
