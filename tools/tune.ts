// `deno task tune`: measures hopper_fp8's wide-tile widths (128 and 192 columns) on this machine's
// GPU for every MoE preset at M = 1024 and 4096 (one bench/gpu.ts run per candidate, the width forced
// with MOEFFI_HOPPER_BN) and writes the winners, keyed by GEMM output width, to
// build/lib/hopper_fp8.tune. The backend reads that table at prepare when its "gpu" line names the
// GPU it runs on; without a table it uses its built-in rule. MOEFFI_TUNE_PRESETS=a,b limits the presets.
import { execFile } from "node:child_process";
import { existsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import process from "node:process";
import { promisify } from "node:util";
import { PRESETS } from "../bench/presets.ts";
import { Context } from "../mod.ts";
import { BUILTIN_DIR } from "../ffi/plugins.ts";

const run = promisify(execFile);
const CANDIDATES = [128, 192];
const presets = (process.env.MOEFFI_TUNE_PRESETS ?? Object.keys(PRESETS).join(",")).split(",");
const ms = process.env.MOEFFI_TUNE_M ?? "1024,4096";

const ctx = new Context({ device: "cuda:0" });
if (!ctx.cuda) throw new Error("deno task tune needs a CUDA GPU");
if (!ctx.registry.backends.some((b) => b.name === "hopper_fp8")) {
  throw new Error("hopper_fp8 is not loaded (see deno task doctor)");
}
const gpu = ctx.cuda.name;
const bench = new URL("../bench/gpu.ts", import.meta.url).pathname;
const isDeno = "Deno" in globalThis;

/** Median microseconds per (preset, M) of bench/gpu.ts with the wide-tile width forced to bn. */
async function measure(bn: number): Promise<Map<string, number>> {
  const { stdout } = await run(process.execPath, isDeno ? ["run", "-A", bench] : [bench], {
    env: {
      ...process.env,
      MOEFFI_HOPPER_BN: String(bn),
      MOEFFI_BENCH_PRESETS: presets.join(","),
      MOEFFI_BENCH_M: ms,
      MOEFFI_BENCH_BACKENDS: "hopper_fp8",
      MOEFFI_BENCH_REPS: "10",
      MOEFFI_BENCH_NO_REPORT: "1",
    },
    maxBuffer: 64 << 20,
  });
  const times = new Map<string, number>();
  for (const line of stdout.split("\n").filter((l) => l.startsWith("{"))) {
    const row = JSON.parse(line) as { preset: string; m: number; us: number };
    times.set(`${row.preset}:${row.m}`, row.us);
  }
  return times;
}

const results = new Map<number, Map<string, number>>();
for (const bn of CANDIDATES) results.set(bn, await measure(bn));

const lines = [`gpu ${gpu}`, `# written by deno task tune on ${new Date().toISOString()}: sum of M = ${ms} times per preset, us`];
const chosen = new Map<number, number>(); // nout -> bn
for (const name of presets) {
  const { k, n } = PRESETS[name];
  const total = (bn: number) =>
    [...results.get(bn)!].filter(([key]) => key.startsWith(`${name}:`)).reduce((a, [, v]) => a + v, 0);
  const best = CANDIDATES.reduce((a, b) => (total(b) < total(a) ? b : a));
  lines.push(`# ${name}: ${CANDIDATES.map((bn) => `${bn} -> ${total(bn).toFixed(1)}`).join(", ")}`);
  for (const nout of [2 * n, k]) if (!chosen.has(nout)) chosen.set(nout, best);
}
for (const [nout, bn] of chosen) lines.push(`bn ${nout} ${bn}`);
if (!existsSync(BUILTIN_DIR)) throw new Error(`no built-in library folder at ${BUILTIN_DIR}: run deno task build first`);
const out = join(BUILTIN_DIR, "hopper_fp8.tune");
writeFileSync(out, lines.join("\n") + "\n");
console.log(lines.join("\n"));
console.log(`tune: wrote ${out}`);
