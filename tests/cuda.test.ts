// The CUDA backends on any machine: every one is built by CI, loads, reports its manifest and, with
// no GPU, answers for itself why it cannot run ("no CUDA device") while the oracle picks the CPU.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Context } from "../mod.ts";
import { cudaDriver } from "../cuda/driver.ts";

const CUDA_BACKENDS = ["fallback", "hopper_fp8", "nvfp4"];
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
