// FP8 MoE checkpoints -> moeffi's canonical layout (see MoeWeights in ops.ts): w13 fp8 [E, 2N, K]
// holds each expert's gate rows then its up rows, w2 fp8 [E, K, N], scales as weightScaleShape says.
// Weights are read expert by expert straight into the canonical buffers; nothing is requantized,
// so a loaded layer computes exactly what the checkpoint describes.
//
//   deepseek-v3, qwen3-moe  model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight (F8_E4M3)
//                           + .weight_scale_inv (128x128 blocks; a dequant multiplier, as in moeffi)
//                           -> weightScale block-128, actScale dynamic-group-128 (their 1x128 activations)
//   mixtral                 model.layers.{L}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight (w1 gate, w3 up, w2 down)
//                           + .weight_scale (scalar or per row) and optional .input_scale (scalar)
//                           -> weightScale per-channel, actScale static-tensor (or dynamic-tensor without input_scale)
import type { ActScale, WeightScale } from "../ffi/abi.ts";
import { type Context, defaultContext } from "./context.ts";
import { fromBf16 } from "./dtypes.ts";
import { ArgumentError } from "./errors.ts";
import { MoeLayer } from "./ops.ts";
import { CheckpointError, SafetensorsCheckpoint, type TensorSource } from "./safetensors.ts";
import { type Tensor, tensor } from "./tensor.ts";
import { cdiv, expectInt, weightScaleShape } from "./validate.ts";

/** Checkpoint naming conventions the loader knows. */
export const CHECKPOINT_FORMATS = ["deepseek-v3", "qwen3-moe", "mixtral"] as const;
/** One of CHECKPOINT_FORMATS. */
export type CheckpointFormat = typeof CHECKPOINT_FORMATS[number];

interface Naming {
  /** Path of the experts under model.layers.{L}. */
  experts: string;
  gate: string;
  up: string;
  down: string;
  /** Suffix of the weight scale tensor, next to "weight". */
  scale: string;
}
const BLOCK_NAMING: Naming = {
  experts: "mlp.experts",
  gate: "gate_proj",
  up: "up_proj",
  down: "down_proj",
  scale: "weight_scale_inv",
};
const NAMING: Record<CheckpointFormat, Naming> = {
  // DeepSeek-V3/R1 and Qwen3-MoE FP8 name their experts identically.
  "deepseek-v3": BLOCK_NAMING,
  "qwen3-moe": BLOCK_NAMING,
  mixtral: { experts: "block_sparse_moe.experts", gate: "w1", up: "w3", down: "w2", scale: "weight_scale" },
};

/** The layer's MoeConfig less what the caller chooses (topk, backend, context). */
export interface MoeCheckpointConfig {
  /** K */
  hidden: number;
  /** N */
  intermediate: number;
  /** E: number of experts. */
  experts: number;
  /** block-128 (deepseek-v3, qwen3-moe) or per-channel (mixtral). */
  weightScale: WeightScale;
  /** dynamic-group-128 (deepseek-v3, qwen3-moe); mixtral: static-tensor, or dynamic-tensor without input_scale. */
  actScale: ActScale;
}

/** Host tensors in the canonical layout, ready for MoeLayer.load. */
export interface MoeCheckpointWeights {
  /** fp8 e4m3 [E, 2N, K]: gate rows then up rows per expert. */
  w13: Tensor<"fp8_e4m3">;
  /** f32 scales of w13, shaped as weightScaleShape says for the config's weightScale. */
  w13Scale: Tensor<"f32">;
  /** fp8 e4m3 [E, K, N]: the down projection. */
  w2: Tensor<"fp8_e4m3">;
  /** f32 scales of w2, shaped as weightScaleShape says for the config's weightScale. */
  w2Scale: Tensor<"f32">;
  /** Static activation scale of x, f32 [1]: the max input_scale of every w1 and w3 (mixtral static-tensor only). */
  a1Scale?: Tensor<"f32">;
  /** Static activation scale of the intermediate, f32 [1]: the max input_scale of every w2 (mixtral static-tensor only). */
  a2Scale?: Tensor<"f32">;
}

/** One MoE layer of a checkpoint. */
export interface MoeCheckpoint {
  /** The naming convention the layer's experts use. */
  format: CheckpointFormat;
  /** The layer's shape and scale schemes. */
  config: MoeCheckpointConfig;
  /** The layer's weights, as host tensors. */
  weights: MoeCheckpointWeights;
}

/** Base names (without ".weight") of one expert's three matrices. */
interface ExpertNames {
  gate: string;
  up: string;
  down: string;
}

