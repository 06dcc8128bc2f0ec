// One FP8 MoE layer, end to end: router logits -> topk_softmax -> fp8_moe, on whatever backend the
// oracle picks (the exact CPU reference where there is no GPU).
//
//   deno run -A examples/moe_fp8.ts        bun run examples/moe_fp8.ts
//
// The layer is Mixtral-shaped (8 experts, top-2, intermediate = 3.5 x hidden) at a CPU-friendly
// size. Weights are random but seeded, so the checksum is the same on every run and backend that
// computes exactly; set MOEFFI_LOG=debug to see every verdict.
import { formatVerdicts, MoeLayer, tensor, toBf16, topkSoftmax } from "../mod.ts";

const hidden = 1024, intermediate = 3584, experts = 8, topk = 2, tokens = 32;

// xorshift32: seeded random data, fast enough for tens of MB
let state = 0x2545f491;
const next = () => ((state ^= state << 13), (state ^= state >>> 17), (state ^= state << 5), state >>> 0);
const uniform = () => next() / 2 ** 32 - 0.5;
const fp8Codes = (n: number) => Uint8Array.from({ length: n }, () => next() % 0x6c | (next() & 0x80)); // |w| <= 240, no NaN

const layer = new MoeLayer({ hidden, intermediate, experts, topk, weightScale: "per-channel", actScale: "dynamic-token" });
layer.load({
  w13: tensor("fp8_e4m3", [experts, 2 * intermediate, hidden], fp8Codes(experts * 2 * intermediate * hidden)),
  w13Scale: tensor("f32", [experts, 2 * intermediate], new Float32Array(experts * 2 * intermediate).fill(1 / 1024)),
  w2: tensor("fp8_e4m3", [experts, hidden, intermediate], fp8Codes(experts * hidden * intermediate)),
  w2Scale: tensor("f32", [experts, hidden], new Float32Array(experts * hidden).fill(1 / 1024)),
});

const x = tensor("bf16", [tokens, hidden], toBf16(Float32Array.from({ length: tokens * hidden }, uniform)));
const logits = tensor("f32", [tokens, experts], Float32Array.from({ length: tokens * experts }, uniform));

async function forward() {
  const { ids, weights } = await topkSoftmax(logits, topk, { renormalize: true });
  return await layer.forward(x, ids, weights);
}
let t0 = performance.now();
await forward(); // the first call also pays for JIT warm-up and thread start
const first = performance.now() - t0;
t0 = performance.now();
const out = await forward();
const ms = performance.now() - t0;

let hash = 0x811c9dc5; // FNV-1a over the output's bf16 bits
for (const h of out.data) hash = Math.imul(hash ^ h, 0x01000193) >>> 0;
const values = out.toFloat32();
const mean = values.reduce((a, v) => a + Math.abs(v), 0) / values.length;

console.log(
  `moeffi fp8_moe: M=${tokens} K=${hidden} N=${intermediate} E=${experts} topk=${topk}, per-channel weights, dynamic per-token activations`,
);
console.log(`backend: ${layer.backendName}`);
console.log(formatVerdicts(layer.verdicts));
console.log(`forward (routing + experts): ${ms.toFixed(1)} ms (first call ${first.toFixed(1)} ms)`);
console.log(`checksum: ${hash.toString(16).padStart(8, "0")} (mean |out| ${mean.toPrecision(6)})`);
layer[Symbol.dispose]();
