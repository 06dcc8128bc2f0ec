// Plugin discovery and the Backend wrapper. A library is loaded, ABI-checked, layout-checked and its
// manifest validated; anything wrong skips that library with a reason and the others keep working.
import { existsSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { MoeffiError } from "../core/errors.ts";
import {
  ABI_VERSION,
  cString,
  decodeManifest,
  encodeProblem,
  encodeTensors,
  encodeWeights,
  LAYOUT,
  LAYOUT_IDS,
  type Manifest,
  PLUGIN_SYMBOLS,
  type Problem,
  STATUS,
  type TensorAddresses,
  type WeightAddresses,
} from "./abi.ts";
import { type NativeLibrary, runtime } from "./runtime.ts";
import { PREBUILT_LIB_DIR } from "./fetch_libs.ts";

/** Names of the backends that ship with moeffi: a plugin may not take them. */
export const BUILTIN_NAMES = ["reference", "fallback", "hopper_fp8", "batch_invariant_fp8", "nvfp4"];

/**
 * Where the built-in backends are: `deno task build`'s folder in a checkout; when moeffi is imported
 * from a URL, the verified prebuilt libraries that ffi/fetch_libs.ts found or downloaded at load.
 */
export const BUILTIN_DIR = import.meta.url.startsWith("file:")
  ? fileURLToPath(new URL("../build/lib/", import.meta.url))
  : PREBUILT_LIB_DIR ?? "";

const MESSAGE_BYTES = 1024;

/** A rough count of multiply-adds (or elements) of a problem, to tell long CPU runs from short ones. */
const cpuWork = (p: Problem) => p.m * Math.max(p.topk, 1) * Math.max(p.k, 1) * Math.max(p.n, p.experts, 1);
/** Above this many (about a millisecond of CPU work), a CPU run leaves the event loop. */
const NONBLOCKING_WORK = 1 << 20;
type PluginLibrary = NativeLibrary<typeof PLUGIN_SYMBOLS>;

/** One loaded backend library. */
export class Backend {
  /** Wraps an opened, checked library (see loadRegistry). */
  constructor(
    /** What the library says it is and claims. */
    readonly manifest: Manifest,
    /** The library's file. */
    readonly path: string,
    /** Loaded from the built-in folder (its name is reserved). */
    readonly builtin: boolean,
    private readonly lib: PluginLibrary,
  ) {}

  /** The backend's unique name. */
  get name(): string {
    return this.manifest.name;
  }

  /** The plugin's own verdict: its priority for this problem, or null, and why. */
  supported(problem: Problem): { priority: number | null; reason: string } {
    const reason = new Uint8Array(MESSAGE_BYTES);
    const priority = this.lib.symbols.moeffi_supported(encodeProblem(problem), reason, reason.length) as number;
    return { priority: priority >= 0 ? priority : null, reason: cString(reason) || "(no reason given)" };
  }

  /** Exact workspace bytes run() needs for the problem. */
  workspaceSize(problem: Problem): number {
    const bytes = new BigUint64Array(1);
    this.check("workspace_size", problem, this.lib.symbols.moeffi_workspace_size(encodeProblem(problem), bytes), "");
    return Number(bytes[0]);
  }

  /** Converts canonical weights once; the returned handle is released with release(). */
  prepare(problem: Problem, weights: Partial<WeightAddresses>): bigint {
    const handle = new BigUint64Array(1);
    const message = new Uint8Array(MESSAGE_BYTES);
    const status = this.lib.symbols.moeffi_prepare(
      encodeProblem(problem),
      encodeWeights(weights),
      handle,
      message,
      message.length,
    );
    this.check("prepare", problem, status, cString(message));
    return handle[0];
  }

  /** Frees what prepare() made. */
  release(handle: bigint): void {
    if (handle !== 0n) this.lib.symbols.moeffi_release(handle);
  }

  /**
   * Runs the op. Long CPU runs go to a Deno worker thread so the event loop stays free (Bun has no
   * nonblocking FFI and blocks); small ones, and CUDA backends (which only enqueue), run in place,
   * since the thread hop alone costs about 100 us in Deno.
   */
  async run(problem: Problem, handle: bigint, tensors: Partial<TensorAddresses>, keepAlive: unknown[]): Promise<void> {
    const message = new Uint8Array(MESSAGE_BYTES);
    const args = [encodeProblem(problem), handle, encodeTensors(tensors), message, message.length] as const;
    const status = this.manifest.device === "cpu" && cpuWork(problem) > NONBLOCKING_WORK
      ? await this.lib.symbols.moeffi_run_async(...args)
      : this.lib.symbols.moeffi_run(...args);
    keepAlive.length = 0; // the buffers behind the addresses had to live until here
    this.check("run", problem, status, cString(message));
  }

  /** Drops the core's reference to the library (libraries are built not to unload). */
  close(): void {
    this.lib.close();
  }

  /** Throws a "backend_failed" MoeffiError unless status is MOEFFI_OK. */
  private check(what: string, problem: Problem, status: number, message: string) {
    if (status === 0) return;
    const kind = STATUS[status] ?? `status ${status}`;
    throw new MoeffiError(
      "backend_failed",
      `${this.name}: ${what} of ${problem.op} failed (${kind})${message ? `: ${message}` : ""}`,
    );
  }
}

/** A library or folder that did not load, and why. */
export interface Skipped {
  /** The library or folder. */
  path: string;
  /** Why it was skipped. */
  reason: string;
}

/** The outcome of plugin discovery. */
export interface Registry {
  /** Built-ins first, then plugins in folder order. */
  backends: Backend[];
  /** Libraries and folders that did not load, with the reason. */
  skipped: Skipped[];
}

const LIBRARY = /\.(so|dylib|dll)$/;

function librariesIn(dir: string, skipped: Skipped[]): string[] {
  if (dir === "") return [];
  try {
    if (!existsSync(dir) || !statSync(dir).isDirectory()) {
      if (dir !== BUILTIN_DIR) skipped.push({ path: dir, reason: "plugin folder does not exist" });
      return [];
    }
    return readdirSync(dir).filter((f) => LIBRARY.test(f)).sort().map((f) => join(dir, f));
  } catch (e) {
    skipped.push({ path: dir, reason: `cannot list folder: ${(e as Error).message}` });
    return [];
  }
}

function sameLayout(lib: PluginLibrary): string | undefined {
  for (const [struct, expected] of Object.entries(LAYOUT)) {
    const got = new BigUint64Array(32);
    const n = lib.symbols.moeffi_layout(LAYOUT_IDS[struct as keyof typeof LAYOUT], got, got.length) as number;
    const actual = [...got.subarray(0, Math.max(n, 0))].map(Number);
    if (actual.join() !== expected.join()) {
      return `struct moeffi_${struct} layout differs: plugin [${actual.join(", ")}], core [${expected.join(", ")}]`;
    }
  }
}

function invalidManifest(m: Manifest): string | undefined {
  if (!/^[a-z0-9_-]{1,31}$/.test(m.name)) return `manifest name "${m.name}" is not 1-31 of [a-z0-9_-]`;
  if (m.abiVersion !== ABI_VERSION) return `manifest ABI version ${m.abiVersion}, core expects ${ABI_VERSION}`;
  if (m.ops.length === 0) return "manifest lists no ops";
}

/** Opens one library and checks it; returns the backend or why it was skipped. */
function openBackend(path: string, builtin: boolean): Backend | string {
  let lib: PluginLibrary;
  try {
    lib = runtime.open(path, PLUGIN_SYMBOLS);
  } catch (e) {
    return `cannot load (every symbol of moeffi.h must be exported): ${(e as Error).message}`;
  }
  const fail = (reason: string) => (lib.close(), reason);
  const abi = lib.symbols.moeffi_abi_version() as number;
  if (abi !== ABI_VERSION) return fail(`ABI version ${abi}, core expects ${ABI_VERSION}`);
  const layout = sameLayout(lib);
  if (layout) return fail(layout);
  const buf = new Uint8Array(LAYOUT.manifest[0]);
  new DataView(buf.buffer).setUint32(0, buf.length, true);
  if ((lib.symbols.moeffi_describe(buf) as number) !== 0) return fail("moeffi_describe failed");
  let manifest: Manifest;
  try {
    manifest = decodeManifest(buf);
  } catch (e) {
    return fail(`bad manifest: ${(e as Error).message}`);
  }
  const bad = invalidManifest(manifest);
  if (bad) return fail(bad);
  return new Backend(manifest, path, builtin, lib);
}

/** Loads the built-in backends, then every library in each plugin folder. */
export function loadRegistry(pluginDirs: readonly string[], builtinDir = BUILTIN_DIR): Registry {
  const registry: Registry = { backends: [], skipped: [] };
  const sources = [
    ...librariesIn(builtinDir, registry.skipped).map((path) => ({ path, builtin: true })),
    ...pluginDirs.flatMap((dir) => librariesIn(dir, registry.skipped)).map((path) => ({ path, builtin: false })),
  ];
  for (const { path, builtin } of sources) {
    const backend = openBackend(path, builtin);
    if (typeof backend === "string") {
      registry.skipped.push({ path, reason: backend });
      continue;
    }
    const name = backend.name;
    const clash = !builtin && BUILTIN_NAMES.includes(name)
      ? `name "${name}" is reserved for a built-in backend`
      : registry.backends.some((b) => b.name === name)
      ? `name "${name}" is already taken by ${registry.backends.find((b) => b.name === name)!.path}`
      : undefined;
    if (clash) {
      backend.close();
      registry.skipped.push({ path, reason: clash });
    } else {
      registry.backends.push(backend);
    }
  }
  return registry;
}