/** "1-3, 5" for [1, 2, 3, 5]. */
function ranges(xs: number[]): string {
  const out: string[] = [];
  for (let i = 0; i < xs.length; i++) {
    let j = i;
    while (j + 1 < xs.length && xs[j + 1] === xs[j] + 1) j++;
    out.push(i === j ? `${xs[i]}` : `${xs[i]}-${xs[j]}`);
    i = j;
  }
  return out.join(", ") || "none";
}

/** The layers of a checkpoint that have experts in either naming, for error messages. */
function expertLayers(src: TensorSource): number[] {
  const layers = new Set<number>();
  for (const n of src.names) {
    const m = /^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.\d+\./.exec(n);
    if (m) layers.add(Number(m[1]));
  }
  return [...layers].sort((a, b) => a - b);
}

/** The format whose expert names layer L uses. DeepSeek is told from Qwen3 by its shared experts / router bias. */
function detectFormat(src: TensorSource, layer: number): CheckpointFormat {
  const has = (prefix: string) => src.names.some((n) => n.startsWith(prefix));
  if (has(`model.layers.${layer}.block_sparse_moe.experts.`)) return "mixtral";
  if (has(`model.layers.${layer}.mlp.experts.`)) {
    return src.names.some((n) => /\.mlp\.(shared_experts\.|gate\.e_score_correction_bias$)/.test(n))
      ? "deepseek-v3"
      : "qwen3-moe";
  }
  throw new CheckpointError(
    src.path,
    undefined,
    `layer ${layer} has no MoE experts (no model.layers.${layer}.mlp.experts.* or .block_sparse_moe.experts.* tensors); ` +
      `layers with experts: ${ranges(expertLayers(src))}`,
  );
}

/** E = highest expert index + 1; then every expert below it must have its three weights. */
function expertNames(src: TensorSource, layer: number, format: CheckpointFormat): ExpertNames[] {
  const naming = NAMING[format], prefix = `model.layers.${layer}.${naming.experts}.`;
  let experts = 0;
  for (const n of src.names) {
    if (!n.startsWith(prefix)) continue;
    const m = /^(\d+)\./.exec(n.slice(prefix.length));
    if (m) experts = Math.max(experts, Number(m[1]) + 1);
  }
  if (experts === 0) {
    throw new CheckpointError(
      src.path,
      undefined,
      `layer ${layer} has no ${format} experts (no ${prefix}* tensors); layers with experts: ${ranges(expertLayers(src))}`,
    );
  }
  const names = Array.from({ length: experts }, (_, e) => ({
    gate: `${prefix}${e}.${naming.gate}`,
    up: `${prefix}${e}.${naming.up}`,
    down: `${prefix}${e}.${naming.down}`,
  }));
  for (const [e, x] of names.entries()) {
    for (const base of [x.gate, x.up, x.down]) {
      if (!src.has(`${base}.weight`)) {
        throw new CheckpointError(
          src.path,
          `${base}.weight`,
          `is missing: expert ${e} of layer ${layer} is incomplete or absent ` +
            `(experts 0-${experts - 1} are expected, from the highest index found)`,
        );
      }
    }
  }
  return names;
}

const sameShape = (a: readonly number[], b: readonly number[]) => a.length === b.length && a.every((d, i) => d === b[i]);
const fmt = (s: readonly number[]) => `[${s.join(", ")}]`;

/** An expert weight must be F8_E4M3 of the shape expert 0's has. */
function expectFp8(src: TensorSource, name: string, shape: readonly number[]): void {
  const info = src.info(name);
  if (info.dtype !== "F8_E4M3") {
    throw new CheckpointError(
      src.path,
      name,
      `is ${info.dtype}, expected F8_E4M3: moeffi loads FP8 expert weights (quantize the checkpoint to FP8 first)`,
    );
  }
  if (!sameShape(info.shape, shape)) {
    throw new CheckpointError(src.path, name, `has shape ${fmt(info.shape)}, expected ${fmt(shape)} (from expert 0)`);
  }
}

/** N and K from expert 0's gate weight [N, K]. */
function dims(src: TensorSource, first: ExpertNames): { n: number; k: number } {
  const name = `${first.gate}.weight`, shape = src.info(name).shape;
  if (shape.length !== 2) throw new CheckpointError(src.path, name, `has shape ${fmt(shape)}, expected a matrix [N, K]`);
  return { n: shape[0], k: shape[1] };
}

/** Every expert's matrices are F8_E4M3 of one shape (headers only: checked before anything large is read). */
function checkWeights(src: TensorSource, names: ExpertNames[], n: number, k: number): void {
  for (const x of names) {
    for (const [base, shape] of [[x.gate, [n, k]], [x.up, [n, k]], [x.down, [k, n]]] as const) {
      expectFp8(src, `${base}.weight`, shape);
    }
  }
}

