// The fp8_scaled_mm benchmark (`deno run -A bench/mm.ts`): each CUDA backend that claims the op, at
// the target shapes, timed as CUDA-graph replays of one forward (quantization of x
// included), against cuBLAS FP8 (torch._scaled_mm, row-wise scales) measured by
// bench/peers/torch_moe.py in the same run. Writes bench/results/mm-<gpu>.json and .md.
//
//   MOEFFI_BENCH_PEER=peer.json deno run -A bench/mm.ts
import { readFileSync, writeFileSync } from "node:fs";
import { Context, Fp8Linear, tensor, toBf16 } from "../mod.ts";
import { benchData, median } from "./data.ts";

type PeerMm = { m: number; n: number; k: number; us: number; tflops: number; us_sustained?: number };
const peerFile = process.env.MOEFFI_BENCH_PEER;
const peer: PeerMm[] = peerFile ? JSON.parse(readFileSync(peerFile, "utf8")).mm ?? [] : [];
// MOEFFI_BENCH_MM_SHAPES=8192x8192x8192,1x7168x7168 (M x N x K) replaces the target shapes.
const SHAPES = process.env.MOEFFI_BENCH_MM_SHAPES?.split(",").map((s) => s.split("x").map(Number)) ??
  [[8192, 8192, 8192], [4096, 7168, 16384], [1, 7168, 7168], [16, 7168, 7168], [64, 7168, 7168], [128, 7168, 7168]];
const REPS = 20, WARMUP = 3;
// MOEFFI_BENCH_MM_SUSTAIN=5: also the mean time per call over 5 s of back-to-back replays for M >= 4096, the rate
// once the GPU sits at its power cap (cuBLAS slows down there: bench/peers/torch_moe.py --sustain 5 measures it)
const SUSTAIN = Number(process.env.MOEFFI_BENCH_MM_SUSTAIN ?? 0);

const ctx = new Context({ device: "cuda:0" });
const cuda = ctx.cuda!;
const only = process.env.MOEFFI_BENCH_BACKENDS?.split(",") ?? ["hopper_fp8"];
const backends = ctx.registry.backends.filter((b) => b.manifest.ops.includes("fp8_scaled_mm") && only.includes(b.name));

const { fp8Codes, uniform } = benchData(0x2468ace1);

const rows: Record<string, unknown>[] = [];
for (const b of backends) {
  for (const [m, n, k] of SHAPES) {
    const w = { w: cuda.upload(tensor("fp8_e4m3", [n, k], fp8Codes(n * k))) };
    const wScale = cuda.upload(tensor("f32", [n], uniform(n, 1 / 256).map((v) => Math.abs(v) + 1e-4)));
    using lin = new Fp8Linear({
      inFeatures: k,
      outFeatures: n,
      weightScale: "per-channel",
      actScale: "dynamic-token",
      context: ctx,
      backend: b.name,
    }).load({ ...w, wScale });
    const x = cuda.upload(tensor("bf16", [m, k], toBf16(uniform(m * k, 2)))), out = cuda.empty("bf16", [m, n]);
    await lin.forward(x, { out }); // sizes the workspace outside the capture
    await cuda.synchronize();
    using graph = await cuda.capture(() => lin.forward(x, { out }).then(() => {}));
    const times: number[] = [];
    for (let i = 0; i < WARMUP + REPS; i++) {
      const t = await cuda.time(() => graph.launch());
      if (i >= WARMUP) times.push(t * 1000);
    }
    let sustained = 0;
    if (SUSTAIN > 0 && m >= 4096) {
      await cuda.synchronize();
      const t0 = performance.now();
      let calls = 0;
      while (performance.now() - t0 < SUSTAIN * 1000) {
        for (let i = 0; i < 20; i++) graph.launch();
        await cuda.synchronize();
        calls += 20;
      }
      sustained = (performance.now() - t0) * 1000 / calls;
    }
    const us = median(times), tflops = 2 * m * n * k / us / 1e6, p = peer.find((r) => r.m === m && r.n === n && r.k === k);
    const row = {
      backend: b.name,
      m,
      n,
      k,
      us: +us.toFixed(1),
      tflops: +tflops.toFixed(1),
      ...(p ? { cublas_us: +p.us.toFixed(1), cublas_tflops: +p.tflops.toFixed(1), vs_cublas: +(p.us / us).toFixed(3) } : {}),
      ...(sustained ? { us_sustained: +sustained.toFixed(1) } : {}),
      ...(sustained && p?.us_sustained
        ? { cublas_us_sustained: +p.us_sustained.toFixed(1), vs_cublas_sustained: +(p.us_sustained / sustained).toFixed(3) }
        : {}),
    };
    rows.push(row);
    console.log(JSON.stringify(row));
    for (const t of [x, out, wScale, w.w]) t[Symbol.dispose]();
  }
}

// MOEFFI_BENCH_NO_REPORT=1 (bench/invariant.ts, bench/dev/ab.sh): the rows and the table print, bench/results stays as it is
const report = !process.env.MOEFFI_BENCH_NO_REPORT;
const slug = cuda.name.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "");
const base = new URL(`./results/mm-${slug}`, import.meta.url).pathname;
if (report) writeFileSync(`${base}.json`, JSON.stringify({ date: new Date().toISOString(), gpu: cuda.name, rows }, null, 1));
const md = [
  `# fp8_scaled_mm on ${cuda.name} (${new Date().toISOString().slice(0, 10)})`,
  "",
  "Per-channel weights, dynamic per-token activations (quantization of x included), bf16 out; CUDA-graph replays, median of " +
  `${REPS}. cuBLAS = torch._scaled_mm with row-wise scales on fp8 inputs, same run. Sustained = mean time per call over ` +
  `${SUSTAIN || "-"} s of back-to-back replays (M >= 4096), both sides measured that way in the same run: the rate at the ` +
  "GPU's power cap.",
  "",
  "| backend | M | N | K | time (us) | TFLOP/s | cuBLAS (us) | cuBLAS / time | sustained (us) | cuBLAS sustained (us) | ratio sustained |",
  "|---|---|---|---|---|---|---|---|---|---|---|",
  ...rows.map((r) =>
    `| ${r.backend} | ${r.m} | ${r.n} | ${r.k} | ${r.us} | ${r.tflops} | ${r.cublas_us ?? "-"} | ${r.vs_cublas ?? "-"} | ${
      r.us_sustained ?? "-"
    } | ${r.cublas_us_sustained ?? "-"} | ${r.vs_cublas_sustained ?? "-"} |`
  ),
].join("\n");
if (report) writeFileSync(`${base}.md`, md + "\n");
console.log(md);
