// Tensors as moeffi sees them: a dtype, a row-major shape, and where the bytes live. Host tensors
// wrap a typed array; a device tensor (the CUDA issue) implements the same interface with a device
// address instead of data, so validation and the oracle never care which one they hold.
import { runtime } from "../ffi/runtime.ts";
import { ArgumentError } from "./errors.ts";
import { fromBf16, fromE4m3 } from "./dtypes.ts";

export type DType = "bf16" | "f32" | "i32" | "fp8_e4m3" | "u8";
export type Device = "cpu" | `cuda:${number}`;

const ARRAYS = {
  bf16: Uint16Array,
  f32: Float32Array,
  i32: Int32Array,
  fp8_e4m3: Uint8Array,
  u8: Uint8Array,
} as const;
export type ArrayFor<D extends DType> = InstanceType<typeof ARRAYS[D]>;

/** What the core needs of any tensor, host or device. */
export interface TensorLike {
  readonly dtype: DType;
  readonly shape: readonly number[];
  readonly device: Device;
  /** Address of the first element, for the C structs; 0n when empty. */
  address(): bigint;
}

export const numel = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);

/** A tensor in host memory. */
export class Tensor<D extends DType = DType> implements TensorLike {
  readonly device = "cpu" as const;
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
      case "bf16": return fromBf16(this.data as Uint16Array);
      case "fp8_e4m3": return fromE4m3(this.data as Uint8Array);
      default: return Float32Array.from(this.data as ArrayLike<number>);
    }
  }
}

/** A host tensor; `data` defaults to zeros. */
export function tensor<D extends DType>(dtype: D, shape: readonly number[], data?: ArrayFor<D> | ArrayLike<number>): Tensor<D> {
  const Ctor = ARRAYS[dtype];
  const arr = data instanceof Ctor ? data : data ? new Ctor(data as ArrayLike<number>) : new Ctor(numel(shape));
  return new Tensor(dtype, [...shape], arr as ArrayFor<D>);
}
