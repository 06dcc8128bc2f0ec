// The TypeScript mirror of backends/moeffi.h: enum values, struct layouts and the plugin symbol
// table. A plugin reports its own struct layout at load time and must match LAYOUT exactly.
import type { SymbolTable } from "./runtime.ts";

/** MOEFFI_ABI_VERSION: a plugin built for another version is skipped. */
export const ABI_VERSION = 1;

/** The ops, in enum moeffi_op order. */
export const OPS = ["fp8_moe", "fp8_scaled_mm", "topk_softmax", "nvfp4_experts_quant", "nvfp4_silu_quant"] as const;
/** One of OPS. */
export type Op = typeof OPS[number];

/** Weight scale schemes, in enum moeffi_weight_scale order. */
export const WEIGHT_SCALES = ["per-tensor", "per-channel", "block-128"] as const;
/** One of WEIGHT_SCALES: per matrix, per output row, or per 128x128 block. */
export type WeightScale = typeof WEIGHT_SCALES[number];

/** Activation scale schemes, in enum moeffi_act_scale order. */
export const ACT_SCALES = ["static-tensor", "dynamic-tensor", "dynamic-token", "dynamic-group-128"] as const;
/** One of ACT_SCALES: given by the caller, or computed per batch, per row, or per row and 128-wide group. */
export type ActScale = typeof ACT_SCALES[number];

/** Where a problem's tensors live, in enum moeffi_device order. */
export const DEVICES = ["cpu", "cuda"] as const;
/** One of DEVICES. */
export type DeviceKind = typeof DEVICES[number];

export const STATUS = ["ok", "unsupported", "invalid", "device", "no_memory", "internal"] as const;

export const FLAG_BATCH_INVARIANT = 1 << 0;
export const FLAG_HAS_BIAS = 1 << 1;
export const FLAG_RENORMALIZE = 1 << 2;

/** Bits a backend sets in tensors.error_flags when it meets invalid device data. */
export const ERROR_FLAGS = {
  1: "a topk id outside [-1, E) (that slot contributed nothing)",
  2: "expert offsets not 0..M non-decreasing",
} as const;

/** Size, then field offsets in declaration order, as MOEFFI_DEFINE_LAYOUT reports them. */
export const LAYOUT = {
  problem: [72, 4, 8, 16, 24, 32, 40, 48, 52, 56, 60, 64],
  weights: [40, 8, 16, 24, 32],
  tensors: [120, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112],
  manifest: [112, 4, 8, 40, 56, 88, 92, 96, 100, 104, 108],
} as const;
export const LAYOUT_IDS = { problem: 0, weights: 1, tensors: 2, manifest: 3 } as const;

/** Every plugin exports exactly these symbols (Bun fails a whole dlopen on one missing symbol). */
export const PLUGIN_SYMBOLS = {
  moeffi_abi_version: { parameters: [], result: "u32" },
  moeffi_layout: { parameters: ["u32", "buffer", "u32"], result: "i32" },
  moeffi_describe: { parameters: ["buffer"], result: "i32" },
  moeffi_supported: { parameters: ["buffer", "buffer", "u32"], result: "i32" },
  moeffi_workspace_size: { parameters: ["buffer", "buffer"], result: "i32" },
  moeffi_prepare: { parameters: ["buffer", "buffer", "buffer", "buffer", "u32"], result: "i32" },
  moeffi_release: { parameters: ["u64"], result: "void" },
  moeffi_run: { parameters: ["buffer", "u64", "buffer", "buffer", "u32"], result: "i32" },
  // The same C function on a Deno worker thread, for long CPU runs that must not block the event loop.
  moeffi_run_async: {
    name: "moeffi_run",
    parameters: ["buffer", "u64", "buffer", "buffer", "u32"],
    result: "i32",
    nonblocking: true,
  },
} as const satisfies SymbolTable;

/** One call's shape (struct moeffi_problem). */
export interface Problem {
  /** The op to run. */
  op: Op;
  /** M: tokens or rows. */
  m: number;
  /** N: expert intermediate (fp8_moe), out features (fp8_scaled_mm), half the input columns (nvfp4_silu_quant). */
  n: number;
  /** K: hidden (fp8_moe), in features (fp8_scaled_mm), columns (nvfp4_experts_quant). */
  k: number;
  /** E: number of experts. */
  experts: number;
  /** Experts per token. */
  topk: number;
  /** How the weights are scaled. */
  weightScale: WeightScale;
  /** How the activations are scaled. */
  actScale: ActScale;
  /** Where the tensors live. */
  device: DeviceKind;
  /** CUDA ordinal, -1 for the CPU. */
  deviceIndex: number;
  /** FLAG_* bits. */
  flags: number;
}

export function encodeProblem(p: Problem): Uint8Array {
  const buf = new Uint8Array(LAYOUT.problem[0]);
  const v = new DataView(buf.buffer);
  v.setUint32(0, buf.length, true);
  v.setUint32(4, OPS.indexOf(p.op), true);
  v.setBigInt64(8, BigInt(p.m), true);
  v.setBigInt64(16, BigInt(p.n), true);
  v.setBigInt64(24, BigInt(p.k), true);
  v.setBigInt64(32, BigInt(p.experts), true);
  v.setBigInt64(40, BigInt(p.topk), true);
  v.setUint32(48, WEIGHT_SCALES.indexOf(p.weightScale), true);
  v.setUint32(52, ACT_SCALES.indexOf(p.actScale), true);
  v.setUint32(56, DEVICES.indexOf(p.device), true);
  v.setInt32(60, p.deviceIndex, true);
  v.setUint32(64, p.flags, true);
  return buf;
}

