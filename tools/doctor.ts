// `deno task doctor` / `bun run tools/doctor.ts`: what moeffi sees on this machine, for bug reports
// and "why is it slow / why did it pick X" questions. Prints the runtime, OS, GPUs and driver, the
// CUDA toolkit, every backend library found (with its manifest, or why it was skipped), and for a
// few real MoE shapes which backend the oracle picks for each op and every backend's reason.
// It only reads: nothing is built, downloaded or written. Exits 1 when no backend loaded at all.
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { cpus, release } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { promisify } from "node:util";
import { Context, type ProblemSpec } from "../core/context.ts";
import { formatVerdicts } from "../core/oracle.ts";
import { CudaDevice } from "../cuda/device.ts";
import { cudaDriver } from "../cuda/driver.ts";
import type { Op } from "../ffi/abi.ts";
import { VERSION } from "../ffi/fetch_libs.ts";
import { BUILTIN_DIR } from "../ffi/plugins.ts";
import { runtime } from "../ffi/runtime.ts";

/** A model's MoE layer shape: hidden K, expert intermediate N, experts E, experts per token. */
export interface Preset {
  name: string;
  k: number;
  n: number;
  experts: number;
  topk: number;
}

/** The MoE shapes the doctor asks the oracle about. */
export const PRESETS: readonly Preset[] = [
  { name: "mixtral-8x7b", k: 4096, n: 14336, experts: 8, topk: 2 },
  { name: "qwen3-30b-a3b", k: 2048, n: 768, experts: 128, topk: 8 },
  { name: "deepseek-v3-ep8", k: 7168, n: 2048, experts: 32, topk: 8 },
  { name: "qwen1.5-moe-a2.7b", k: 2048, n: 1408, experts: 60, topk: 4 },
];

/** Tokens per problem: a decode-sized batch, where backend choice matters most. */
export const DOCTOR_M = 16;

/** The four op problems of one preset, with per-channel weights and dynamic per-token activations. */
export function presetProblems(p: Preset, m = DOCTOR_M): Record<Op, ProblemSpec> {
  const scales = { weightScale: "per-channel", actScale: "dynamic-token" } as const;
  return {
    fp8_moe: { op: "fp8_moe", m, k: p.k, n: p.n, experts: p.experts, topk: p.topk, ...scales },
    fp8_scaled_mm: { op: "fp8_scaled_mm", m, k: p.k, n: p.n, ...scales },
    topk_softmax: { op: "topk_softmax", m, experts: p.experts, topk: p.topk },
    nvfp4_experts_quant: { op: "nvfp4_experts_quant", m, k: p.k, experts: p.experts },
    nvfp4_silu_quant: { op: "nvfp4_silu_quant", m, n: p.n, experts: p.experts },
  };
}

/** "deno 2.x (v8 ..., typescript ...)" or "bun 1.x". */
function runtimeLine(): string {
  const bun = (globalThis as { Bun?: { version: string; revision: string } }).Bun;
  if (bun) return `bun ${bun.version} (${bun.revision.slice(0, 9)})`;
  const v = Deno.version;
  return `deno ${v.deno} (v8 ${v.v8}, typescript ${v.typescript})`;
}

/** The driver's CUDA version, read on its own so it shows even when no device initializes. */
function driverVersion(): string {
  try {
    const lib = runtime.open("libcuda.so.1", { cuDriverGetVersion: { parameters: ["buffer"], result: "i32" } });
    const out = new Int32Array(1);
    const status = lib.symbols.cuDriverGetVersion(out) as number;
    lib.close();
    return status === 0
      ? `CUDA ${Math.floor(out[0] / 1000)}.${(out[0] % 1000) / 10} (libcuda.so.1)`
      : `cuDriverGetVersion failed (${status})`;
  } catch (e) {
    return `not found (${(e as Error).message.split("\n")[0]})`;
  }
}

/** The GPU section: driver, then each device's name and compute capability, or why there are none. */
function gpuLines(): string[] {
  const lines = [`driver: ${driverVersion()}`];
  const found = cudaDriver();
  if ("error" in found) return [...lines, `GPUs: none (${found.error})`];
  for (let i = 0; i < found.count; i++) {
    try {
      const d = CudaDevice.get(i);
      lines.push(`cuda:${i}: ${d.name}, compute capability ${d.capability.join(".")} (sm_${d.capability.join("")})`);
    } catch (e) {
      lines.push(`cuda:${i}: cannot open: ${(e as Error).message}`);
    }
  }
  return lines;
}

