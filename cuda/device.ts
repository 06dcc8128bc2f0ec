// CUDA devices and device tensors for the core: memory, one stream per device, uploads, downloads,
// and synchronization that never blocks the event loop (the stream is polled, in Deno and Bun alike).
import { MoeffiError } from "../core/errors.ts";
import { type DType, numel, type Tensor, tensor, type TensorLike } from "../core/tensor.ts";
import { ERROR_FLAGS } from "../ffi/abi.ts";
import { runtime } from "../ffi/runtime.ts";
import {
  CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
  CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
  CU_MEMHOSTALLOC_DEVICEMAP,
  CU_STREAM_CAPTURE_MODE_RELAXED,
  CU_STREAM_NON_BLOCKING,
  CUDA_ERROR_NOT_READY,
  cudaDriver,
  type Driver,
  errorString,
} from "./driver.ts";

export const BYTES: Record<DType, number> = { bf16: 2, f32: 4, i32: 4, fp8_e4m3: 1, u8: 1 };

const freeDevice = new FinalizationRegistry<{ device: CudaDevice; address: bigint }>(({ device, address }) =>
  device.free(address)
);

/** A tensor in the memory of one CUDA device. */
export class DeviceTensor<D extends DType = DType> implements TensorLike, Disposable {
  readonly device: `cuda:${number}`;
  #address: bigint;

