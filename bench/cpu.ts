// CPU benchmark of the exact reference backend: one MoE layer of each preset at small M, timed with
// tinybench (wall time of the whole forward: validation, FFI call and compute). The GPU harness
// with CUDA events, ceilings and the PyTorch peer belongs to the CUDA issue.
//
//   deno task bench        (or: bun run bench/cpu.ts)     MOEFFI_BENCH_PRESETS=qwen3-30b-a3b
import { Bench } from "tinybench";
import { writeFileSync } from "node:fs";
import { cpus, hostname } from "node:os";
import { MoeLayer, tensor, toBf16 } from "../mod.ts";
import type { ActScale, WeightScale } from "../ffi/abi.ts";
import { weightScaleShape } from "../core/validate.ts";

const PRESETS = {
  "qwen3-30b-a3b": { k: 2048, n: 768, experts: 128, topk: 8 },
  "qwen1.5-moe-a2.7b": { k: 2048, n: 1408, experts: 60, topk: 4 },
};
const SCHEMES: [WeightScale, ActScale][] = [["per-channel", "dynamic-token"], ["block-128", "dynamic-group-128"]];
const M_VALUES = [1, 16];
const chosen = (process.env.MOEFFI_BENCH_PRESETS ?? "qwen3-30b-a3b").split(",");

let state = 0x9e3779b9;
const next = () => ((state ^= state << 13), (state ^= state >>> 17), (state ^= state << 5), state >>> 0);
const codes = (n: number) => {
  const a = new Uint8Array(n);
  for (let i = 0; i < n; i++) a[i] = next() % 0x6c | (next() & 0x80);
  return a;
};

const rows: Record<string, string | number>[] = [];
for (const name of chosen) {
  const p = PRESETS[name as keyof typeof PRESETS];
  if (!p) throw new Error(`unknown preset ${name}; known: ${Object.keys(PRESETS).join(", ")}`);
  const { k, n, experts: e, topk } = p;
  const w13 = tensor("fp8_e4m3", [e, 2 * n, k], codes(e * 2 * n * k)), w2 = tensor("fp8_e4m3", [e, k, n], codes(e * k * n));
  for (const [weightScale, actScale] of SCHEMES) {
    const scale = (shape: number[]) => tensor("f32", shape, new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(1 / 1024));
    using layer = new MoeLayer({ hidden: k, intermediate: n, experts: e, topk, weightScale, actScale }).load({
      w13,
      w13Scale: scale(weightScaleShape(weightScale, 2 * n, k, e)),
      w2,
      w2Scale: scale(weightScaleShape(weightScale, k, n, e)),
    });
    for (const m of M_VALUES) {
      const x = tensor("bf16", [m, k], toBf16(Float32Array.from({ length: m * k }, () => next() / 2 ** 32 - 0.5)));
      const ids = tensor("i32", [m, topk], Int32Array.from({ length: m * topk }, () => next() % e));
      const w = tensor("f32", [m, topk], new Float32Array(m * topk).fill(1 / topk));
      const bench = new Bench({ iterations: 10, warmupIterations: 2, time: 0, warmupTime: 0 });
      bench.add(`${name} M=${m}`, async () => void await layer.forward(x, ids, w));
      await bench.run();
      const t = bench.tasks[0].result as unknown as { latency: { p50: number; min: number; max: number } };
      rows.push({
        preset: name,
        m,
        scheme: `${weightScale}/${actScale}`,
        backend: layer.backendName,
        "median ms": +t.latency.p50.toFixed(2),
        "min ms": +t.latency.min.toFixed(2),
        "max ms": +t.latency.max.toFixed(2),
      });
      console.log(rows.at(-1));
    }
  }
}
const runtimeName = "Bun" in globalThis ? "bun" : "deno";
const report = {
  date: new Date().toISOString(),
  runtime: runtimeName,
  cpu: cpus()[0]?.model,
  cores: cpus().length,
  host: hostname(),
  omp: process.env.OMP_NUM_THREADS ?? "default",
  rows,
};
writeFileSync(new URL(`./results/cpu-${runtimeName}.json`, import.meta.url), JSON.stringify(report, null, 2) + "\n");
console.table(rows);