/** Slots of struct moeffi_weights, as addresses (0n = NULL): canonical weights for prepare(). */
export interface WeightAddresses {
  /** fp8_moe: fp8 [E, 2N, K], gate rows then up rows; fp8_scaled_mm: fp8 W [N, K]. */
  w13: bigint;
  /** f32 scales of w13, shaped as weightScale says. */
  w13Scale: bigint;
  /** fp8_moe: fp8 [E, K, N]; unused by fp8_scaled_mm. */
  w2: bigint;
  /** f32 scales of w2, shaped as weightScale says. */
  w2Scale: bigint;
}
/** Slots of struct moeffi_tensors, as addresses on the problem's device (0n = NULL, unused). */
export interface TensorAddresses {
  /** The input: bf16 [M, K], bf16 [M, 2N] (nvfp4_silu_quant) or f32 logits [M, E] (topk_softmax). */
  x: bigint;
  /** i32 [M, topk] expert ids, -1 = empty slot (fp8_moe). */
  topkIds: bigint;
  /** f32 [M, topk] routing weights (fp8_moe). */
  topkWeights: bigint;
  /** f32 [1], static activation scale of x. */
  a1Scale: bigint;
  /** f32 [1], static activation scale of the intermediate (fp8_moe). */
  a2Scale: bigint;
  /** bf16 [N] (fp8_scaled_mm with FLAG_HAS_BIAS). */
  bias: bigint;
  /** i32 [E + 1] row starts of each expert (nvfp4 ops). */
  expertOffsets: bigint;
  /** f32 [E] per-expert global scales (nvfp4 ops). */
  globalScale: bigint;
  /** The output: bf16, packed fp4 bytes, or i32 topk ids, per op. */
  out: bigint;
  /** Second output: swizzled fp4 block scales (nvfp4 ops) or f32 topk weights (topk_softmax). */
  outAux: bigint;
  /** Caller-owned scratch of workspaceBytes bytes on the device. */
  workspace: bigint;
  /** Size of workspace in bytes. */
  workspaceBytes: bigint;
  /** cudaStream_t for CUDA backends (0n = default stream); ignored on the CPU. */
  stream: bigint;
  /** Host-visible u32 that kernels OR ERROR_FLAGS bits into (0n = do not report). */
  errorFlags: bigint;
}
const WEIGHT_SLOTS = ["w13", "w13Scale", "w2", "w2Scale"] as const;
const TENSOR_SLOTS = [
  "x",
  "topkIds",
  "topkWeights",
  "a1Scale",
  "a2Scale",
  "bias",
  "expertOffsets",
  "globalScale",
  "out",
  "outAux",
  "workspace",
  "workspaceBytes",
  "stream",
  "errorFlags",
] as const;

function encodeSlots<K extends string>(layout: readonly number[], slots: readonly K[], a: Partial<Record<K, bigint>>) {
  const buf = new Uint8Array(layout[0]);
  const v = new DataView(buf.buffer);
  v.setUint32(0, buf.length, true);
  slots.forEach((slot, i) => v.setBigUint64(layout[i + 1], a[slot] ?? 0n, true));
  return buf;
}
export const encodeWeights = (a: Partial<WeightAddresses>) => encodeSlots(LAYOUT.weights, WEIGHT_SLOTS, a);
export const encodeTensors = (a: Partial<TensorAddresses>) => encodeSlots(LAYOUT.tensors, TENSOR_SLOTS, a);

/** What a backend is and claims (struct moeffi_manifest). */
export interface Manifest {
  /** ABI version the backend was built for. */
  abiVersion: number;
  /** Unique name, 1-31 of [a-z0-9_-]; built-in names are reserved. */
  name: string;
  /** The backend's own version string. */
  version: string;
  /** Architectures it targets, e.g. "cpu", "sm_90a" (informational; supported() decides). */
  archs: string;
  /** Where its tensors live. */
  device: DeviceKind;
  /** Ops it implements. */
  ops: Op[];
  /** Weight scale schemes it supports. */
  weightScales: WeightScale[];
  /** Activation scale schemes it supports. */
  actScales: ActScale[];
  /** Ops whose rows are bit-identical whatever the batch. */
  batchInvariantOps: Op[];
  /** Default priority; supported() may return another for a given problem. */
  priority: number;
}

const cString = (bytes: Uint8Array) => {
  const end = bytes.indexOf(0);
  return new TextDecoder().decode(end < 0 ? bytes : bytes.subarray(0, end));
};
const bits = <T>(mask: number, names: readonly T[]) => names.filter((_, i) => (mask >>> i) & 1);

export function decodeManifest(buf: Uint8Array): Manifest {
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const device = DEVICES[v.getUint32(88, true)];
  if (device === undefined) throw new Error(`unknown device kind ${v.getUint32(88, true)}`);
  return {
    abiVersion: v.getUint32(4, true),
    name: cString(buf.subarray(8, 40)),
    version: cString(buf.subarray(40, 56)),
    archs: cString(buf.subarray(56, 88)),
    device,
    ops: bits(v.getUint32(92, true), OPS),
    weightScales: bits(v.getUint32(96, true), WEIGHT_SCALES),
    actScales: bits(v.getUint32(100, true), ACT_SCALES),
    batchInvariantOps: bits(v.getUint32(104, true), OPS),
    priority: v.getInt32(108, true),
  };
}

export { cString };