/** nvcc where the build looks for it (CUDA_HOME, PATH, /usr/local/cuda); its release line, or "not found". */
async function toolkitLine(): Promise<string> {
  const home = runtime.env("CUDA_HOME") ?? runtime.env("CUDA_PATH");
  const candidates = [
    ...(home ? [join(home, "bin", "nvcc")] : []),
    ...(runtime.env("PATH") ?? "").split(":").filter(Boolean).map((d) => join(d, "nvcc")),
    "/usr/local/cuda/bin/nvcc",
  ];
  const nvcc = candidates.find((c) => existsSync(c));
  if (!nvcc) return "nvcc: not found (CUDA backends cannot be built here; set CUDA_HOME or put nvcc on PATH)";
  try {
    const { stdout } = await promisify(execFile)(nvcc, ["--version"], { timeout: 20_000 });
    const line = stdout.split("\n").find((l) => l.includes("release")) ?? stdout.trim().split("\n").at(-1);
    return `nvcc: ${line?.trim()} (${nvcc})`;
  } catch (e) {
    return `nvcc: ${nvcc} does not run: ${(e as Error).message.split("\n")[0]}`;
  }
}

/** Every loaded backend with its manifest, then every skipped library with its reason. */
function backendLines(ctx: Context): string[] {
  const plugins = runtime.env("MOEFFI_PLUGIN_PATH");
  const lines = [`built-in folder: ${BUILTIN_DIR || "(none)"}`, `plugin folders (MOEFFI_PLUGIN_PATH): ${plugins || "(none)"}`];
  for (const b of ctx.registry.backends) {
    const m = b.manifest;
    lines.push(
      `${m.name} ${m.version}: loaded (${b.builtin ? "built-in" : "plugin"}), device ${m.device}${
        m.archs ? ` [${m.archs}]` : ""
      }, priority ${m.priority}`,
      `    ops: ${m.ops.join(", ")}; batch invariant: ${m.batchInvariantOps.join(", ") || "none"}`,
      `    weight scales: ${m.weightScales.join(", ")}; activation scales: ${m.actScales.join(", ")}`,
      `    path: ${b.path}`,
    );
  }
  for (const s of ctx.registry.skipped) lines.push(`${s.path}: skipped: ${s.reason}`);
  if (ctx.registry.backends.length === 0) lines.push("no backend loaded: run `deno task build` (or set MOEFFI_LIB_DIR)");
  return lines;
}

/** For each preset and op: the backend the oracle picks and why, then every backend's verdict. */
function oracleLines(ctx: Context): string[] {
  const lines: string[] = [];
  for (const preset of PRESETS) {
    lines.push(`${preset.name}: K=${preset.k} N=${preset.n} E=${preset.experts} topk=${preset.topk}, M=${DOCTOR_M}`);
    for (const [op, spec] of Object.entries(presetProblems(preset))) {
      const verdicts = ctx.explain(spec);
      const chosen = verdicts.find((v) => v.chosen);
      lines.push(
        `  ${op}: ${chosen ? `${chosen.backend} (priority ${chosen.priority}: ${chosen.reason})` : "no backend can run it"}`,
      );
      lines.push(formatVerdicts(verdicts).replace(/^/gm, "    "));
    }
  }
  return lines;
}

/** A context on the default device; on the CPU, with the reason, when the GPU cannot be opened. */
function openContext(): { ctx: Context; note?: string } {
  try {
    return { ctx: new Context() };
  } catch (e) {
    return { ctx: new Context({ device: "cpu" }), note: `default device failed (${(e as Error).message}); using the CPU` };
  }
}

/** The whole report, section by section. */
export async function doctorReport(): Promise<{ text: string; backends: number }> {
  const section = (title: string, lines: string[]) => [`\n${title}`, ...lines.map((l) => `  ${l}`)];
  const { ctx, note } = openContext();
  try {
    const o = ctx.options;
    const selection = [
      o.backend && `MOEFFI_BACKEND=${o.backend}`,
      o.disable?.length && `MOEFFI_DISABLE=${o.disable.join(",")}`,
      o.batchInvariant && "MOEFFI_BATCH_INVARIANT=1",
    ].filter(Boolean).join(", ");
    const text = [
      `moeffi doctor: moeffi ${VERSION}`,
      ...section("Runtime", [
        runtimeLine(),
        `OS: ${process.platform} ${process.arch} (kernel ${release()}), ${cpus().length} CPU threads`,
      ]),
      ...section("GPU", gpuLines()),
      ...section("CUDA toolkit", [await toolkitLine()]),
      ...section("Backends", backendLines(ctx)),
      ...section(
        `Oracle (device ${ctx.device}${selection ? `, ${selection}` : ""}; per-channel weights, dynamic per-token activations)`,
        [
          ...(note ? [note] : []),
          ...oracleLines(ctx),
        ],
      ),
    ].join("\n");
    return { text, backends: ctx.registry.backends.length };
  } finally {
    ctx[Symbol.dispose]();
  }
}

if (import.meta.main) {
  const { text, backends } = await doctorReport();
  console.log(text);
  process.exit(backends > 0 ? 0 : 1);
}
