// The example plugin end to end: build it, drop it in, see the oracle choose it, run it, and check
// that it agrees with the built-in reference bit for bit.
//
//   deno run -A examples/plugin/run.ts        bun run examples/plugin/run.ts
//
// Needs the built-in backends (`deno task build`) for the comparison with the reference.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { compileShared } from "../../backends/build.ts";
import { Context, formatVerdicts, tensor, topkSoftmax } from "../../mod.ts";

// 1. Build: the same cc flags as `deno task build` (compileShared adds -I backends, -O3, -lm, ...).
const dir = mkdtempSync(join(tmpdir(), "moeffi-example-plugin-"));
const source = fileURLToPath(new URL("./example_topk.c", import.meta.url));
await compileShared("example_topk", [source], join(dir, "libexample_topk.so"));
console.log(`built ${join(dir, "libexample_topk.so")}`);

try {
  // 2. Drop it in: every library in a plugin folder is loaded and checked (MOEFFI_PLUGIN_PATH does the same).
  using ctx = new Context({ device: "cpu", pluginPaths: [dir] });
  for (const s of ctx.registry.skipped) console.log(`skipped ${s.path}: ${s.reason}`);

  // 3. See it chosen: every backend's verdict, `*` marks the one that runs.
  const tokens = 4, experts = 8, topk = 2;
  console.log(`\ntopk_softmax M=${tokens} E=${experts} topk=${topk}:`);
  console.log(formatVerdicts(ctx.explain({ op: "topk_softmax", m: tokens, experts, topk })));
  console.log(`\ntopk_softmax M=${tokens} E=512 topk=${topk} (beyond what the plugin claims):`);
  console.log(formatVerdicts(ctx.explain({ op: "topk_softmax", m: tokens, experts: 512, topk })));

  // 4. Run it. Row 1 has an exact tie (experts 2 and 5): the lower id comes first.
  const rows = [
    [0.1, 2.0, -1.0, 0.5, 1.5, 0.0, -0.5, 0.3],
    [1.0, 0.0, 3.0, -2.0, 0.5, 3.0, 1.0, 0.0],
    [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0],
    [4.0, -3.0, 2.5, 0.0, 1.0, -1.0, 2.5, 0.2],
  ];
  const logits = tensor("f32", [tokens, experts], rows.flat());
  const chosen = ctx.explain({ op: "topk_softmax", m: tokens, experts, topk }).find((v) => v.chosen)?.backend;
  console.log(`\nchosen backend: ${chosen}`);
  for (const renormalize of [false, true]) {
    const mine = await topkSoftmax(logits, topk, { context: ctx, renormalize });
    const ref = await topkSoftmax(logits, topk, { context: ctx, renormalize, backend: "reference" }); // forced: strict
    console.log(`renormalize=${renormalize}:`);
    for (let r = 0; r < tokens; r++) {
      const row = [...mine.ids.data.subarray(r * topk, (r + 1) * topk)].map((id, s) =>
        `${id}:${mine.weights.data[r * topk + s].toFixed(6)}`
      );
      console.log(`  row ${r}: ${row.join("  ")}`);
    }
    const same = (a: ArrayLike<number>, b: ArrayLike<number>) =>
      a.length === b.length && Array.from(a).every((v, i) => Object.is(v, b[i]));
    const exact = same(mine.ids.data, ref.ids.data) && same(mine.weights.data, ref.weights.data);
    console.log(`  equal to the reference bit for bit: ${exact}`);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
