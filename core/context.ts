// A moeffi context: the loaded backends, the selection options, and the one path every op takes:
// validate -> select -> prepare once -> run.
import { FLAG_BATCH_INVARIANT, type Op, type Problem, type TensorAddresses } from "../ffi/abi.ts";
import { type Backend, loadRegistry, type Registry } from "../ffi/plugins.ts";
import { runtime } from "../ffi/runtime.ts";
import { ArgumentError, MoeffiError } from "./errors.ts";
import { explain, optionsFromEnv, select, type SelectOptions, type Verdict } from "./oracle.ts";
import type { Device, TensorLike } from "./tensor.ts";

export interface ContextOptions extends SelectOptions {
  /** Extra plugin folders, searched after MOEFFI_PLUGIN_PATH (colon-separated). */
  pluginPaths?: readonly string[];
  /** Where tensors live. Only "cpu" until the CUDA backends land. */
  device?: Device;
}

/** Problem fields an op fills in; the context adds device and flags. */
export type ProblemSpec = Pick<Problem, "op"> & Partial<Omit<Problem, "op" | "device" | "deviceIndex">>;

export class Context implements Disposable {
  readonly registry: Registry;
  readonly options: SelectOptions;
  readonly device: Device;

  constructor(options: ContextOptions = {}) {
    const env = optionsFromEnv();
    this.options = {
      backend: options.backend ?? env.backend,
      disable: options.disable ?? env.disable,
      batchInvariant: options.batchInvariant ?? env.batchInvariant,
      log: options.log ?? env.log,
    };
    this.device = options.device ?? "cpu";
    if (this.device !== "cpu") throw new ArgumentError("device", undefined, `"cpu" (CUDA devices are not supported yet)`, `got ${this.device}`);
    const envPaths = runtime.env("MOEFFI_PLUGIN_PATH")?.split(":").filter(Boolean) ?? [];
    this.registry = loadRegistry([...envPaths, ...(options.pluginPaths ?? [])]);
  }

  /** The full problem struct for this context's device and options. */
  problem(spec: ProblemSpec): Problem {
    return {
      m: 0, n: 0, k: 0, experts: 0, topk: 0, weightScale: "per-tensor", actScale: "static-tensor", flags: 0,
      ...spec,
      device: this.device === "cpu" ? "cpu" : "cuda",
      deviceIndex: this.device === "cpu" ? -1 : Number(this.device.slice(5)),
    } as Problem;
  }

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

  /** Runs one op: tensors become addresses, the workspace is sized exactly and owned here. */
  async run(backend: Backend, problem: Problem, handle: bigint, slots: Partial<Record<keyof TensorAddresses, TensorLike>>): Promise<void> {
    const p = this.withFlags(problem);
    const verdict = backend.supported(p);
    if (verdict.priority === null) {
      throw new MoeffiError("backend_rejected", `${backend.name} cannot run ${p.op} with M=${p.m}: ${verdict.reason}`);
    }
    const workspace = new Uint8Array(backend.workspaceSize(p));
    const addresses: Partial<TensorAddresses> = { workspace: runtime.addressOf(workspace), workspaceBytes: BigInt(workspace.length) };
    for (const [slot, t] of Object.entries(slots)) {
      if (t) addresses[slot as keyof TensorAddresses] = t.address();
    }
    await backend.run(p, handle, addresses, [workspace, slots]);
  }

  /** Closes every backend library. Layers made from this context must be disposed first. */
  [Symbol.dispose](): void {
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
