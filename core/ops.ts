// The public ops. Each validates its tensors, asks the oracle for a backend, has it prepare weights
// once (layers) and runs. Outputs are new host tensors unless the caller passes `out`.
import { type ActScale, FLAG_HAS_BIAS, FLAG_RENORMALIZE, type Problem, type WeightScale } from "../ffi/abi.ts";
import type { Backend } from "../ffi/plugins.ts";
import { type Context, defaultContext } from "./context.ts";
import { ArgumentError, MoeffiError } from "./errors.ts";
import type { Verdict } from "./oracle.ts";
import type { DType, Tensor, TensorLike } from "./tensor.ts";
import type { DeviceTensor } from "../cuda/device.ts";

/** A tensor of dtype D where T lives: outputs are on the device of the inputs. */
export type Like<T, D extends DType> = T extends DeviceTensor ? DeviceTensor<D> : Tensor<D>;
import {
  cdiv,
  expectFinite,
  expectIds,
  expectInt,
  expectMultipleOf16,
  expectOffsets,
  expectPositiveScales,
  expectScheme,
  expectTensor,
  weightScaleShape,
} from "./validate.ts";

// A prepared handle is released when its layer is disposed, or collected as a safety net.
const handles = new FinalizationRegistry<{ backend: Backend; handle: bigint }>(({ backend, handle }) => backend.release(handle));

/** A layer whose backend holds prepared weights: the base of MoeLayer and Fp8Linear. */
export abstract class PreparedLayer implements Disposable {
  /** The backend chosen to run this layer. */
  readonly backend: Backend;
  /** Every backend's verdict on the layer's problem when it was made. */
  readonly verdicts: Verdict[];
  /** The backend's handle to the prepared weights; 0n when none are loaded. */
  protected handle = 0n;
  /** Tensors given at load (static scales, bias) that every run passes. */
  protected statics: Record<string, TensorLike | undefined> = {};

  /** Picks the backend for the problem (strict when one is forced by name). */
  constructor(
    /** The context the layer runs in. */
    protected readonly ctx: Context,
    /** The problem the backend is chosen for (m = maxTokens). */
    protected readonly problem: Problem,
    backend?: string,
  ) {
    ({ backend: this.backend, verdicts: this.verdicts } = ctx.select(problem, backend));
  }

  /** Name of the backend that runs this layer. */
  get backendName(): string {
    return this.backend.name;
  }

  /** Releases any prepared weights, then has the backend prepare these. */
  protected prepare(weights: { w13: TensorLike; w13Scale: TensorLike; w2?: TensorLike; w2Scale?: TensorLike }): void {
    this.release();
    this.handle = this.backend.prepare(this.problem, {
      w13: weights.w13.address(),
      w13Scale: weights.w13Scale.address(),
      w2: weights.w2?.address() ?? 0n,
      w2Scale: weights.w2Scale?.address() ?? 0n,
    });
    handles.register(this, { backend: this.backend, handle: this.handle }, this);
  }

  /** The prepared handle; a "disposed" MoeffiError when no weights are loaded. */
  protected loaded(): bigint {
    if (this.handle === 0n) {
      throw new MoeffiError("disposed", "weights are not loaded: call load() first (or the layer was disposed)");
    }
    return this.handle;
  }

  /** Frees the prepared weights, if any. */
  private release(): void {
    if (this.handle === 0n) return;
    handles.unregister(this);
    this.backend.release(this.handle);
    this.handle = 0n;
  }

  /** Frees the prepared weights; forward() then throws until load() is called again. */
  [Symbol.dispose](): void {
    this.release();
  }
}

/** Static activation scales are given exactly when the scheme is static. */
function expectStatic(act: ActScale, name: string, t: TensorLike | undefined, device: Context["device"]) {
  if (act !== "static-tensor") {
    if (t) throw new ArgumentError(name, t.shape, `nothing: ${act} activations compute their own scales`);
    return;
  }
  expectTensor(name, t, "f32", [1], device);
  expectPositiveScales(name, t!);
}

/** Shape, scale schemes and backend choice of a MoeLayer. */
export interface MoeConfig {
  /** K: hidden size. */
  hidden: number;
  /** N: expert intermediate size. */
  intermediate: number;
  /** E: number of experts. */
  experts: number;
  /** Experts per token (at most experts). */
  topk: number;
  /** How w13Scale and w2Scale scale the weights. */
  weightScale: WeightScale;
  /** How activations are scaled; "static-tensor" needs a1Scale and a2Scale. */
  actScale: ActScale;
  /** Largest batch the backend is chosen for (default 4096); a forward may pass fewer rows. */
  maxTokens?: number;
  /** Force a backend by name (strict). */
  backend?: string;
  /** The context to run in (default: defaultContext()). */
  context?: Context;
}

