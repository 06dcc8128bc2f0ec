// One test per validation rule: bad input raises an ArgumentError naming the argument, its shape
// and what was expected, before any native call.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ArgumentError, Context, Fp8Linear, MoeLayer, nvfp4ExpertsQuant, tensor, topkSoftmax } from "../mod.ts";
import { moeTensors, randomMoe, Rng } from "./helpers.ts";
import { nvfp4SiluQuant } from "../core/ops.ts";

const ctx = new Context({ device: "cpu", backend: "reference" });
const c = randomMoe(new Rng(7), {
  experts: 4,
  topk: 2,
  m: 3,
  k: 32,
  n: 16,
  weightScale: "per-channel",
  actScale: "dynamic-token",
});
const t = moeTensors(c);
const config = {
  hidden: 32,
  intermediate: 16,
  experts: 4,
  topk: 2,
  weightScale: "per-channel" as const,
  actScale: "dynamic-token" as const,
  context: ctx,
};
const layer = new MoeLayer(config).load(t.weights);

/** Asserts an ArgumentError for `argument` whose message matches `pattern`. */
async function rejects(f: () => unknown, argument: string, pattern: RegExp) {
  await assert.rejects(async () => await f(), (e: unknown) => {
    assert.ok(e instanceof ArgumentError, `expected ArgumentError, got ${e}`);
    assert.equal(e.code, "invalid_argument");
    assert.equal(e.argument, argument);
    assert.match(e.message, pattern);
    return true;
  });
}

test("layer sizes: positive integers, K and N multiples of 16, topk <= experts", async () => {
  await rejects(() => new MoeLayer({ ...config, hidden: 0 }), "hidden", /an integer >= 1/);
  await rejects(() => new MoeLayer({ ...config, hidden: 40 }), "hidden", /multiple of 16.*got 40/);
  await rejects(() => new MoeLayer({ ...config, intermediate: 24 }), "intermediate", /multiple of 16/);
  await rejects(() => new MoeLayer({ ...config, experts: 2.5 }), "experts", /integer/);
  await rejects(() => new MoeLayer({ ...config, topk: 5 }), "topk", /at most experts = 4/);
  await rejects(
    () => new Fp8Linear({ inFeatures: 20, outFeatures: 4, weightScale: "per-tensor", actScale: "dynamic-token", context: ctx }),
    "inFeatures",
    /multiple of 16/,
  );
});

test("schemes: unknown weight or activation scale names", async () => {
  await rejects(
    () => new MoeLayer({ ...config, weightScale: "per-row" as never }),
    "weightScale",
    /one of per-tensor, per-channel, block-128/,
  );
  await rejects(() => new MoeLayer({ ...config, actScale: "dynamic" as never }), "actScale", /one of static-tensor/);
});

test("weights: dtype, shape (block scales use ceil) and finite positive scales", async () => {
  using l = new MoeLayer(config);
  await rejects(
    () => l.load({ ...t.weights, w13: tensor("u8", [4, 32, 32]) }),
    "w13",
    /expected fp8_e4m3 \[4, 32, 32\] on cpu; got dtype u8/,
  );
  await rejects(
    () => l.load({ ...t.weights, w2: tensor("fp8_e4m3", [4, 16, 32]) }),
    "w2",
    /\(shape \[4, 16, 32\]\): expected fp8_e4m3 \[4, 32, 16\]/,
  );
  await rejects(() => l.load({ ...t.weights, w2Scale: tensor("f32", [4, 16]) }), "w2Scale", /f32 \[4, 32\]/);
  const scale = t.weights.w13Scale.data.slice();
  scale[3] = 0;
  await rejects(
    () => l.load({ ...t.weights, w13Scale: tensor("f32", [4, 32], scale) }),
    "w13Scale",
    /finite scales > 0; element 3 is 0/,
  );
  scale[3] = NaN;
  await rejects(() => l.load({ ...t.weights, w13Scale: tensor("f32", [4, 32], scale) }), "w13Scale", /element 3 is NaN/);
  using block = new MoeLayer({ ...config, hidden: 144, weightScale: "block-128" }); // ceil(144/128) = 2
  await rejects(
    () => block.load({ ...t.weights, w13: tensor("fp8_e4m3", [4, 32, 144]), w13Scale: tensor("f32", [4, 1, 1]) }),
    "w13Scale",
    /f32 \[4, 1, 2\]/,
  );
});

test("static activation scales: required for static-tensor, refused otherwise", async () => {
  using st = new MoeLayer({ ...config, actScale: "static-tensor" });
  await rejects(() => st.load(t.weights), "a1Scale", /a tensor f32 \[1\] on cpu; got none/);
  await rejects(
    () => st.load({ ...t.weights, a1Scale: tensor("f32", [1], [-1]), a2Scale: tensor("f32", [1], [1]) }),
    "a1Scale",
    /finite scales > 0/,
  );
  await rejects(
    () => layer.load({ ...t.weights, a1Scale: tensor("f32", [1], [1]) }),
    "a1Scale",
    /dynamic-token activations compute their own scales/,
  );
});

test("forward: x, ids and weights shapes and dtypes agree", async () => {
  await rejects(
    () => layer.forward(tensor("bf16", [3, 16]), t.topkIds, t.topkWeights),
    "x",
    /\[3, 16\]\): expected bf16 \[3, 32\]/,
  );
  await rejects(() => layer.forward(tensor("f32", [3, 32]), t.topkIds, t.topkWeights), "x", /got dtype f32/);
  await rejects(() => layer.forward(t.x, tensor("i32", [3, 1]), t.topkWeights), "topkIds", /i32 \[3, 2\]/);
  await rejects(() => layer.forward(t.x, t.topkIds, tensor("f32", [2, 2])), "topkWeights", /f32 \[3, 2\]/);
  await rejects(() => layer.forward(t.x, t.topkIds, t.topkWeights, { out: tensor("bf16", [3, 16]) }), "out", /bf16 \[3, 32\]/);
});

