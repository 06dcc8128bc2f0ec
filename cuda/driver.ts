// The CUDA driver API (libcuda.so.1, installed with the NVIDIA driver), bound through the FFI adapter.
// Why the driver and not a shim library: it is on every machine that has a GPU, needs no build step
// and no toolkit at run time, and its primary context is the one the CUDA runtime inside each backend
// library uses, so device pointers and streams pass freely between the core and every backend.
import { runtime } from "../ffi/runtime.ts";

const SYMBOLS = {
  cuInit: { parameters: ["u32"], result: "i32" },
  cuDeviceGetCount: { parameters: ["buffer"], result: "i32" },
  cuDeviceGet: { parameters: ["buffer", "i32"], result: "i32" },
  cuDeviceGetName: { parameters: ["buffer", "i32", "i32"], result: "i32" },
  cuDeviceGetAttribute: { parameters: ["buffer", "i32", "i32"], result: "i32" },
  cuDevicePrimaryCtxRetain: { parameters: ["buffer", "i32"], result: "i32" },
  cuCtxSetCurrent: { parameters: ["u64"], result: "i32" },
  cuMemAlloc_v2: { parameters: ["buffer", "u64"], result: "i32" },
  cuMemFree_v2: { parameters: ["u64"], result: "i32" },
  cuMemHostAlloc: { parameters: ["buffer", "u64", "u32"], result: "i32" },
  cuMemFreeHost: { parameters: ["u64"], result: "i32" },
  cuMemcpyHtoDAsync_v2: { parameters: ["u64", "buffer", "u64", "u64"], result: "i32" },
  cuMemcpyDtoHAsync_v2: { parameters: ["buffer", "u64", "u64", "u64"], result: "i32" },
  cuMemsetD8Async: { parameters: ["u64", "u32", "u64", "u64"], result: "i32" },
  cuMemcpyDtoDAsync_v2: { parameters: ["u64", "u64", "u64", "u64"], result: "i32" },
  cuStreamCreate: { parameters: ["buffer", "u32"], result: "i32" },
  cuStreamQuery: { parameters: ["u64"], result: "i32" },
  cuEventCreate: { parameters: ["buffer", "u32"], result: "i32" },
  cuEventRecord: { parameters: ["u64", "u64"], result: "i32" },
  cuEventSynchronize: { parameters: ["u64"], result: "i32" },
  cuEventElapsedTime: { parameters: ["buffer", "u64", "u64"], result: "i32" },
  cuEventDestroy_v2: { parameters: ["u64"], result: "i32" },
  cuGetErrorString: { parameters: ["i32", "buffer"], result: "i32" },
  cuStreamBeginCapture_v2: { parameters: ["u64", "u32"], result: "i32" },
  cuStreamEndCapture: { parameters: ["u64", "buffer"], result: "i32" },
  cuGraphInstantiateWithFlags: { parameters: ["buffer", "u64", "u64"], result: "i32" },
  cuGraphLaunch: { parameters: ["u64", "u64"], result: "i32" },
  cuGraphExecDestroy: { parameters: ["u64"], result: "i32" },
  cuGraphDestroy: { parameters: ["u64"], result: "i32" },
} as const;

export const CUDA_ERROR_NOT_READY = 600;
export const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75;
export const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76;
export const CU_MEMHOSTALLOC_DEVICEMAP = 2;
export const CU_STREAM_NON_BLOCKING = 1;
export const CU_STREAM_CAPTURE_MODE_RELAXED = 2;

const open = () => runtime.open("libcuda.so.1", SYMBOLS);
export type Driver = ReturnType<typeof open>["symbols"];

let loaded: { driver: Driver; count: number } | { error: string } | undefined;
/** The initialized driver and its device count; or why there is none (no library, no device). */
export function cudaDriver(): { driver: Driver; count: number } | { error: string } {
  if (loaded) return loaded;
  try {
    const driver = open().symbols;
    const count = new Int32Array(1);
    const status = (driver.cuInit(0) as number) || (driver.cuDeviceGetCount(count) as number);
    loaded = status !== 0
      ? { error: `cuInit failed: ${errorString(driver, status)}` }
      : count[0] === 0
      ? { error: "no CUDA device" }
      : { driver, count: count[0] };
  } catch (e) {
    loaded = { error: `no CUDA driver (libcuda.so.1): ${(e as Error).message.split("\n")[0]}` };
  }
  return loaded;
}

export function errorString(driver: Driver, status: number): string {
  const out = new BigUint64Array(1);
  if ((driver.cuGetErrorString(status, out) as number) !== 0 || out[0] === 0n) return `CUDA error ${status}`;
  return `${runtime.cString(out[0])} (${status})`;
}
