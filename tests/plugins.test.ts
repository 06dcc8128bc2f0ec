// Plugin loading and the oracle: drop-in plugins, bad libraries skipped with their reasons, and
// every selection rule (priority, strict forcing, disable, batch invariance, explain, env).
import { test } from "node:test";
import assert from "node:assert/strict";
import { Context, type MoeffiError, tensor, topkSoftmax } from "../mod.ts";
import { optionsFromEnv } from "../core/oracle.ts";
import { buildFixture } from "./helpers.ts";

const logits = tensor("f32", [2, 4], [0.5, 2, 1, -1, 3, 3, 0, 1]);
const topk = { op: "topk_softmax" as const, m: 2, experts: 4, topk: 2 };

test("built-ins: the reference backend loads with its manifest and answers for the CPU", () => {
  using ctx = new Context({ device: "cpu" });
  const ref = ctx.registry.backends.find((b) => b.name === "reference");
  assert.ok(ref, `reference not loaded; skipped: ${JSON.stringify(ctx.registry.skipped)}`);
  assert.equal(ref.manifest.device, "cpu");
  assert.deepEqual(ref.manifest.ops, ["fp8_moe", "fp8_scaled_mm", "topk_softmax", "nvfp4_experts_quant", "nvfp4_silu_quant"]);
  assert.deepEqual(ref.manifest.batchInvariantOps, ref.manifest.ops);
  assert.ok(ref.builtin);
});

test("a plugin dropped into MOEFFI_PLUGIN_PATH is selected by its priority and runs", async () => {
  const dir = await buildFixture("dropin", [`FIXTURE_NAME="dropin"`, "FIXTURE_PRIORITY=10"]);
  process.env.MOEFFI_PLUGIN_PATH = dir;
  try {
    using ctx = new Context({ device: "cpu" });
    const verdicts = ctx.explain(topk);
    assert.equal(verdicts.find((v) => v.chosen)?.backend, "dropin");
    assert.equal(verdicts.find((v) => v.backend === "reference")?.priority, 0);
    const { ids, weights } = await topkSoftmax(logits, 2, { context: ctx });
    assert.deepEqual([...ids.data], [1, 2, 0, 1]); // ties: lower id first
    assert.deepEqual([...weights.data], [0.25, 0.25, 0.25, 0.25]); // the fixture's mark: it ran
    // problems it does not implement still go to the reference
    assert.equal(
      ctx.explain({ op: "fp8_moe", m: 1, k: 16, n: 16, experts: 1, topk: 1 }).find((v) => v.chosen)?.backend,
      "reference",
    );
  } finally {
    delete process.env.MOEFFI_PLUGIN_PATH;
  }
});

test("a lower priority plugin loses to the reference; the pluginPaths option works like the env", async () => {
  const dir = await buildFixture("low", [`FIXTURE_NAME="low"`, "FIXTURE_PRIORITY=0"]);
  using ctx = new Context({ device: "cpu", pluginPaths: [dir] });
  const v = ctx.explain(topk);
  assert.equal(v.find((x) => x.chosen)?.backend, "reference"); // equal priority: the first loaded wins
  assert.equal(v.find((x) => x.backend === "low")?.priority, 0);
});

test("bad plugins are skipped with their reason while the others keep working", async () => {
  const dirs = await Promise.all([
    buildFixture("missing", [`FIXTURE_NAME="missing"`, "FIXTURE_OMIT_RELEASE"]),
    buildFixture("abi", [`FIXTURE_NAME="abi"`, "FIXTURE_ABI=99"]),
    buildFixture("clash", [`FIXTURE_NAME="reference"`]),
    buildFixture("layout", [`FIXTURE_NAME="layout"`, "FIXTURE_BAD_LAYOUT"]),
    buildFixture("good", [`FIXTURE_NAME="good"`, "FIXTURE_PRIORITY=5"]),
  ]);
  using ctx = new Context({ device: "cpu", pluginPaths: [...dirs, "/nonexistent/moeffi-plugins"] });
  const reason = (file: string) => ctx.registry.skipped.find((s) => s.path.includes(file))?.reason ?? "(not skipped)";
  assert.match(reason("missing.so"), /moeffi_release/);
  assert.match(reason("abi.so"), /ABI version 99, core expects 1/);
  assert.match(reason("clash.so"), /"reference" is reserved for a built-in/);
  assert.match(reason("layout.so"), /layout differs/);
  assert.match(reason("/nonexistent/moeffi-plugins"), /does not exist/);
  assert.deepEqual(ctx.registry.backends.filter((b) => !b.builtin).map((b) => b.name), ["good"]);
  const { weights } = await topkSoftmax(logits, 2, { context: ctx });
  assert.equal(weights.data[0], 0.25); // "good" (priority 5) runs
  // explain lists every backend, loaded or not
  const v = ctx.explain(topk);
  assert.equal(v.length, ctx.registry.backends.length + ctx.registry.skipped.length);
  assert.ok(v.filter((x) => x.reason.startsWith("not loaded:")).length === ctx.registry.skipped.length);
});