  /** Wraps device memory at `address`, which it then owns: freed on dispose, or when collected. */
  constructor(
    readonly dtype: D,
    readonly shape: readonly number[],
    /** The device whose memory holds the tensor. */
    readonly cuda: CudaDevice,
    address: bigint,
  ) {
    this.device = `cuda:${cuda.ordinal}`;
    this.#address = address;
    freeDevice.register(this, { device: cuda, address }, this);
  }
  /** Size in bytes: elements times the dtype's width. */
  get bytes(): number {
    return numel(this.shape) * BYTES[this.dtype];
  }
  address(): bigint {
    if (this.#address === 0n && this.bytes > 0) throw new MoeffiError("disposed", "device tensor used after dispose()");
    return this.#address;
  }
  /** Waits for the device's stream and copies the tensor into host memory. */
  download(): Promise<Tensor<D>> {
    return this.cuda.download(this);
  }
  /** Frees the device memory now rather than when collected (idempotent). */
  [Symbol.dispose](): void {
    if (this.#address === 0n) return;
    freeDevice.unregister(this);
    this.cuda.free(this.#address);
    this.#address = 0n;
  }
}

const devices = new Map<number, CudaDevice>();

/** One CUDA device: its primary context, a stream every op of the core runs on, an error word. */
export class CudaDevice {
  /** The device's name, as cuDeviceGetName reports it. */
  readonly name: string;
  /** Compute capability [major, minor], e.g. [9, 0]. */
  readonly capability: [number, number];
  /** The non-blocking CUstream every op of the core runs on. */
  readonly stream: bigint;
  /** Host-mapped word the kernels OR error bits into (see MOEFFI_ERROR_* in moeffi.h). */
  readonly errorFlags: bigint;
  readonly #driver: Driver;
  readonly #flags: Uint32Array;

  /** The device of a CUDA ordinal, opened on first use and shared after. */
  static get(ordinal: number): CudaDevice {
    let d = devices.get(ordinal);
    if (!d) devices.set(ordinal, d = new CudaDevice(ordinal));
    return d;
  }

  private constructor(readonly ordinal: number) {
    const found = cudaDriver();
    if ("error" in found) throw new MoeffiError("device_error", `cuda:${ordinal}: ${found.error}`);
    if (ordinal >= found.count) throw new MoeffiError("device_error", `cuda:${ordinal}: only ${found.count} CUDA device(s)`);
    this.#driver = found.driver;
    const d = this.#driver, out = new BigUint64Array(1), i32 = new Int32Array(1);
    this.check(d.cuDeviceGet(i32, ordinal), "cuDeviceGet");
    const dev = i32[0];
    const name = new Uint8Array(256);
    this.check(d.cuDeviceGetName(name, name.length, dev), "cuDeviceGetName");
    this.name = new TextDecoder().decode(name.subarray(0, name.indexOf(0)));
    const attr = (a: number) => (this.check(d.cuDeviceGetAttribute(i32, a, dev), "cuDeviceGetAttribute"), i32[0]);
    this.capability = [attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR), attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)];
    // The primary context is the one the CUDA runtime in every backend library binds to.
    this.check(d.cuDevicePrimaryCtxRetain(out, dev), "cuDevicePrimaryCtxRetain");
    this.check(d.cuCtxSetCurrent(out[0]), "cuCtxSetCurrent");
    this.check(d.cuStreamCreate(out, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
    this.stream = out[0];
    this.check(d.cuMemHostAlloc(out, 4n, CU_MEMHOSTALLOC_DEVICEMAP), "cuMemHostAlloc");
    this.errorFlags = out[0]; // unified addressing: the host address is valid on the device too
    this.#flags = new Uint32Array(runtime.memory(this.errorFlags, 4));
    this.#flags[0] = 0;
  }

  /** Throws a "device_error" MoeffiError naming `what` unless a driver call returned CUDA_SUCCESS (0). */
  check(status: number, what: string): void {
    if (status !== 0) {
      throw new MoeffiError("device_error", `cuda:${this.ordinal}: ${what} failed: ${errorString(this.#driver, status)}`);
    }
  }

  /** Allocates device memory (cuMemAlloc); 0n for 0 bytes. Release it with free(). */
  alloc(bytes: number): bigint {
    if (bytes === 0) return 0n;
    const out = new BigUint64Array(1);
    this.check(this.#driver.cuMemAlloc_v2(out, BigInt(bytes)), `cuMemAlloc(${bytes} bytes)`);
    return out[0];
  }

  /** Frees memory from alloc(); 0n is a no-op. */
  free(address: bigint): void {
    if (address !== 0n) this.#driver.cuMemFree_v2(address);
  }

  /** A new device tensor, uninitialized. */
  empty<D extends DType>(dtype: D, shape: readonly number[]): DeviceTensor<D> {
    return new DeviceTensor(dtype, [...shape], this, this.alloc(numel(shape) * BYTES[dtype]));
  }

  /** Copies a host tensor to the device (ordered on the stream). */
  upload<D extends DType>(t: Tensor<D>): DeviceTensor<D> {
    const dt = this.empty(t.dtype, t.shape);
    this.write(dt, t);
    return dt;
  }

  /** Overwrites a device tensor with a host tensor of the same size (ordered on the stream). */
  write<D extends DType>(dst: DeviceTensor<D>, src: Tensor<D>): void {
    if (src.data.byteLength !== dst.bytes) {
      throw new MoeffiError("invalid_argument", `write: ${src.data.byteLength} bytes into a ${dst.bytes}-byte tensor`);
    }
    if (dst.bytes === 0) return;
    const bytes = new Uint8Array(src.data.buffer, src.data.byteOffset, src.data.byteLength);
    this.check(this.#driver.cuMemcpyHtoDAsync_v2(dst.address(), bytes, BigInt(dst.bytes), this.stream), "cuMemcpyHtoDAsync");
    // pageable source: the driver has staged the bytes before returning, so `src` may go away
  }

  /** Sets every byte of a device tensor (ordered on the stream). */
  fill(t: DeviceTensor, byte: number): void {
    if (t.bytes > 0) this.check(this.#driver.cuMemsetD8Async(t.address(), byte, BigInt(t.bytes), this.stream), "cuMemsetD8Async");
  }

  /** Copies src into dst, device to device, the first min(dst, src) bytes (ordered on the stream). */
  copy(dst: DeviceTensor, src: DeviceTensor): void {
    const bytes = Math.min(dst.bytes, src.bytes);
    if (bytes > 0) {
      this.check(
        this.#driver.cuMemcpyDtoDAsync_v2(dst.address(), src.address(), BigInt(bytes), this.stream),
        "cuMemcpyDtoDAsync",
      );
    }
  }

  /** Waits for the stream, then copies a device tensor into a new host tensor. */
  async download<D extends DType>(t: DeviceTensor<D>): Promise<Tensor<D>> {
    await this.synchronize();
    const host = tensor(t.dtype, t.shape);
    if (t.bytes > 0) {
      const dst = new Uint8Array(host.data.buffer, host.data.byteOffset, host.data.byteLength);
      this.check(this.#driver.cuMemcpyDtoHAsync_v2(dst, t.address(), BigInt(t.bytes), this.stream), "cuMemcpyDtoHAsync");
      await this.synchronize();
    }
    return host;
  }

  /**
   * Waits until the stream is idle without blocking the event loop: a short spin on cuStreamQuery,
   * then polls on timers. Then reports (and clears) errors the kernels found in device data.
   */
  async synchronize(): Promise<void> {
    const query = () => this.#driver.cuStreamQuery(this.stream) as number;
    let status = query();
    for (let spin = 0; status === CUDA_ERROR_NOT_READY && spin < 2000; spin++) status = query();
    for (let wait = 0; status === CUDA_ERROR_NOT_READY; wait = Math.min(wait + 1, 4)) {
      await new Promise((resolve) => setTimeout(resolve, wait));
      status = query();
    }
    this.check(status, "cuStreamQuery");
    const flags = this.#flags[0];
    if (flags !== 0) {
      this.#flags[0] = 0;
      const what = Object.entries(ERROR_FLAGS).filter(([bit]) => flags & Number(bit)).map(([, text]) => text);
      throw new MoeffiError("device_error", `cuda:${this.ordinal}: a kernel found invalid device data: ${what.join("; ")}`);
    }
  }

  /**
   * Captures the device work `fn` enqueues on the stream into a CUDA graph (proof that it needs no
   * host synchronization) and returns a replayable launcher.
   */
  async capture(fn: () => Promise<unknown>): Promise<{ launch(): void } & Disposable> {
    const d = this.#driver, out = new BigUint64Array(1);
    this.check(d.cuStreamBeginCapture_v2(this.stream, CU_STREAM_CAPTURE_MODE_RELAXED), "cuStreamBeginCapture");
    try {
      await fn();
    } finally {
      this.check(d.cuStreamEndCapture(this.stream, out), "cuStreamEndCapture");
    }
    const graph = out[0];
    this.check(d.cuGraphInstantiateWithFlags(out, graph, 0n), "cuGraphInstantiate");
    const exec = out[0];
    return {
      launch: () => this.check(d.cuGraphLaunch(exec, this.stream), "cuGraphLaunch"),
      [Symbol.dispose]: () => void (d.cuGraphExecDestroy(exec), d.cuGraphDestroy(graph)),
    };
  }

  /** Device time of `fn`'s enqueued work in milliseconds, with CUDA events on the stream. */
  async time(fn: () => void | Promise<void>): Promise<number> {
    const d = this.#driver, ev = new BigUint64Array(2), ms = new Float32Array(1);
    this.check(d.cuEventCreate(ev.subarray(0, 1), 0), "cuEventCreate");
    this.check(d.cuEventCreate(ev.subarray(1, 2), 0), "cuEventCreate");
    try {
      this.check(d.cuEventRecord(ev[0], this.stream), "cuEventRecord");
      await fn();
      this.check(d.cuEventRecord(ev[1], this.stream), "cuEventRecord");
      await this.synchronize();
      this.check(d.cuEventElapsedTime(ms, ev[0], ev[1]), "cuEventElapsedTime");
      return ms[0];
    } finally {
      d.cuEventDestroy_v2(ev[0]);
      d.cuEventDestroy_v2(ev[1]);
    }
  }
}
