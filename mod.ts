/**
 * moeffi: Mixture-of-Experts FP8 / NVFP4 kernels for Deno and Bun.
 *
 * ```ts
 * import { MoeLayer, tensor } from "./mod.ts";
 * using layer = new MoeLayer({ hidden: 1024, intermediate: 512, experts: 8, topk: 2,
 *   weightScale: "per-channel", actScale: "dynamic-token" }).load(weights);
 * const out = await layer.forward(x, topkIds, topkWeights); // bf16 [M, hidden]
 * console.log(layer.backendName, layer.verdicts);
 * ```
 * @module
 */
export {
  Fp8Linear,
  type LinearConfig,
  type MoeConfig,
  MoeLayer,
  type MoeWeights,
  nvfp4ExpertsQuant,
  type Nvfp4Options,
  nvfp4ScaleRows,
  nvfp4SiluQuant,
  type PreparedLayer,
  topkSoftmax,
} from "./core/ops.ts";
export { Context, type ContextOptions, defaultContext, type ProblemSpec } from "./core/context.ts";
export { explain, formatVerdicts, type SelectOptions, type Verdict } from "./core/oracle.ts";
export { type ArrayFor, type Device, type DType, type Storage, Tensor, tensor, type TensorLike } from "./core/tensor.ts";
export { CudaDevice, DeviceTensor } from "./cuda/device.ts";
export type { Like } from "./core/ops.ts";
export { ArgumentError, type ErrorCode, MoeffiError } from "./core/errors.ts";
export * from "./core/dtypes.ts";
export {
  CheckpointError,
  f16ToF32,
  fromF16,
  openSafetensors,
  READABLE_DTYPES,
  SafetensorsCheckpoint,
  SafetensorsFile,
  type TensorInfo,
  type TensorSource,
} from "./core/safetensors.ts";
export {
  CHECKPOINT_FORMATS,
  type CheckpointFormat,
  loadMoeCheckpoint,
  type MoeCheckpoint,
  type MoeCheckpointConfig,
  type MoeCheckpointWeights,
  openMoeCheckpoint,
} from "./core/checkpoints.ts";
export {
  ABI_VERSION,
  ACT_SCALES,
  type ActScale,
  type DeviceKind,
  DEVICES,
  type Manifest,
  type Op,
  OPS,
  type Problem,
  type TensorAddresses,
  WEIGHT_SCALES,
  type WeightAddresses,
  type WeightScale,
} from "./ffi/abi.ts";
export { type Backend, BUILTIN_NAMES, type Registry, type Skipped } from "./ffi/plugins.ts";
