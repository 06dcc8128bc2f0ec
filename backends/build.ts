// `deno task build [name...]`: compiles every (or each named) backends/<name>/ folder into build/lib/libmoeffi_<name>.so.
// C folders go through cc (with OpenMP when the compiler has it), CUDA folders through nvcc from
// CUDA_HOME or PATH for the architectures in MOEFFI_CUDA_ARCHS. A library is rebuilt only when a
// source, the shared headers or the command line changed. Runs under Deno and Bun.
import { execFile } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const run = promisify(execFile);
export const ROOT = fileURLToPath(new URL("..", import.meta.url));
export const LIB_DIR = join(ROOT, "build", "lib");
const HEADER_DIRS = [join(ROOT, "backends"), join(ROOT, "cuda")];
const env = (name: string) => (globalThis as { process?: { env: Record<string, string | undefined> } }).process?.env[name];

const filesUnder = (dir: string): string[] =>
  !existsSync(dir) ? [] : readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? filesUnder(join(dir, e.name)) : [join(dir, e.name)]
  );

async function works(cmd: string, args: string[]): Promise<boolean> {
  try {
    await run(cmd, args);
    return true;
  } catch {
    return false;
  }
}

let openmp: Promise<string[]> | undefined;
/** -fopenmp when cc can build a shared OpenMP library here, else nothing (the code is serial then). */
function openmpFlags(): Promise<string[]> {
  return (openmp ??= (async () => {
    const probe = join(ROOT, "build", "omp_probe");
    mkdirSync(probe, { recursive: true });
    writeFileSync(join(probe, "p.c"), "#include <omp.h>\nint f(void){return omp_get_max_threads();}\n");
    return (await works("cc", ["-fopenmp", "-fPIC", "-shared", join(probe, "p.c"), "-o", join(probe, "p.so")])) ? ["-fopenmp"] : [];
  })());
}

export function nvccPath(): string | undefined {
  const home = env("CUDA_HOME") ?? env("CUDA_PATH");
  if (home && existsSync(join(home, "bin", "nvcc"))) return join(home, "bin", "nvcc");
  for (const dir of (env("PATH") ?? "").split(":")) if (dir && existsSync(join(dir, "nvcc"))) return join(dir, "nvcc");
  if (existsSync("/usr/local/cuda/bin/nvcc")) return "/usr/local/cuda/bin/nvcc";
}

/** -gencode flags: SASS for each listed arch, plus PTX of the oldest for GPUs not listed. */
export function cudaArchFlags(archs = env("MOEFFI_CUDA_ARCHS") ?? "80,90a"): string[] {
  const list = archs.split(",").map((a) => a.trim().replace(/^sm_/, "")).filter(Boolean);
  return [
    ...list.flatMap((a) => ["-gencode", `arch=compute_${a},code=sm_${a}`]),
    "-gencode", `arch=compute_${list[0]},code=compute_${list[0]}`,
  ];
}

export interface BuildResult {
  name: string;
  status: "built" | "up to date" | "skipped";
  detail?: string;
}

/** Sources of another backend that a source includes (`#include "hopper_fp8/hopper_fp8.cu"`). */
const includedSources = (source: string): string[] =>
  [...readFileSync(source, "utf8").matchAll(/^#include "([^"]+\.cu)"/gm)].map((m) => join(ROOT, "backends", m[1]));

/** Compiles C sources into a shared library if any input or the command changed. */
export async function compileShared(name: string, sources: string[], out: string, extraFlags: string[] = []): Promise<BuildResult> {
  const cuda = sources.some((s) => s.endsWith(".cu"));
  const compiler = cuda ? nvccPath() : "cc";
  if (!compiler) return { name, status: "skipped", detail: "nvcc not found (set CUDA_HOME or put nvcc on PATH)" };
  const includes = HEADER_DIRS.flatMap((d) => ["-I", d]);
  // nodelete: dlclose must not unmap a library (or the libgomp / CUDA runtime it pulled in) while
  // threads those started still exist; closing a backend only drops the core's reference.
  const args = cuda
    ? ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-Xlinker", "-z,nodelete", "-lineinfo", ...cudaArchFlags(), ...includes, ...extraFlags, ...sources, "-o", out]
    : ["-std=c11", "-O3", "-ffp-contract=off", "-Wall", "-Wextra", "-fPIC", "-shared", "-fvisibility=hidden", "-Wl,-z,nodelete", ...(await openmpFlags()), ...includes, ...extraFlags, ...sources, "-o", out, "-lm"];
  const stamp = `${out}.cmd`;
  const command = [compiler, ...args].join(" ");
  const inputs = [...sources, ...sources.flatMap(includedSources), ...HEADER_DIRS.flatMap(filesUnder).filter((f) => /\.(h|cuh)$/.test(f))];
  const fresh = existsSync(out) && existsSync(stamp) && readFileSync(stamp, "utf8") === command &&
    inputs.every((f) => statSync(f).mtimeMs <= statSync(out).mtimeMs);
  if (fresh) return { name, status: "up to date" };
  mkdirSync(join(out, ".."), { recursive: true });
  await run(compiler, args, { maxBuffer: 16 << 20 });
  writeFileSync(stamp, command);
  return { name, status: "built" };
}

/** Builds every backend folder (or only those named); returns one result per backend. */
export async function buildAll(only: string[] = []): Promise<BuildResult[]> {
  const dir = join(ROOT, "backends");
  const names = readdirSync(dir, { withFileTypes: true }).filter((e) => e.isDirectory()).map((e) => e.name)
    .filter((name) => only.length === 0 || only.includes(name)).sort();
  return await Promise.all(names.map((name) => {
    const sources = filesUnder(join(dir, name)).filter((f) => /\.(c|cu)$/.test(f)).sort();
    return compileShared(name, sources, join(LIB_DIR, `libmoeffi_${name}.so`));
  }));
}

if (import.meta.main) {
  const t0 = performance.now();
  try {
    const only = (globalThis as { process?: { argv: string[] } }).process?.argv.slice(2) ?? [];
    for (const r of await buildAll(only)) console.log(`build: ${r.name}: ${r.status}${r.detail ? ` (${r.detail})` : ""}`);
  } catch (e) {
    const err = e as { stderr?: string; message: string };
    console.error(`build failed:\n${err.stderr || err.message}`);
    (globalThis as { process?: { exit(c: number): never } }).process?.exit(1);
  }
  console.log(`build: done in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
}