test("forward: ids must be in [0, E) or -1; weights finite", async () => {
  await rejects(
    () => layer.forward(t.x, tensor("i32", [3, 2], [0, 1, 2, 4, -1, 0]), t.topkWeights),
    "topkIds",
    /expert ids in \[0, 4\) or -1; \[1, 1\] is 4/,
  );
  await rejects(
    () => layer.forward(t.x, tensor("i32", [3, 2], [0, 1, 2, -2, -1, 0]), t.topkWeights),
    "topkIds",
    /\[1, 1\] is -2/,
  );
  await rejects(
    () => layer.forward(t.x, t.topkIds, tensor("f32", [3, 2], [1, 1, Infinity, 1, 1, 1])),
    "topkWeights",
    /finite values; element 2 is Infinity/,
  );
});

test("tensors: data length must match the shape and dtype", async () => {
  await rejects(() => tensor("bf16", [2, 3], new Uint16Array(5)), "data", /6 elements; got 5/);
  await rejects(
    () => tensor("bf16", [2, 3], new Float32Array(6) as unknown as Uint16Array),
    "data",
    /a Uint16Array \(or plain numbers\) for dtype bf16; got a Float32Array/,
  );
  assert.deepEqual([...tensor("bf16", [2], [1.5, -2]).toFloat32()], [1.5, -2]); // plain numbers are values
  await rejects(() => tensor("f32", [-1, 3]), "shape", /non-negative integer dimensions/);
});

test("topk_softmax: logits f32 [M, E], finite, topk <= E", async () => {
  await rejects(() => topkSoftmax(tensor("f32", [2, 4]), 5, { context: ctx }), "topk", /at most experts = 4/);
  await rejects(() => topkSoftmax(tensor("f32", [2, 4]), 0, { context: ctx }), "topk", /integer >= 1/);
  await rejects(
    () => topkSoftmax(tensor("f32", [2, 4], [0, 0, NaN, 0, 0, 0, 0, 0]), 1, { context: ctx }),
    "logits",
    /element 2 is NaN/,
  );
  await rejects(() => topkSoftmax(tensor("bf16", [2, 4]), 1, { context: ctx }), "logits", /expected f32/);
});

test("nvfp4_experts_quant: K % 16, offsets from 0 to M non-decreasing, positive global scales", async () => {
  const x = tensor("bf16", [5, 32]), gs = tensor("f32", [2], [1, 1]);
  await rejects(
    () => nvfp4ExpertsQuant(tensor("bf16", [5, 24]), tensor("i32", [3], [0, 2, 5]), gs, { context: ctx }),
    "x.shape[1]",
    /multiple of 16/,
  );
  await rejects(
    () => nvfp4ExpertsQuant(x, tensor("i32", [3], [1, 2, 5]), gs, { context: ctx }),
    "expertOffsets",
    /element 0 is 1/,
  );
  await rejects(
    () => nvfp4ExpertsQuant(x, tensor("i32", [3], [0, 3, 2]), gs, { context: ctx }),
    "expertOffsets",
    /element 2 is 2 < 3/,
  );
  await rejects(
    () => nvfp4ExpertsQuant(x, tensor("i32", [3], [0, 2, 4]), gs, { context: ctx }),
    "expertOffsets",
    /element 2 is 4, not 5/,
  );
  await rejects(() => nvfp4ExpertsQuant(x, tensor("i32", [2], [0, 5]), gs, { context: ctx }), "expertOffsets", /i32 \[3\]/);
  await rejects(
    () => nvfp4ExpertsQuant(x, tensor("i32", [3], [0, 2, 5]), tensor("f32", [2], [1, 0]), { context: ctx }),
    "globalScale",
    /element 1 is 0/,
  );
});

test("nvfp4_silu_quant: x [M, 2N] with N % 16 == 0, the offsets and scales as nvfp4_experts_quant", async () => {
  const gs = tensor("f32", [2], [1, 1]), off = tensor("i32", [3], [0, 2, 5]);
  await rejects(
    () => nvfp4SiluQuant(tensor("bf16", [5, 48]), off, gs, { context: ctx }),
    "x.shape[1] / 2",
    /multiple of 16.*got 24/,
  );
  await rejects(
    () => nvfp4SiluQuant(tensor("bf16", [5, 64]), tensor("i32", [3], [0, 3, 2]), gs, { context: ctx }),
    "expertOffsets",
    /element 2 is 2 < 3/,
  );
  await rejects(
    () => nvfp4SiluQuant(tensor("bf16", [5, 64]), off, gs, { context: ctx, packed: tensor("u8", [5, 32]) }),
    "packed",
    /u8 \[5, 16\]/,
  );
  await rejects(
    () => nvfp4SiluQuant(tensor("bf16", [5, 64]), off, tensor("f32", [2], [1, NaN]), { context: ctx }),
    "globalScale",
    /element 1 is NaN/,
  );
});

test("a layer used before load or after dispose raises", async () => {
  const l = new MoeLayer(config);
  await assert.rejects(l.forward(t.x, t.topkIds, t.topkWeights), /call load\(\) first/);
  l.load(t.weights)[Symbol.dispose]();
  await assert.rejects(l.forward(t.x, t.topkIds, t.topkWeights), /call load\(\) first/);
});
