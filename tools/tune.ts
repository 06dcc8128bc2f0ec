// `deno task tune`: measures hopper_fp8's wide tiles on this machine's GPU for every MoE preset at
// M = 1024 and 4096: 128 or 192 columns, and 192 as two-CTA clusters sharing the weight tile (one
// bench/gpu.ts run per candidate, forced with MOEFFI_HOPPER_BN and MOEFFI_HOPPER_PAIR /
// MOEFFI_HOPPER_NO_PAIR). It writes the winners to build/lib/hopper_fp8.tune: per preset and M bucket
// (the mean rows per routed expert, rounded up to a power of two) a "layer" line, and per GEMM output
// width the width that won over both M ("bn", which fp8_scaled_mm uses too). The backend reads the
// table when its "gpu" line names the GPU it runs on; without one it uses its built-in rules.
// MOEFFI_TUNE_PRESETS=a,b limits the presets.
import { execFile } from "node:child_process";
import { existsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import process from "node:process";
import { promisify } from "node:util";
import { PRESETS } from "../bench/presets.ts";
import { Context } from "../mod.ts";
import { BUILTIN_DIR } from "../ffi/plugins.ts";

const run = promisify(execFile);
type Candidate = { bn: 128 | 192; pair: boolean };
const CANDIDATES: Candidate[] = [{ bn: 128, pair: false }, { bn: 192, pair: false }, { bn: 192, pair: true }];
const label = (c: Candidate) => `${c.bn}${c.pair ? " pairs" : ""}`;
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

/** Median microseconds per (preset, M) of bench/gpu.ts with the wide tiles forced to candidate c. */
async function measure(c: Candidate): Promise<Map<string, number>> {
  const env: Record<string, string | undefined> = { ...process.env };
  delete env.MOEFFI_HOPPER_PAIR;
  delete env.MOEFFI_HOPPER_NO_PAIR;
  env[c.pair ? "MOEFFI_HOPPER_PAIR" : "MOEFFI_HOPPER_NO_PAIR"] = "1";
  const { stdout } = await run(process.execPath, isDeno ? ["run", "-A", bench] : [bench], {
    env: {
      ...env,
      MOEFFI_HOPPER_BN: String(c.bn),
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

const results = new Map<Candidate, Map<string, number>>();
for (const c of CANDIDATES) results.set(c, await measure(c));

const lines = [`gpu ${gpu}`, `# written by deno task tune on ${new Date().toISOString()}: us per preset and M`];
const chosen = new Map<number, number>(); // nout -> bn
for (const name of presets) {
  const { k, n, experts, topk } = PRESETS[name];
  const time = (c: Candidate, m: string) => results.get(c)!.get(`${name}:${m}`) ?? Infinity;
  const total = (bn: number) =>
    Math.min(
      ...CANDIDATES.filter((c) => c.bn === bn).map((c) => ms.split(",").reduce((a, m) => a + time(c, m), 0)),
    );
  for (const m of ms.split(",")) {
    lines.push(`# ${name} M=${m}: ${CANDIDATES.map((c) => `${label(c)} -> ${time(c, m).toFixed(1)}`).join(", ")}`);
    const pairs = Number(m) * topk, mean = Math.ceil(pairs / Math.min(experts, pairs));
    if (mean <= 64) continue; // swapped (decode) tiles: no wide tiles to choose
    const best = CANDIDATES.reduce((a, b) => (time(b, m) < time(a, m) ? b : a));
    lines.push(`layer ${2 * n} ${k} ${2 ** Math.ceil(Math.log2(mean))} ${best.bn} ${best.pair ? 1 : 0}`);
  }
  const best = total(128) < total(192) ? 128 : 192;
  for (const nout of [2 * n, k]) if (!chosen.has(nout)) chosen.set(nout, best);
}
for (const [nout, bn] of chosen) lines.push(`bn ${nout} ${bn}`);
if (!existsSync(BUILTIN_DIR)) throw new Error(`no built-in library folder at ${BUILTIN_DIR}: run deno task build first`);
const out = join(BUILTIN_DIR, "hopper_fp8.tune");
writeFileSync(out, lines.join("\n") + "\n");
console.log(lines.join("\n"));
console.log(`tune: wrote ${out}`);