/** Every expert's fp8 matrices, read straight into w13 [E, 2N, K] (gate rows, then up rows) and w2 [E, K, N]. */
function readWeights(src: TensorSource, names: ExpertNames[], n: number, k: number) {
  const e = names.length, w13 = new Uint8Array(e * 2 * n * k), w2 = new Uint8Array(e * k * n);
  for (const [i, x] of names.entries()) {
    src.readInto(`${x.gate}.weight`, w13.subarray(i * 2 * n * k, (2 * i + 1) * n * k));
    src.readInto(`${x.up}.weight`, w13.subarray((2 * i + 1) * n * k, (2 * i + 2) * n * k));
    src.readInto(`${x.down}.weight`, w2.subarray(i * k * n, (i + 1) * k * n));
  }
  return { w13: tensor("fp8_e4m3", [e, 2 * n, k], w13), w2: tensor("fp8_e4m3", [e, k, n], w2) };
}

/** A scale tensor as f32 values: F32, or BF16/F16 widened exactly; one of the accepted shapes; finite and > 0. */
function readScale(src: TensorSource, name: string, accepted: readonly (readonly number[])[]): Float32Array {
  if (!src.has(name)) throw new CheckpointError(src.path, name, "is missing: every FP8 expert weight needs its scale");
  const info = src.info(name);
  if (!["F32", "BF16", "F16"].includes(info.dtype)) {
    throw new CheckpointError(src.path, name, `is ${info.dtype}, expected an F32 (or BF16/F16) scale`);
  }
  if (!accepted.some((s) => sameShape(info.shape, s))) {
    throw new CheckpointError(src.path, name, `has shape ${fmt(info.shape)}, expected ${accepted.map(fmt).join(" or ")}`);
  }
  const t = src.read(name);
  const v = t.dtype === "bf16" ? fromBf16(t.data as Uint16Array) : t.data as Float32Array; // F16 is read as f32
  const bad = v.findIndex((x) => !(x > 0 && x < Infinity));
  if (bad >= 0) throw new CheckpointError(src.path, name, `element ${bad} is ${v[bad]}: scales must be finite and > 0`);
  return v;
}

/** DeepSeek/Qwen3 128x128 block scales: gate blocks then up blocks form w13Scale [E, 2N/128, ceil(K/128)]. */
function blockScales(src: TensorSource, names: ExpertNames[], n: number, k: number, suffix: string) {
  if (n % 128 !== 0) {
    // A 128-row block of w13 [2N, K] would straddle gate and up rows, which have separate scales.
    throw new CheckpointError(
      src.path,
      `${names[0].gate}.weight`,
      `intermediate size N = ${n} is not a multiple of 128: its gate and up 128x128 scale blocks cannot be stacked into w13's blocks`,
    );
  }
  const e = names.length, gs = [n / 128, cdiv(k, 128)], ds = [cdiv(k, 128), n / 128];
  const w13Scale = new Float32Array(e * 2 * gs[0] * gs[1]), w2Scale = new Float32Array(e * ds[0] * ds[1]);
  const g = gs[0] * gs[1], d = ds[0] * ds[1];
  for (const [i, x] of names.entries()) {
    w13Scale.set(readScale(src, `${x.gate}.${suffix}`, [gs]), 2 * i * g);
    w13Scale.set(readScale(src, `${x.up}.${suffix}`, [gs]), (2 * i + 1) * g);
    w2Scale.set(readScale(src, `${x.down}.${suffix}`, [ds]), i * d);
  }
  return {
    w13Scale: tensor("f32", weightScaleShape("block-128", 2 * n, k, e), w13Scale),
    w2Scale: tensor("f32", weightScaleShape("block-128", k, n, e), w2Scale),
  };
}

/** Mixtral scales (one per matrix, or one per row) as per-channel rows: exact even when w1's and w3's differ. */
function channelScales(src: TensorSource, names: ExpertNames[], n: number, k: number, suffix: string) {
  // moeffi's per-tensor scheme has one scale for gate and up together; expanding to per-row scales
  // keeps every expert's w1 and w3 scales without requantizing a single weight.
  const rowsOf = (name: string, rows: number) => {
    const v = readScale(src, name, [[], [1], [rows], [rows, 1]]);
    return v.length === 1 ? new Float32Array(rows).fill(v[0]) : v;
  };
  const e = names.length, w13Scale = new Float32Array(e * 2 * n), w2Scale = new Float32Array(e * k);
  for (const [i, x] of names.entries()) {
    w13Scale.set(rowsOf(`${x.gate}.${suffix}`, n), 2 * i * n);
    w13Scale.set(rowsOf(`${x.up}.${suffix}`, n), (2 * i + 1) * n);
    w2Scale.set(rowsOf(`${x.down}.${suffix}`, k), i * k);
  }
  return {
    w13Scale: tensor("f32", weightScaleShape("per-channel", 2 * n, k, e), w13Scale),
    w2Scale: tensor("f32", weightScaleShape("per-channel", k, n, e), w2Scale),
  };
}

