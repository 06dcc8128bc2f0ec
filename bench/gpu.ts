// The GPU benchmark (`deno task bench:gpu`): every CUDA backend on the MoE presets at several M,
// device time with CUDA events around CUDA-graph replays of one forward (warm-up, repetitions,
// median, input sets rotated past the L2),
// against the ceilings and the PyTorch peer measured in the same run by bench/peers/torch_moe.py.
// Writes bench/results/<gpu>.json, .md and .svg.
//
//   MOEFFI_BENCH_PEER=peer.json deno run -A bench/gpu.ts      MOEFFI_BENCH_PRESETS=a,b  MOEFFI_BENCH_M=1,16
//   MOEFFI_BENCH_SCHEME=block-128 (see SCHEME)
import { readFileSync } from "node:fs";
import { Context, MoeLayer, tensor, toBf16, topkSoftmax } from "../mod.ts";
import type { ActScale, WeightScale } from "../ffi/abi.ts";
import { weightScaleShape } from "../core/validate.ts";
import { benchData, median } from "./data.ts";
import { PRESETS } from "./presets.ts";
import { type Peer, type Report, type Row, writeReport } from "./report.ts";

const env = (k: string, d: string) => process.env[k] ?? d;
const presets = env("MOEFFI_BENCH_PRESETS", Object.keys(PRESETS).join(",")).split(",");
const ms = env("MOEFFI_BENCH_M", "1,16,128,1024,4096").split(",").map(Number);
const REPS = Number(env("MOEFFI_BENCH_REPS", "20")), WARMUP = 3, SETS = 3;
// The peer's recipe; MOEFFI_BENCH_SCHEME=block-128 takes DeepSeek's (128x128 weight blocks, 1x128 activation groups)
// for A/B runs of the block path (the peer has no such recipe: its columns then compare different arithmetic)
const SCHEME: [WeightScale, ActScale] = env("MOEFFI_BENCH_SCHEME", "per-channel") === "block-128"
  ? ["block-128", "dynamic-group-128"]
  : ["per-channel", "dynamic-token"];

const peer: Peer | undefined = process.env.MOEFFI_BENCH_PEER
  ? JSON.parse(readFileSync(process.env.MOEFFI_BENCH_PEER, "utf8"))
  : undefined;

const ctx = new Context({ device: "cuda:0" });
const cuda = ctx.cuda!;
const only = process.env.MOEFFI_BENCH_BACKENDS?.split(",");
const backends = ctx.registry.backends.filter((b) =>
  b.manifest.device === "cuda" && b.manifest.ops.includes("fp8_moe") && (!only || only.includes(b.name))
);

const { fp8Codes, uniform } = benchData(0x12345678);

const rows: Row[] = [];

for (const name of presets) {
  const { k, n, experts: e, topk } = PRESETS[name];
  const [weightScale, actScale] = SCHEME;
  const w = {
    w13: cuda.upload(tensor("fp8_e4m3", [e, 2 * n, k], fp8Codes(e * 2 * n * k))),
    w13Scale: cuda.upload(
      tensor("f32", weightScaleShape(weightScale, 2 * n, k, e), uniform(e * 2 * n, 1 / 512).map(Math.abs).map((v) => v + 1e-4)),
    ),
    w2: cuda.upload(tensor("fp8_e4m3", [e, k, n], fp8Codes(e * k * n))),
    w2Scale: cuda.upload(
      tensor("f32", weightScaleShape(weightScale, k, n, e), uniform(e * k, 1 / 512).map(Math.abs).map((v) => v + 1e-4)),
    ),
  };
  for (const b of backends) {
    const backend = b.name;
    const verdict = b.supported(
      ctx.problem({ op: "fp8_moe", m: Math.max(...ms), n, k, experts: e, topk, weightScale, actScale }),
    );
    if (verdict.priority === null) {
      console.log(`${name}: ${backend} skipped: ${verdict.reason}`);
      continue;
    }
    using layer = new MoeLayer({ hidden: k, intermediate: n, experts: e, topk, weightScale, actScale, context: ctx, backend })
      .load(w);
    for (const m of ms) {
      const sets = [];
      let touched = 0;
      for (let s = 0; s < SETS; s++) {
        const logits = tensor("f32", [m, e], uniform(m * e, 8));
        const routed = await topkSoftmax(logits, topk, { renormalize: true, context: new Context({ device: "cpu" }) });
        if (s === 0) touched = new Set(routed.ids.data).size;
        sets.push({
          x: cuda.upload(tensor("bf16", [m, k], toBf16(uniform(m * k, 2)))),
          ids: cuda.upload(routed.ids),
          weights: cuda.upload(routed.weights),
        });
      }
      // Each input set's forward is captured once into a CUDA graph and replayed (as the peer is
      // timed), so the times are the device's, not the host's enqueue rate at small M.
      const out = cuda.empty("bf16", [m, k]);
      await layer.forward(sets[0].x, sets[0].ids, sets[0].weights, { out }); // sizes the workspace
      await cuda.synchronize();
      const graphs: ({ launch(): void } & Disposable)[] = [];
      for (const s of sets) graphs.push(await cuda.capture(() => layer.forward(s.x, s.ids, s.weights, { out }).then(() => {})));
      const times: number[] = [];
      for (let i = 0; i < WARMUP + REPS; i++) {
        const t = await cuda.time(() => graphs[i % SETS].launch());
        if (i >= WARMUP) times.push(t * 1000);
      }
      for (const g of graphs) g[Symbol.dispose]();
      const us = median(times), flops = 6 * m * topk * k * n, bytes = touched * 3 * k * n;
      const row: Row = {
        preset: name,
        m,
        backend,
        us: +us.toFixed(1),
        spread: +((Math.max(...times) - Math.min(...times)) / us).toFixed(3),
        tflops: +(flops / us / 1e6).toFixed(1),
        tbs: +(bytes / us / 1e6).toFixed(3),
      };
      if (peer) {
        const floor = Math.max(flops / (peer.ceilings.fp8_gemm_tflops_rowwise * 1e6), bytes / (peer.ceilings.copy_tb_s * 1e6));
        const p = peer.peer.find((x) => x.preset === name && x.m === m && !x.error);
        Object.assign(row, { floor_us: +floor.toFixed(1), of_floor: +(floor / us).toFixed(3) });
        const pu = p ? p.graph_us ?? p.eager_us : undefined;
        if (pu) Object.assign(row, { peer_us: +pu.toFixed(1), vs_peer: +(pu / us).toFixed(3) });
      }
      rows.push(row);
      console.log(JSON.stringify(row));
      out[Symbol.dispose]();
      for (const s of sets) for (const t of Object.values(s)) t[Symbol.dispose]();
    }
  }
  for (const t of Object.values(w)) t[Symbol.dispose]();
}

// ---- report ----
const gpu = cuda.name;
const slug = gpu.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "");
const report: Report = {
  date: new Date().toISOString(),
  gpu,
  capability: cuda.capability,
  scheme: SCHEME,
  reps: REPS,
  sets: SETS,
  ceilings: peer?.ceilings,
  peer: peer?.peer,
  rows,
};
// MOEFFI_BENCH_NO_REPORT=1 (deno task tune): the JSON rows above are the output, bench/results stays as it is
if (!process.env.MOEFFI_BENCH_NO_REPORT) console.log(writeReport(report, new URL(`./results/${slug}`, import.meta.url).pathname));
