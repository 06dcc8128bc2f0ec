// A moeffi context: the loaded backends, the selection options, and the one path every op takes:
// validate -> select -> prepare once -> run.
import { FLAG_BATCH_INVARIANT, type Op, type Problem, type TensorAddresses } from "../ffi/abi.ts";
import { type Backend, loadRegistry, type Registry } from "../ffi/plugins.ts";
import { runtime } from "../ffi/runtime.ts";
import { ArgumentError, MoeffiError } from "./errors.ts";
import { explain, optionsFromEnv, select, type SelectOptions, type Verdict } from "./oracle.ts";
import { type Device, type DType, type Tensor, tensor, type TensorLike } from "./tensor.ts";
import { CudaDevice, type DeviceTensor } from "../cuda/device.ts";
import { cudaDriver } from "../cuda/driver.ts";

/** Options of a Context; each overrides the matching environment variable. */
export interface ContextOptions extends SelectOptions {
  /** Extra plugin folders, searched after MOEFFI_PLUGIN_PATH (colon-separated). */
  pluginPaths?: readonly string[];
  /** Where tensors live (MOEFFI_DEVICE): "cpu" or "cuda:N"; default cuda:0 when a GPU is present. */
  device?: Device;
}

/** Problem fields an op fills in; the context adds device and flags. */
export type ProblemSpec = Pick<Problem, "op"> & Partial<Omit<Problem, "op" | "device" | "deviceIndex">>;

/**
 * Loaded backends, selection options and a device: what every op runs through. Most programs use
 * the shared `defaultContext()`; tests and multi-device programs make their own.
 */
export class Context implements Disposable {
  /** The backends that loaded, and the libraries skipped with their reasons. */
  readonly registry: Registry;
  /** Selection options after the environment was applied. */
  readonly options: SelectOptions;
  /** Where this context's tensors live. */
  readonly device: Device;
  /** The CUDA device when `device` is one. */
  readonly cuda?: CudaDevice;
  #workspace?: DeviceTensor<"u8">;

  /** Loads the built-in backends and the plugin folders, and opens the device. */
  constructor(options: ContextOptions = {}) {
    const env = optionsFromEnv();
    this.options = {
      backend: options.backend ?? env.backend,
      disable: options.disable ?? env.disable,
      batchInvariant: options.batchInvariant ?? env.batchInvariant,
      log: options.log ?? env.log,
    };
    const device = options.device ?? runtime.env("MOEFFI_DEVICE") ?? ("error" in cudaDriver() ? "cpu" : "cuda:0");
    if (device !== "cpu" && !/^cuda:\d+$/.test(device)) {
      throw new ArgumentError("device", undefined, `"cpu" or "cuda:N"`, `got ${device}`);
    }
    this.device = device as Device;
    if (device !== "cpu") this.cuda = CudaDevice.get(Number(device.slice(5)));
    const envPaths = runtime.env("MOEFFI_PLUGIN_PATH")?.split(":").filter(Boolean) ?? [];
    this.registry = loadRegistry([...envPaths, ...(options.pluginPaths ?? [])]);
  }

  /** The full problem struct for this context's device and options. */
  problem(spec: ProblemSpec): Problem {
    return {
      m: 0,
      n: 0,
      k: 0,
      experts: 0,
      topk: 0,
      weightScale: "per-tensor",
      actScale: "static-tensor",
      flags: 0,
      ...spec,
      device: this.device === "cpu" ? "cpu" : "cuda",
      deviceIndex: this.device === "cpu" ? -1 : Number(this.device.slice(5)),
    } as Problem;
  }

  /** Adds FLAG_BATCH_INVARIANT when the options ask for batch invariance. */
  private withFlags(p: Problem): Problem {
    return this.options.batchInvariant ? { ...p, flags: p.flags | FLAG_BATCH_INVARIANT } : p;
  }

  /** Every backend's verdict on a problem, and which one would run it. */
  explain(spec: ProblemSpec | Problem): Verdict[] {
    return explain(this.registry, this.withFlags(this.problem(spec)), this.options);
  }

  /** The backend that runs a problem (strict when one is forced). */
  select(problem: Problem, backend?: string): { backend: Backend; verdicts: Verdict[] } {
    return select(this.registry, this.withFlags(problem), { ...this.options, backend: backend ?? this.options.backend });
  }

  /** A new tensor on this context's device (zeros on the host, uninitialized on a GPU). */
  empty<D extends DType>(dtype: D, shape: readonly number[]): Tensor<D> | DeviceTensor<D> {
    return this.cuda ? this.cuda.empty(dtype, shape) : tensor(dtype, shape);
  }

  /** A host tensor moved to this context's device (the same tensor on the CPU). */
  upload<D extends DType>(t: Tensor<D>): Tensor<D> | DeviceTensor<D> {
    return this.cuda ? this.cuda.upload(t) : t;
  }

  /** Waits for queued device work and reports errors found by kernels; a no-op on the CPU. */
  async synchronize(): Promise<void> {
    await this.cuda?.synchronize();
  }

  /** Workspace for one run: a fresh host buffer, or this device's grow-only buffer (runs are stream-ordered). */
  private workspace(bytes: number): { address: bigint; keep: unknown } {
    if (!this.cuda) {
      const host = new Uint8Array(bytes);
      return { address: runtime.addressOf(host), keep: host };
    }
    if (!this.#workspace || this.#workspace.bytes < bytes) {
      this.#workspace?.[Symbol.dispose]();
      this.#workspace = this.cuda.empty("u8", [bytes]);
    }
    return { address: this.#workspace.address(), keep: this.#workspace };
  }

  /** Runs one op: tensors become addresses, the workspace is sized exactly and owned here. */
  async run(
    backend: Backend,
    problem: Problem,
    handle: bigint,
    slots: Partial<Record<keyof TensorAddresses, TensorLike>>,
  ): Promise<void> {
    const p = this.withFlags(problem);
    const verdict = backend.supported(p);
    if (verdict.priority === null) {
      throw new MoeffiError("backend_rejected", `${backend.name} cannot run ${p.op} with M=${p.m}: ${verdict.reason}`);
    }
    const bytes = backend.workspaceSize(p);
    const workspace = this.workspace(bytes);
    const addresses: Partial<TensorAddresses> = {
      workspace: workspace.address,
      workspaceBytes: BigInt(bytes),
      stream: this.cuda?.stream ?? 0n,
      errorFlags: this.cuda?.errorFlags ?? 0n,
    };
    for (const [slot, t] of Object.entries(slots)) {
      if (t) addresses[slot as keyof TensorAddresses] = t.address();
    }
    await backend.run(p, handle, addresses, [workspace.keep, slots]);
  }

  /** Closes every backend library. Layers made from this context must be disposed first. */
  [Symbol.dispose](): void {
    this.#workspace?.[Symbol.dispose]();
    for (const b of this.registry.backends) b.close();
    this.registry.backends.length = 0;
  }
}

let shared: Context | undefined;
/** The process-wide context, created on first use from the environment. */
export function defaultContext(): Context {
  return (shared ??= new Context());
}

export type { Op };