/**
 * Mixtral static activation scales: a1 = max input_scale of every w1/w3, a2 = max of every w2.
 * moeffi quantizes a layer's activations with one static scale for all experts; the largest one
 * never saturates an activation that some expert's calibration saw (smaller ones only lose a little
 * resolution). Without any input_scale the checkpoint is dynamic: undefined.
 */
function inputScales(src: TensorSource, names: ExpertNames[]) {
  const all = names.flatMap((x) => [x.gate, x.up, x.down]).map((b) => `${b}.input_scale`);
  const present = all.filter((name) => src.has(name));
  if (present.length === 0) return undefined;
  const missing = all.find((name) => !src.has(name));
  if (missing) {
    throw new CheckpointError(src.path, missing, "is missing: some experts have static input scales, so all need them");
  }
  const max = (bases: string[]) => Math.max(...bases.map((b) => readScale(src, `${b}.input_scale`, [[], [1]])[0]));
  return {
    a1Scale: tensor("f32", [1], [max(names.flatMap((x) => [x.gate, x.up]))]),
    a2Scale: tensor("f32", [1], [max(names.map((x) => x.down))]),
  };
}

/** Loads one layer of a checkpoint from an open source (see loadMoeCheckpoint). */
function loadLayer(src: TensorSource, layer: number, format: CheckpointFormat | undefined): MoeCheckpoint {
  const fmtName = format ?? detectFormat(src, layer);
  const names = expertNames(src, layer, fmtName), { n, k } = dims(src, names[0]);
  checkWeights(src, names, n, k);
  const config = { hidden: k, intermediate: n, experts: names.length };
  // Scales first: they are small, and a bad one should fail before gigabytes of weights are read.
  if (fmtName === "mixtral") {
    const scales = channelScales(src, names, n, k, NAMING.mixtral.scale), statics = inputScales(src, names);
    return {
      format: fmtName,
      config: { ...config, weightScale: "per-channel", actScale: statics ? "static-tensor" : "dynamic-tensor" },
      weights: { ...readWeights(src, names, n, k), ...scales, ...statics },
    };
  }
  const scales = blockScales(src, names, n, k, NAMING[fmtName].scale);
  return {
    format: fmtName,
    config: { ...config, weightScale: "block-128", actScale: "dynamic-group-128" },
    weights: { ...readWeights(src, names, n, k), ...scales },
  };
}

/**
 * One MoE layer of an FP8 checkpoint as host tensors in moeffi's layout, plus the config to build
 * a MoeLayer with. `source`: a .safetensors file, an index json, a folder holding either, or an
 * open checkpoint (left open, for loading several layers). The format is detected when omitted.
 */
export function loadMoeCheckpoint(
  source: string | TensorSource,
  opts: { layer: number; format?: CheckpointFormat },
): MoeCheckpoint {
  const layer = expectInt("layer", opts?.layer, 0);
  if (opts.format !== undefined && !CHECKPOINT_FORMATS.includes(opts.format)) {
    throw new ArgumentError("format", undefined, `one of ${CHECKPOINT_FORMATS.join(", ")}`, `got ${String(opts.format)}`);
  }
  if (typeof source !== "string") return loadLayer(source, layer, opts.format);
  using src = new SafetensorsCheckpoint(source);
  return loadLayer(src, layer, opts.format);
}

/**
 * A MoeLayer with one layer of a checkpoint loaded (see loadMoeCheckpoint). Weights are uploaded to
 * the context's device for prepare and freed after it; only the static activation scales stay.
 */
export function openMoeCheckpoint(
  source: string | TensorSource,
  opts: { layer: number; topk: number; format?: CheckpointFormat; context?: Context; backend?: string; maxTokens?: number },
): MoeLayer {
  const { config, weights } = loadMoeCheckpoint(source, opts);
  const context = opts.context ?? defaultContext();
  const layer = new MoeLayer({ ...config, topk: opts.topk, context, backend: opts.backend, maxTokens: opts.maxTokens });
  const up = <T extends Tensor>(t: T) => context.upload(t);
  const big = { w13: up(weights.w13), w13Scale: up(weights.w13Scale), w2: up(weights.w2), w2Scale: up(weights.w2Scale) };
  try {
    layer.load({ ...big, ...(weights.a1Scale ? { a1Scale: up(weights.a1Scale), a2Scale: up(weights.a2Scale!) } : {}) });
  } catch (e) {
    layer[Symbol.dispose]();
    throw e;
  } finally {
    // prepare() copies the canonical weights into the backend's layout (moeffi.h), so device copies can go now.
    for (const [key, t] of Object.entries(big)) {
      if (t !== weights[key as keyof typeof big] && Symbol.dispose in t) (t as Disposable)[Symbol.dispose]();
    }
  }
  return layer;
}
