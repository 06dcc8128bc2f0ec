// Host-side FFI overhead, under whichever runtime runs this file (deno run -A bench/ffi.ts; bun run
// bench/ffi.ts). tinybench's per-sample timer cannot resolve one call, so each sample is a batch.
import { Bench } from "tinybench";
import { writeFileSync } from "node:fs";
import { Context, tensor, topkSoftmax } from "../mod.ts";
import { PLUGIN_SYMBOLS } from "../ffi/abi.ts";
import { runtime } from "../ffi/runtime.ts";

const BATCH = 1000;
const ctx = new Context({ device: "cpu", backend: "reference" });
const reference = ctx.registry.backends.find((b) => b.name === "reference")!;
const raw = runtime.open(reference.path, PLUGIN_SYMBOLS).symbols;
const problem = ctx.problem({ op: "topk_softmax", m: 1, experts: 8, topk: 2 });
const logits = tensor("f32", [1, 8], [1, 2, 3, 4, 5, 6, 7, 8]);

const bench = new Bench({ time: 500, warmupTime: 100 });
bench.add(`raw call: moeffi_abi_version() x${BATCH}`, () => {
  for (let i = 0; i < BATCH; i++) raw.moeffi_abi_version();
});
bench.add(`ABI call with structs: supported(problem) x${BATCH}`, () => {
  for (let i = 0; i < BATCH; i++) reference.supported(problem);
});
bench.add(`whole op: topkSoftmax M=1 E=8 (validate, select, run) x${BATCH / 10}`, async () => {
  for (let i = 0; i < BATCH / 10; i++) await topkSoftmax(logits, 2, { context: ctx });
});
await bench.run();

const name = "Bun" in globalThis
  ? `bun ${(globalThis as unknown as { Bun: { version: string } }).Bun.version}`
  : `deno ${Deno.version.deno}`;
const rows = bench.tasks.map((t) => {
  const r = t.result as unknown as { latency: { p50: number } };
  const per = t.name.includes("whole op") ? BATCH / 10 : BATCH;
  return { runtime: name, task: t.name, "median per call (us)": +((r.latency.p50 * 1000) / per).toFixed(3) };
});
console.table(rows);
const file = new URL(`./results/ffi-${name.split(" ")[0]}.json`, import.meta.url);
writeFileSync(file, JSON.stringify({ date: new Date().toISOString(), rows }, null, 2) + "\n");
