// Issue 6's targets from one run's measurements: batch_invariant_fp8 against hopper_fp8 (bench/gpu.ts and bench/mm.ts
// rows, MOEFFI_BENCH_NO_REPORT=1, both backends), the bf16-dequant path (bench/peers/torch_bf16_dequant.py) and the
// copy bandwidth (bench/peers/torch_moe.py's ceilings). Writes bench/results/invariant-<gpu>.json and .md.
//
//   MOEFFI_BENCH_PEER=peer.json MOEFFI_BENCH_BF16=bf16.json deno run -A bench/invariant.ts moe.jsonl mm.jsonl
// (bench/dev/next_call.sh's invbench step runs the whole sequence.)
import { readFileSync, writeFileSync } from "node:fs";

type Timed = { backend: string; m: number; us: number; preset?: string; n?: number; k?: number; tbs?: number };
type Bf16 = { preset?: string; m: number; n?: number; k?: number; per_call_us?: number; stored_us?: number; error?: string };

const lines = process.argv.slice(2).flatMap((f) => readFileSync(f, "utf8").split("\n"));
const timed: Timed[] = lines.filter((l) => l.startsWith("{")).map((l) => JSON.parse(l));
const json = (v?: string) => v ? JSON.parse(readFileSync(v, "utf8")) : undefined;
const peer = json(process.env.MOEFFI_BENCH_PEER), bf16 = json(process.env.MOEFFI_BENCH_BF16);
const copy: number | undefined = peer?.ceilings?.copy_tb_s; // TB/s
const gpu: string = bf16?.gpu ?? process.env.MOEFFI_BENCH_GPU ?? "unknown GPU";

/** One problem (a MoE preset at M, or a linear M x N x K): both backends' times and the ratios the targets use. */
interface Row {
  op: "fp8_moe" | "fp8_scaled_mm";
  what: string;
  m: number;
  bi_us: number;
  hopper_us?: number;
  bi_over_hopper?: number;
  bf16_stored_us?: number;
  bf16_per_call_us?: number;
  stored_over_bi?: number;
  per_call_over_bi?: number;
  copy_fraction?: number; // unique weight bytes / bi_us, over the copy bandwidth
}
const r3 = (v: number) => +v.toFixed(3);
const rows: Row[] = [];
for (const bi of timed.filter((t) => t.backend === "batch_invariant_fp8")) {
  const op = bi.preset ? "fp8_moe" : "fp8_scaled_mm";
  const same = (t: { m: number; preset?: string; n?: number; k?: number }) =>
    t.m === bi.m && (bi.preset ? t.preset === bi.preset : t.n === bi.n && t.k === bi.k);
  const hopper = timed.find((t) => t.backend === "hopper_fp8" && same(t));
  const b = (op === "fp8_moe" ? bf16?.moe : bf16?.mm)?.find((x: Bf16) => same(x) && !x.error) as Bf16 | undefined;
  // unique weight bytes: gpu.ts's tbs counts the experts a call touches (3 K N bytes each); a linear reads N K
  const tbs = op === "fp8_moe" ? bi.tbs! : bi.n! * bi.k! / bi.us / 1e6;
  rows.push({
    op,
    what: bi.preset ?? `${bi.n}x${bi.k}`,
    m: bi.m,
    bi_us: bi.us,
    ...(hopper ? { hopper_us: hopper.us, bi_over_hopper: r3(bi.us / hopper.us) } : {}),
    ...(b?.stored_us ? { bf16_stored_us: +b.stored_us.toFixed(1), stored_over_bi: r3(b.stored_us / bi.us) } : {}),
    ...(b?.per_call_us ? { bf16_per_call_us: +b.per_call_us.toFixed(1), per_call_over_bi: r3(b.per_call_us / bi.us) } : {}),
    ...(copy ? { copy_fraction: r3(tbs / copy) } : {}),
  });
}

/** A target over the rows it applies to: the worst value against the bar. */
function verdict(name: string, keep: (r: Row) => boolean, value: (r: Row) => number | undefined, bar: number, atMost: boolean) {
  const vals = rows.filter(keep).map((r) => ({ r, v: value(r) })).filter((x) => x.v !== undefined) as { r: Row; v: number }[];
  if (!vals.length) return `${name}: no measurement`;
  const worst = vals.reduce((a, x) => (atMost ? x.v > a.v : x.v < a.v) ? x : a);
  const pass = vals.every((x) => atMost ? x.v <= bar : x.v >= bar);
  return `${pass ? "PASS" : "FAIL"} ${name}: worst ${worst.v} (${worst.r.op} ${worst.r.what} M=${worst.r.m}), bar ${bar}`;
}
const verdicts = [
  verdict("M >= 64: time / hopper_fp8's <= 1.15", (r) => r.m >= 64, (r) => r.bi_over_hopper, 1.15, true),
  verdict("M >= 256: bf16 (weights stored dequantized) / time >= 1.3", (r) => r.m >= 256, (r) => r.stored_over_bi, 1.3, false),
  verdict("M >= 256: bf16 (dequantized every call) / time >= 1.3", (r) => r.m >= 256, (r) => r.per_call_over_bi, 1.3, false),
  verdict("M <= 16: unique weight bytes at >= 70% of copy", (r) => r.m <= 16, (r) => r.copy_fraction, 0.7, false),
];

const slug = gpu.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "");
const base = new URL(`./results/invariant-${slug}`, import.meta.url).pathname;
writeFileSync(`${base}.json`, JSON.stringify({ date: new Date().toISOString(), gpu, copy_tb_s: copy, rows, verdicts }, null, 1));
const cell = (v: number | undefined) => v ?? "-";
const md = [
  `# batch_invariant_fp8 on ${gpu} (${new Date().toISOString().slice(0, 10)})`,
  "",
  "Times in us, one run: CUDA-graph replays (bench/gpu.ts, bench/mm.ts; per-channel weights, per-token activations); bf16 = " +
  "bench/peers/torch_bf16_dequant.py (weights stored dequantized, or dequantized every call); copy = unique weight bytes " +
  `per call over the time, against the copy bandwidth (${copy ?? "-"} TB/s).`,
  "",
  ...verdicts.map((v) => `- ${v}`),
  "",
  "| op | problem | M | batch_invariant_fp8 | hopper_fp8 | ratio | bf16 stored | ratio | bf16 per call | ratio | copy |",
  "|---|---|---|---|---|---|---|---|---|---|---|",
  ...rows.map((r) =>
    `| ${r.op} | ${r.what} | ${r.m} | ${r.bi_us} | ${cell(r.hopper_us)} | ${cell(r.bi_over_hopper)} | ${
      cell(r.bf16_stored_us)
    } | ${cell(r.stored_over_bi)} | ${cell(r.bf16_per_call_us)} | ${cell(r.per_call_over_bi)} | ${cell(r.copy_fraction)} |`
  ),
].join("\n");
writeFileSync(`${base}.md`, md + "\n");
console.log(md);
