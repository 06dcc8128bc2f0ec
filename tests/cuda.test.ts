// The CUDA backends on any machine: every one is built by CI, loads, reports its manifest and, with
// no GPU, answers for itself why it cannot run ("no CUDA device") while the oracle picks the CPU.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Context, explain } from "../mod.ts";
import { FLAG_BATCH_INVARIANT } from "../ffi/abi.ts";
import { cudaDriver } from "../cuda/driver.ts";

const CUDA_BACKENDS = ["fallback", "hopper_fp8", "batch_invariant_fp8", "nvfp4"];
const noGpu = "error" in cudaDriver();

test("every CUDA backend loads and reports a CUDA manifest", () => {
  using ctx = new Context({ device: "cpu" });
  for (const name of CUDA_BACKENDS) {
    const b = ctx.registry.backends.find((x) => x.name === name);
    assert.ok(b, `${name} not loaded: ${JSON.stringify(ctx.registry.skipped)}`);
    assert.equal(b.manifest.device, "cuda");
    assert.ok(b.manifest.ops.length > 0);
  }
});

test(
  "without a GPU each CUDA backend says why, and the oracle picks the reference",
  { skip: !noGpu && "a GPU is present" },
  () => {
    using ctx = new Context({ device: "cpu" });
    const moe = {
      op: "fp8_moe" as const,
      m: 4,
      k: 64,
      n: 32,
      experts: 4,
      topk: 2,
      weightScale: "per-channel" as const,
      actScale: "dynamic-token" as const,
    };
    for (const name of CUDA_BACKENDS) {
      const b = ctx.registry.backends.find((x) => x.name === name)!;
      const onGpu = b.supported({ ...ctx.problem(moe), device: "cuda", deviceIndex: 0 });
      assert.equal(onGpu.priority, null);
      assert.match(onGpu.reason, /no CUDA device/i);
      assert.match(b.supported(ctx.problem(moe)).reason, /CPU/);
    }
    assert.equal(ctx.explain(moe).find((v) => v.chosen)?.backend, "reference");
    assert.throws(() => new Context({ device: "cuda:0" }), /no CUDA/);
  },
);

test("batch_invariant_fp8 claims bitwise invariance and hopper_fp8 does not; the oracle says why each is refused", () => {
  using ctx = new Context({ device: "cpu" });
  const bi = ctx.registry.backends.find((x) => x.name === "batch_invariant_fp8")!;
  const hopper = ctx.registry.backends.find((x) => x.name === "hopper_fp8")!;
  assert.deepEqual(bi.manifest.batchInvariantOps, ["fp8_moe", "fp8_scaled_mm"]);
  assert.deepEqual(hopper.manifest.batchInvariantOps, []);
  assert.ok(!bi.manifest.actScales.includes("dynamic-tensor"), "a batch-wide activation scale is not row-local");
  assert.deepEqual([...bi.manifest.actScales].sort(), ["dynamic-group-128", "dynamic-token", "static-tensor"]);
  const moe = {
    op: "fp8_moe" as const,
    m: 4,
    k: 256,
    n: 128,
    experts: 8,
    topk: 2,
    weightScale: "block-128" as const,
    actScale: "dynamic-group-128" as const,
  };
  const onGpu = { ...ctx.problem(moe), device: "cuda" as const, deviceIndex: 0 };
  const verdicts = explain(ctx.registry, onGpu, { batchInvariant: true });
  const why = (name: string) => verdicts.find((v) => v.backend === name)!;
  assert.match(why("hopper_fp8").reason, /does not claim batch invariance for fp8_moe/);
  assert.match(why("nvfp4").reason, /does not implement fp8_moe/);
  if (noGpu) assert.match(why("batch_invariant_fp8").reason, /no CUDA device/i);
  else assert.equal(verdicts.find((v) => v.chosen)?.backend, "batch_invariant_fp8");
  // hopper_fp8 itself refuses the flag (a plugin asked directly, without the oracle's filter)
  assert.match(hopper.supported({ ...onGpu, flags: FLAG_BATCH_INVARIANT }).reason, /not batch invariant|no CUDA device/);
  // dynamic per-tensor scales: refused by the oracle for every backend, with the reason
  const dyn = explain(ctx.registry, { ...onGpu, actScale: "dynamic-tensor" }, { batchInvariant: true });
  assert.ok(dyn.every((v) => !v.chosen));
  assert.match(dyn.find((v) => v.backend === "batch_invariant_fp8")!.reason, /depend on the whole batch/);
});