test("forcing a backend is strict: unknown or unsupporting names raise with reasons", async () => {
  const reject = await buildFixture("reject", [`FIXTURE_NAME="reject"`, "FIXTURE_REJECT"]);
  using ctx = new Context({ device: "cpu", pluginPaths: [reject] });
  await assert.rejects(
    topkSoftmax(logits, 2, { context: ctx, backend: "nope" }),
    (e: MoeffiError) => e.code === "unknown_backend" && /unknown backend "nope"; loaded: .*reference.*, reject/.test(e.message),
  );
  await assert.rejects(
    topkSoftmax(logits, 2, { context: ctx, backend: "reject" }),
    (e: MoeffiError) => e.code === "backend_rejected" && /"reject" \(forced\).*fixture rejects everything/.test(e.message),
  );
  using forced = new Context({ device: "cpu", pluginPaths: [reject], backend: "reference" });
  assert.equal(forced.explain(topk).find((v) => v.chosen)?.backend, "reference");
});

test("when nothing fits, the error lists every backend's reason", async () => {
  using ctx = new Context({ device: "cpu", disable: ["reference"] });
  await assert.rejects(
    topkSoftmax(logits, 2, { context: ctx }),
    (e: MoeffiError) =>
      e.code === "no_backend" && /no backend supports topk_softmax \(M=2 E=4 topk=2\) on cpu/.test(e.message) &&
      /reference: no, disabled by MOEFFI_DISABLE/.test(e.message),
  );
});

test("batch invariance: only claiming backends, and dynamic per-tensor activations are refused", async () => {
  using ctx = new Context({ device: "cpu", batchInvariant: true });
  const moe = { op: "fp8_moe" as const, m: 4, k: 32, n: 32, experts: 2, topk: 1, weightScale: "per-channel" as const };
  assert.equal(ctx.explain({ ...moe, actScale: "dynamic-token" }).find((v) => v.chosen)?.backend, "reference");
  const v = ctx.explain({ ...moe, actScale: "dynamic-tensor" });
  assert.equal(v.find((x) => x.chosen), undefined);
  assert.match(
    v.find((x) => x.backend === "reference")!.reason,
    /dynamic per-tensor activation scales depend on the whole batch/,
  );
  // a backend that does not claim batch invariance for the op is refused for it
  const noClaim = await buildFixture("noclaim", [`FIXTURE_NAME="noclaim"`, "FIXTURE_NO_INVARIANCE"]);
  using ctx2 = new Context({ device: "cpu", batchInvariant: true, pluginPaths: [noClaim] });
  assert.match(
    ctx2.explain(topk).find((x) => x.backend === "noclaim")!.reason,
    /does not claim batch invariance for topk_softmax/,
  );
});

test("the environment: MOEFFI_BACKEND, MOEFFI_DISABLE, MOEFFI_BATCH_INVARIANT, MOEFFI_LOG", () => {
  const env: Record<string, string> = {
    MOEFFI_BACKEND: "reference",
    MOEFFI_DISABLE: "a, b",
    MOEFFI_BATCH_INVARIANT: "1",
    MOEFFI_LOG: "debug",
  };
  assert.deepEqual(optionsFromEnv((k) => env[k]), { backend: "reference", disable: ["a", "b"], batchInvariant: true, log: true });
  assert.deepEqual(optionsFromEnv(() => undefined), {
    backend: undefined,
    disable: undefined,
    batchInvariant: false,
    log: false,
  });
  process.env.MOEFFI_DISABLE = "reference";
  try {
    using ctx = new Context({ device: "cpu" });
    assert.equal(ctx.explain(topk).find((v) => v.backend === "reference")?.reason, "disabled by MOEFFI_DISABLE");
  } finally {
    delete process.env.MOEFFI_DISABLE;
  }
});

test("MOEFFI_LOG=debug logs every verdict to stderr", async () => {
  const lines: string[] = [];
  const original = console.error;
  console.error = (...a: unknown[]) => void lines.push(a.join(" "));
  try {
    using ctx = new Context({ device: "cpu", log: true });
    await topkSoftmax(logits, 2, { context: ctx });
  } finally {
    console.error = original;
  }
  assert.ok(lines.some((l) => /topk_softmax: reference chosen: exact CPU reference/.test(l)), lines.join("\n"));
});
