// The plugin-author walkthrough's plugin (examples/plugin/example_topk.c): it builds without help,
// loads, wins topk_softmax over the reference by priority, refuses what it does not claim, and its
// ids and weights equal the reference's bit for bit.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { compileShared, ROOT } from "../backends/build.ts";
import { Context, type MoeffiError, tensor, topkSoftmax } from "../mod.ts";
import { firstDiff, Rng, seed } from "./helpers.ts";

const SEED = seed();
console.log(`example_plugin.test.ts: MOEFFI_TEST_SEED=${SEED}`);

const dir = mkdtempSync(join(tmpdir(), "moeffi-example-plugin-"));
await compileShared("example_topk", [join(ROOT, "examples", "plugin", "example_topk.c")], join(dir, "libexample_topk.so"));
const ctx = new Context({ device: "cpu", pluginPaths: [dir] });
const NAME = "example_topk";
const topk = (m: number, experts: number, k: number) => ({ op: "topk_softmax" as const, m, experts, topk: k });
const chosen = (c: Context, spec: ReturnType<typeof topk>) => c.explain(spec).find((v) => v.chosen)?.backend;

test("example plugin: builds and loads with its manifest", () => {
  assert.deepEqual(ctx.registry.skipped.filter((s) => s.path.startsWith(dir)), []);
  const b = ctx.registry.backends.find((x) => x.name === NAME);
  assert.ok(b, `${NAME} not loaded; skipped: ${JSON.stringify(ctx.registry.skipped)}`);
  assert.ok(!b.builtin);
  assert.equal(b.manifest.device, "cpu");
  assert.equal(b.manifest.priority, 5);
  assert.deepEqual(b.manifest.ops, ["topk_softmax"]);
  assert.deepEqual(b.manifest.batchInvariantOps, ["topk_softmax"]);
  assert.ok(
    ctx.registry.backends.some((x) => x.name === "reference"),
    `the reference backend is not loaded (run \`deno task build\`); skipped: ${JSON.stringify(ctx.registry.skipped)}`,
  );
});

test("example plugin: chosen for topk_softmax over the reference, refused beyond its claims", () => {
  const v = ctx.explain(topk(16, 128, 8));
  assert.equal(v.find((x) => x.chosen)?.backend, NAME);
  assert.equal(v.find((x) => x.backend === NAME)?.priority, 5);
  assert.equal(v.find((x) => x.backend === "reference")?.priority, 0);
  assert.equal(chosen(ctx, topk(0, 1, 1)), NAME);
  assert.equal(chosen(ctx, topk(3, 300, 8)), NAME);
  // what it does not claim goes to the reference, with the plugin's own reason
  for (const [e, k] of [[301, 2], [64, 9]]) {
    const w = ctx.explain(topk(4, e, k));
    assert.equal(w.find((x) => x.chosen)?.backend, "reference");
    assert.match(w.find((x) => x.backend === NAME)!.reason, /tested for experts <= 300 and topk <= 8/);
  }
  assert.match(
    ctx.explain({ op: "fp8_moe", m: 1, k: 16, n: 16, experts: 1, topk: 1 }).find((x) => x.backend === NAME)!.reason,
    /does not implement fp8_moe/,
  );
  // it claims batch invariance for topk_softmax, so it stays eligible when that is asked
  using inv = new Context({ device: "cpu", pluginPaths: [dir], batchInvariant: true });
  assert.equal(chosen(inv, topk(8, 64, 2)), NAME);
});

test("example plugin: ids and weights equal the reference bit for bit (random, ties, renormalize)", async () => {
  const r = new Rng(SEED);
  let rows = 0, tieRows = 0;
  for (let i = 0; i < 100; i++) {
    const experts = r.pick([1, 2, 3, 8, 60, 64, 128, 256, 257, 300, r.int(1, 300)]);
    const k = r.int(1, Math.min(8, experts));
    const m = i < 2 ? 0 : r.pick([1, 2, 7, r.int(0, 16)]);
    const renormalize = i % 2 === 1;
    const kind = r.pick(["normal", "few", "flat", "wide"] as const);
    const logits = new Float32Array(m * experts);
    for (let row = 0; row < m; row++) {
      const at = row * experts;
      for (let e = 0; e < experts; e++) {
        logits[at + e] = kind === "few"
          ? r.int(-2, 2) / 2 // a few values: ties everywhere
          : kind === "flat"
          ? 0.75 // one value: every expert ties
          : kind === "wide"
          ? r.normal() * 40 // exp underflows to 0 for most experts
          : r.normal() * 3;
      }
      // copy the row's largest logit to another expert, so the top slots tie exactly
      if (experts > 1 && r.next() < 0.3) {
        let best = 0;
        for (let e = 1; e < experts; e++) if (logits[at + e] > logits[at + best]) best = e;
        logits[at + r.int(0, experts - 1)] = logits[at + best];
      }
      const row0 = logits.subarray(at, at + experts);
      if (new Set(row0).size < experts) tieRows++;
    }
    rows += m;
    const x = tensor("f32", [m, experts], logits);
    // outputs start poisoned, so an element a backend never wrote cannot pass
    const run = (backend: string) =>
      topkSoftmax(x, k, {
        context: ctx,
        renormalize,
        backend, // forced, so strict: this backend runs or the call raises
        ids: tensor("i32", [m, k], new Int32Array(m * k).fill(-7)),
        weights: tensor("f32", [m, k], new Float32Array(m * k).fill(NaN)),
      });
    const mine = await run(NAME), ref = await run("reference");
    const what = `problem ${i}: M=${m} E=${experts} topk=${k} ${kind} renormalize=${renormalize}`;
    assert.equal(firstDiff(mine.ids.data, ref.ids.data), -1, `${what}: ids`);
    const bits = (f: Float32Array) => new Uint32Array(f.buffer, f.byteOffset, f.length);
    assert.equal(firstDiff(bits(mine.weights.data), bits(ref.weights.data)), -1, `${what}: weight bits`);
    assert.ok(!mine.ids.data.includes(-7), `${what}: an id was not written`);
  }
  assert.ok(rows >= 200, `only ${rows} rows`);
  assert.ok(tieRows >= 20, `only ${tieRows} rows with ties`);
});

test("example plugin: run() validates its pointers and reports through the message buffer", async () => {
  const b = ctx.registry.backends.find((x) => x.name === NAME)!;
  await assert.rejects(
    b.run(ctx.problem(topk(2, 8, 2)), 0n, {}, []),
    (e: MoeffiError) =>
      e.code === "backend_failed" && /run of topk_softmax failed \(invalid\): tensors->x is NULL/.test(e.message),
  );
  await b.run(ctx.problem(topk(0, 8, 2)), 0n, {}, []); // M = 0: nothing to read or write, so NULL is fine
  assert.equal(b.prepare(ctx.problem(topk(2, 8, 2)), {}), 0n); // no weights: a NULL handle
  assert.equal(b.workspaceSize(ctx.problem(topk(2, 8, 2))), 0);
});

test("example plugin: close the context and remove the build folder", () => {
  ctx[Symbol.dispose]();
  assert.equal(ctx.registry.backends.length, 0);
  rmSync(dir, { recursive: true, force: true });
});
