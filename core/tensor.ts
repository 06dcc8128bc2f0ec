// Tensors as moeffi sees them: a dtype, a row-major shape, and where the bytes live. Host tensors
// wrap a typed array; a device tensor (the CUDA issue) implements the same interface with a device
// address instead of data, so validation and the oracle never care which one they hold.
import { runtime } from "../ffi/runtime.ts";
import { ArgumentError } from "./errors.ts";
import { fromBf16, fromE4m3, toBf16, toE4m3 } from "./dtypes.ts";

/** Element types: bf16 bits, fp32, int32, fp8 e4m3fn codes, bytes (packed fp4). */
export type DType = "bf16" | "f32" | "i32" | "fp8_e4m3" | "u8";
/** Where a tensor lives. */
export type Device = "cpu" | `cuda:${number}`;

const ARRAYS = {
  bf16: Uint16Array,
  f32: Float32Array,
  i32: Int32Array,
  fp8_e4m3: Uint8Array,
  u8: Uint8Array,
} as const;
/** Typed array class per dtype. */
export interface Storage {
  /** bf16 bit patterns. */
  bf16: Uint16Array<ArrayBufferLike>;
  /** fp32 values. */
  f32: Float32Array<ArrayBufferLike>;
  /** int32 values. */
  i32: Int32Array<ArrayBufferLike>;
  /** fp8 e4m3fn codes. */
  fp8_e4m3: Uint8Array<ArrayBufferLike>;
  /** Raw bytes: packed fp4 codes, swizzled block scales. */
  u8: Uint8Array<ArrayBufferLike>;
}
/** The typed array that stores a dtype. */
export type ArrayFor<D extends DType> = Storage[D];

/** What the core needs of any tensor, host or device. */
export interface TensorLike {
  /** Element type. */
  readonly dtype: DType;
  /** Row-major dimensions. */
  readonly shape: readonly number[];
  /** Where the bytes are. */
  readonly device: Device;
  /** Address of the first element, for the C structs; 0n when empty. */
  address(): bigint;
}

/** Number of elements of a shape. */
export const numel = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);

/** A tensor in host memory. */
export class Tensor<D extends DType = DType> implements TensorLike {
  /** Host tensors live on the CPU. */
  readonly device = "cpu" as const;
  /** Wraps `data` (no copy); its class must match the dtype and its length the shape. */
  constructor(readonly dtype: D, readonly shape: readonly number[], readonly data: ArrayFor<D>) {
    if (!shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new ArgumentError("shape", shape, "non-negative integer dimensions");
    }
    if (!(data instanceof ARRAYS[dtype])) {
      throw new ArgumentError("data", shape, `a ${ARRAYS[dtype].name} for dtype ${dtype}`);
    }
    if (data.length !== numel(shape)) {
      throw new ArgumentError("data", shape, `${numel(shape)} elements`, `got ${data.length}`);
    }
  }
  address(): bigint {
    return runtime.addressOf(this.data);
  }
  /** Decoded values (bf16 and fp8 widened to fp32). */
  toFloat32(): Float32Array {
    switch (this.dtype) {
      case "bf16":
        return fromBf16(this.data as Uint16Array);
      case "fp8_e4m3":
        return fromE4m3(this.data as Uint8Array);
      default:
        return Float32Array.from(this.data as ArrayLike<number>);
    }
  }
}

/**
 * A host tensor. `data` is either the storage array itself (Uint16Array of bf16 bits, Uint8Array of
 * fp8 codes, ...), used without a copy, or plain numbers, which bf16 and fp8 encode with rounding
 * to nearest even. Zeros when omitted.
 */
export function tensor<D extends DType>(dtype: D, shape: readonly number[], data?: ArrayFor<D> | readonly number[]): Tensor<D> {
  if (!shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw new ArgumentError("shape", shape, "non-negative integer dimensions");
  }
  const Ctor = ARRAYS[dtype];
  if (ArrayBuffer.isView(data) && !(data instanceof Ctor)) {
    throw new ArgumentError(
      "data",
      shape,
      `a ${Ctor.name} (or plain numbers) for dtype ${dtype}`,
      `got a ${data.constructor.name}`,
    );
  }
  const values = data as readonly number[] | undefined;
  const arr = ArrayBuffer.isView(data)
    ? data
    : values === undefined
    ? new Ctor(numel(shape))
    : dtype === "bf16"
    ? toBf16(values)
    : dtype === "fp8_e4m3"
    ? toE4m3(values)
    : new Ctor(values);
  return new Tensor(dtype, [...shape], arr as ArrayFor<D>);
}