/** The weights of a MoeLayer, on the layer's device, in the canonical layout. */
export interface MoeWeights {
  /** fp8 e4m3 [E, 2N, K]: gate rows then up rows per expert. */
  w13: TensorLike;
  /** f32 scales of w13, per weightScale: [E] | [E, 2N] | [E, ceil(2N/128), ceil(K/128)]. */
  w13Scale: TensorLike;
  /** fp8 e4m3 [E, K, N]: the down projection. */
  w2: TensorLike;
  /** f32 scales of w2, per weightScale: [E] | [E, K] | [E, ceil(K/128), ceil(N/128)]. */
  w2Scale: TensorLike;
  /** Static activation scale of x, f32 [1]; only with actScale "static-tensor". */
  a1Scale?: TensorLike;
  /** Static activation scale of the intermediate, f32 [1]; only with actScale "static-tensor". */
  a2Scale?: TensorLike;
}

/** A fused FP8 MoE layer (op fp8_moe). */
export class MoeLayer extends PreparedLayer {
  /** A copy of the config the layer was made with. */
  readonly config: Readonly<MoeConfig>;

  /** Validates the config and picks the backend; load() the weights before forward(). */
  constructor(config: MoeConfig) {
    const k = expectInt("hidden", config.hidden), n = expectInt("intermediate", config.intermediate);
    const experts = expectInt("experts", config.experts), topk = expectInt("topk", config.topk);
    expectMultipleOf16("hidden", k);
    expectMultipleOf16("intermediate", n);
    if (topk > experts) throw new ArgumentError("topk", undefined, `at most experts = ${experts}`, `got ${topk}`);
    const [weightScale, actScale] = expectScheme(config.weightScale, config.actScale);
    const ctx = config.context ?? defaultContext();
    const m = expectInt("maxTokens", config.maxTokens ?? 4096);
    super(ctx, ctx.problem({ op: "fp8_moe", m, n, k, experts, topk, weightScale, actScale }), config.backend);
    this.config = { ...config };
  }

  /** Validates and prepares the weights (once; loading again replaces them). */
  load(w: MoeWeights): this {
    const { k, n, experts: e, weightScale, actScale } = this.problem, dev = this.ctx.device;
    expectTensor("w13", w.w13, "fp8_e4m3", [e, 2 * n, k], dev);
    expectTensor("w13Scale", w.w13Scale, "f32", weightScaleShape(weightScale, 2 * n, k, e), dev);
    expectTensor("w2", w.w2, "fp8_e4m3", [e, k, n], dev);
    expectTensor("w2Scale", w.w2Scale, "f32", weightScaleShape(weightScale, k, n, e), dev);
    expectPositiveScales("w13Scale", w.w13Scale);
    expectPositiveScales("w2Scale", w.w2Scale);
    expectStatic(actScale, "a1Scale", w.a1Scale, dev);
    expectStatic(actScale, "a2Scale", w.a2Scale, dev);
    this.prepare(w);
    this.statics = { a1Scale: w.a1Scale, a2Scale: w.a2Scale };
    return this;
  }

  /** out[t] = sum_j topkWeights[t, j] * expert_{topkIds[t, j]}(x[t]), bf16 [M, K]. */
  async forward<T extends TensorLike>(
    x: T,
    topkIds: TensorLike,
    topkWeights: TensorLike,
    opts: { out?: Like<T, "bf16"> } = {},
  ): Promise<Like<T, "bf16">> {
    const { k, experts, topk } = this.problem, dev = this.ctx.device;
    const m = x?.shape?.[0];
    expectTensor("x", x, "bf16", [m, k], dev);
    expectTensor("topkIds", topkIds, "i32", [m, topk], dev);
    expectTensor("topkWeights", topkWeights, "f32", [m, topk], dev);
    expectIds("topkIds", topkIds, experts);
    expectFinite("topkWeights", topkWeights);
    const out = opts.out ?? this.ctx.empty("bf16", [m, k]) as Like<T, "bf16">;
    expectTensor("out", out, "bf16", [m, k], dev);
    const handle = this.loaded();
    await this.ctx.run(this.backend, { ...this.problem, m }, handle, { x, topkIds, topkWeights, out, ...this.statics });
    return out;
  }
}

