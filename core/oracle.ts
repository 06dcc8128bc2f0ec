// The selection oracle: for one problem, ask every backend (the core's own rules first, then the
// plugin's supported() in C) and take the highest priority. A forced backend is strict: it runs or
// raises with its reason, never a silent fallback. When nothing fits, the error lists every reason.
import { FLAG_BATCH_INVARIANT, type Problem } from "../ffi/abi.ts";
import type { Backend, Registry } from "../ffi/plugins.ts";
import { runtime } from "../ffi/runtime.ts";
import { MoeffiError } from "./errors.ts";

/** How the oracle chooses; each field has an environment variable. */
export interface SelectOptions {
  /** Run this backend or fail (MOEFFI_BACKEND). */
  backend?: string;
  /** Never pick these (MOEFFI_DISABLE=a,b). */
  disable?: readonly string[];
  /** Only backends claiming bitwise batch invariance for the problem (MOEFFI_BATCH_INVARIANT=1). */
  batchInvariant?: boolean;
  /** Log every rejection and the choice to stderr (MOEFFI_LOG=debug). */
  log?: boolean;
}

/** The options the environment sets; explicit options override them field by field. */
export function optionsFromEnv(env: (name: string) => string | undefined = runtime.env): SelectOptions {
  const list = (v: string | undefined) => v?.split(",").map((s) => s.trim()).filter(Boolean);
  return {
    backend: env("MOEFFI_BACKEND")?.trim() || undefined,
    disable: list(env("MOEFFI_DISABLE")),
    batchInvariant: ["1", "true", "yes"].includes(env("MOEFFI_BATCH_INVARIANT")?.toLowerCase() ?? ""),
    log: env("MOEFFI_LOG")?.toLowerCase() === "debug",
  };
}

/** One backend's answer for one problem. */
export interface Verdict {
  /** Backend name (or library path, for a library that did not load). */
  backend: string;
  /** Priority when the backend can run the problem, else null. */
  priority: number | null;
  /** Why yes or why no, in the backend's own words. */
  reason: string;
  /** Whether this backend runs the problem. */
  chosen: boolean;
}

function judge(b: Backend, p: Problem, o: SelectOptions): { priority: number | null; reason: string } {
  if (o.disable?.includes(b.name)) return { priority: null, reason: "disabled by MOEFFI_DISABLE" };
  if (!b.manifest.ops.includes(p.op)) return { priority: null, reason: `does not implement ${p.op}` };
  if (o.batchInvariant) {
    if ((p.op === "fp8_moe" || p.op === "fp8_scaled_mm") && p.actScale === "dynamic-tensor") {
      return {
        priority: null,
        reason: "batch invariance asked, but dynamic per-tensor activation scales depend on the whole batch",
      };
    }
    if (!b.manifest.batchInvariantOps.includes(p.op)) {
      return { priority: null, reason: `does not claim batch invariance for ${p.op}` };
    }
  }
  return b.supported(p);
}

/** Every backend's verdict on the problem, in registry order; skipped libraries appear as rejected. */
export function explain(registry: Registry, problem: Problem, options: SelectOptions = {}): Verdict[] {
  const p = options.batchInvariant ? { ...problem, flags: problem.flags | FLAG_BATCH_INVARIANT } : problem;
  const verdicts = registry.backends.map((b) => ({ backend: b.name, ...judge(b, p, options), chosen: false }));
  const candidates = verdicts.filter((v) => v.priority !== null && (!options.backend || v.backend === options.backend));
  const best = candidates.reduce<Verdict | undefined>((a, v) => (!a || v.priority! > a.priority! ? v : a), undefined);
  if (best) best.chosen = true;
  return [
    ...verdicts,
    ...registry.skipped.map((s) => ({ backend: s.path, priority: null, reason: `not loaded: ${s.reason}`, chosen: false })),
  ];
}

/** Verdicts as an indented table, one line each; `*` marks the chosen backend. */
export function formatVerdicts(verdicts: readonly Verdict[]): string {
  return verdicts.map((v) =>
    `  ${v.chosen ? "*" : "-"} ${v.backend}: ${v.priority === null ? "no" : `yes (priority ${v.priority})`}, ${v.reason}`
  ).join("\n");
}

/** Picks the backend for a problem, or throws a MoeffiError that gives every reason. */
export function select(
  registry: Registry,
  problem: Problem,
  options: SelectOptions = {},
): { backend: Backend; verdicts: Verdict[] } {
  const names = registry.backends.map((b) => b.name);
  for (const name of [options.backend ?? [], options.disable ?? []].flat()) {
    if (!names.includes(name)) {
      throw new MoeffiError(
        "unknown_backend",
        `unknown backend "${name}"; loaded: ${names.join(", ") || "none"}` +
          registry.skipped.map((s) => `; skipped ${s.path}: ${s.reason}`).join(""),
      );
    }
  }
  const verdicts = explain(registry, problem, options);
  if (options.log) {
    for (const v of verdicts) {
      console.error(
        `moeffi: ${problem.op}: ${v.backend} ${
          v.chosen ? "chosen" : v.priority === null ? "rejected" : "passed over"
        }: ${v.reason}`,
      );
    }
  }
  const chosen = verdicts.find((v) => v.chosen);
  if (chosen) return { backend: registry.backends.find((b) => b.name === chosen.backend)!, verdicts };
  if (options.backend) {
    const v = verdicts.find((v) => v.backend === options.backend)!;
    throw new MoeffiError("backend_rejected", `backend "${options.backend}" (forced) cannot run ${problem.op}: ${v.reason}`);
  }
  throw new MoeffiError("no_backend", `no backend supports ${describeProblem(problem)}:\n${formatVerdicts(verdicts)}`);
}

/** A one-line description of a problem for messages. */
export function describeProblem(p: Problem): string {
  const dims = p.op === "fp8_moe"
    ? `M=${p.m} K=${p.k} N=${p.n} E=${p.experts} topk=${p.topk}, ${p.weightScale} weights, ${p.actScale} activations`
    : p.op === "fp8_scaled_mm"
    ? `M=${p.m} N=${p.n} K=${p.k}, ${p.weightScale} weights, ${p.actScale} activations`
    : p.op === "topk_softmax"
    ? `M=${p.m} E=${p.experts} topk=${p.topk}`
    : p.op === "nvfp4_silu_quant"
    ? `M=${p.m} N=${p.n} E=${p.experts}`
    : `M=${p.m} K=${p.k} E=${p.experts}`;
  return `${p.op} (${dims}) on ${p.device === "cpu" ? "cpu" : `cuda:${p.deviceIndex}`}${
    p.flags & FLAG_BATCH_INVARIANT ? ", batch invariant" : ""
  }`;
}