/** Shape, scale schemes and backend choice of an Fp8Linear. */
export interface LinearConfig {
  /** K */
  inFeatures: number;
  /** N */
  outFeatures: number;
  /** How wScale scales W. */
  weightScale: WeightScale;
  /** How x is scaled; "static-tensor" needs a1Scale. */
  actScale: ActScale;
  /** Whether load() takes a bf16 [N] bias (default false). */
  bias?: boolean;
  /** Largest batch the backend is chosen for (default 4096); a forward may pass fewer rows. */
  maxTokens?: number;
  /** Force a backend by name (strict). */
  backend?: string;
  /** The context to run in (default: defaultContext()). */
  context?: Context;
}

/** The FP8 linear layer (op fp8_scaled_mm): y = dequant(quant(x)) @ dequant(W)^T (+ bias), bf16. */
export class Fp8Linear extends PreparedLayer {
  /** Validates the config and picks the backend; load() the weights before forward(). */
  constructor(
    /** The config the layer was made with. */
    readonly config: LinearConfig,
  ) {
    const k = expectInt("inFeatures", config.inFeatures), n = expectInt("outFeatures", config.outFeatures);
    expectMultipleOf16("inFeatures", k);
    const [weightScale, actScale] = expectScheme(config.weightScale, config.actScale);
    const ctx = config.context ?? defaultContext();
    const m = expectInt("maxTokens", config.maxTokens ?? 4096);
    super(
      ctx,
      ctx.problem({ op: "fp8_scaled_mm", m, n, k, weightScale, actScale, flags: config.bias ? FLAG_HAS_BIAS : 0 }),
      config.backend,
    );
  }

  /** Validates and prepares W fp8 [N, K], its f32 scales, the bias and a static a1Scale (loading again replaces them). */
  load(w: { w: TensorLike; wScale: TensorLike; bias?: TensorLike; a1Scale?: TensorLike }): this {
    const { n, k, weightScale, actScale } = this.problem, dev = this.ctx.device;
    expectTensor("w", w.w, "fp8_e4m3", [n, k], dev);
    expectTensor("wScale", w.wScale, "f32", weightScaleShape(weightScale, n, k), dev);
    expectPositiveScales("wScale", w.wScale);
    if (this.config.bias) expectTensor("bias", w.bias, "bf16", [n], dev);
    else if (w.bias) throw new ArgumentError("bias", w.bias.shape, "nothing: the layer was opened with bias: false");
    expectStatic(actScale, "a1Scale", w.a1Scale, dev);
    this.prepare({ w13: w.w, w13Scale: w.wScale });
    this.statics = { bias: w.bias, a1Scale: w.a1Scale };
    return this;
  }

  /** y = dequant(quant(x)) @ dequant(W)^T (+ bias): x bf16 [M, K] -> bf16 [M, N]. */
  async forward<T extends TensorLike>(x: T, opts: { out?: Like<T, "bf16"> } = {}): Promise<Like<T, "bf16">> {
    const { n, k } = this.problem, dev = this.ctx.device;
    const m = x?.shape?.[0];
    expectTensor("x", x, "bf16", [m, k], dev);
    const out = opts.out ?? this.ctx.empty("bf16", [m, n]) as Like<T, "bf16">;
    expectTensor("out", out, "bf16", [m, n], dev);
    await this.ctx.run(this.backend, { ...this.problem, m }, this.loaded(), { x, out, ...this.statics });
    return out;
  }
}

/** Routing: softmax over router logits f32 [M, E], then the topk largest (ties: lower id first). */
export async function topkSoftmax<T extends TensorLike>(
  logits: T,
  topk: number,
  opts: { renormalize?: boolean; context?: Context; backend?: string; ids?: Like<T, "i32">; weights?: Like<T, "f32"> } = {},
): Promise<{ ids: Like<T, "i32">; weights: Like<T, "f32"> }> {
  const ctx = opts.context ?? defaultContext(), dev = ctx.device;
  const [m, experts] = logits?.shape ?? [];
  expectTensor("logits", logits, "f32", [m, experts], dev);
  expectInt("experts (logits.shape[1])", experts);
  expectInt("topk", topk);
  if (topk > experts) throw new ArgumentError("topk", undefined, `at most experts = ${experts}`, `got ${topk}`);
  expectFinite("logits", logits);
  const ids = opts.ids ?? ctx.empty("i32", [m, topk]) as Like<T, "i32">;
  const weights = opts.weights ?? ctx.empty("f32", [m, topk]) as Like<T, "f32">;
  expectTensor("ids", ids, "i32", [m, topk], dev);
  expectTensor("weights", weights, "f32", [m, topk], dev);
  const problem = ctx.problem({ op: "topk_softmax", m, experts, topk, flags: opts.renormalize ? FLAG_RENORMALIZE : 0 });
  const { backend } = ctx.select(problem, opts.backend);
  await ctx.run(backend, problem, 0n, { x: logits, out: ids, outAux: weights });
  return { ids, weights };
}

/** Rows of the swizzled NVFP4 scale buffer: room for every expert to start on a 128-row tile. */
export const nvfp4ScaleRows = (m: number, experts: number): number => m + 127 * experts;

/** Options of the NVFP4 ops: context, a forced backend, and output tensors to fill. */
export interface Nvfp4Options<T extends TensorLike> {
  /** The context to run in (default: defaultContext()). */
  context?: Context;
  /** Force a backend by name (strict). */
  backend?: string;
  /** uint8 [M, cols / 2]: two e2m1 codes per byte, element 2i in the low nibble. */
  packed?: Like<T, "u8">;
  /** uint8 [M + 127 E, ceil(cols / 64) * 4]: the swizzled e4m3 block scales, padding zero. */
  scales?: Like<T, "u8">;
}

/** Validates and runs one NVFP4 op on x [m, cols] (quant) or [m, 2 * cols] (silu_quant). */
async function nvfp4Op<T extends TensorLike>(
  op: "nvfp4_experts_quant" | "nvfp4_silu_quant",
  x: T,
  expertOffsets: TensorLike,
  globalScale: TensorLike,
  opts: Nvfp4Options<T>,
): Promise<{ packed: Like<T, "u8">; scales: Like<T, "u8"> }> {
  const ctx = opts.context ?? defaultContext(), dev = ctx.device;
  const silu = op === "nvfp4_silu_quant";
  const [m, width] = x?.shape ?? [];
  expectTensor("x", x, "bf16", [m, width], dev);
  const cols = silu ? width / 2 : width;
  expectMultipleOf16(silu ? "x.shape[1] / 2" : "x.shape[1]", cols);
  const experts = globalScale?.shape?.[0] ?? 0;
  expectInt("experts (globalScale.shape[0])", experts);
  expectTensor("globalScale", globalScale, "f32", [experts], dev);
  expectPositiveScales("globalScale", globalScale);
  expectTensor("expertOffsets", expertOffsets, "i32", [experts + 1], dev);
  expectOffsets("expertOffsets", expertOffsets, m);
  const scaleShape = [nvfp4ScaleRows(m, experts), cdiv(cols, 64) * 4];
  const packed = opts.packed ?? ctx.empty("u8", [m, cols / 2]) as Like<T, "u8">;
  const scales = opts.scales ?? ctx.empty("u8", scaleShape) as Like<T, "u8">;
  expectTensor("packed", packed, "u8", [m, cols / 2], dev);
  expectTensor("scales", scales, "u8", scaleShape, dev);
  const problem = ctx.problem(silu ? { op, m, n: cols, experts } : { op, m, k: cols, experts });
  const { backend } = ctx.select(problem, opts.backend);
  await ctx.run(backend, problem, 0n, { x, expertOffsets, globalScale, out: packed, outAux: scales });
  return { packed, scales };
}

/** Expert-grouped NVFP4 quantization of expert-contiguous rows x bf16 [M, K] (bit-exact, see README). */
export function nvfp4ExpertsQuant<T extends TensorLike>(
  x: T,
  expertOffsets: TensorLike,
  globalScale: TensorLike,
  opts: Nvfp4Options<T> = {},
): Promise<{ packed: Like<T, "u8">; scales: Like<T, "u8"> }> {
  return nvfp4Op("nvfp4_experts_quant", x, expertOffsets, globalScale, opts);
}

/**
 * SiLU-and-mul then NVFP4 quantization, as an FP4 MoE runs it between its GEMMs: x is GEMM 1's output
 * bf16 [M, 2N] in expert-contiguous rows (gate columns, then up), h = bf16(silu(gate) * up) in fp32
 * (moeffi.h, nvfp4_silu_quant), and the result is nvfp4ExpertsQuant(h) bit for bit: packed [M, N/2],
 * swizzled scales [M + 127 E, ceil(N/64) * 4].
 */
export function nvfp4SiluQuant<T extends TensorLike>(
  x: T,
  expertOffsets: TensorLike,
  globalScale: TensorLike,
  opts: Nvfp4Options<T> = {},
): Promise<{ packed: Like<T, "u8">; scales: Like<T, "u8"> }> {
  return nvfp4Op("nvfp4_silu_quant", x, expertOffsets, globalScale, opts);
}
