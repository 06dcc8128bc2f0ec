// check.cuh: CUDA runtime failures as moeffi statuses. Both macros need `msg` and `cap` (the
// caller's message buffer) in scope and return MOEFFI_DEVICE from the enclosing function.
#pragma once
#include <cuda_runtime.h>

#include "moeffi.h"

#define MOEFFI_CUDA_TRY(call)                                                                   \
  do {                                                                                          \
    const cudaError_t moeffi_err_ = (call);                                                     \
    if (moeffi_err_ != cudaSuccess) {                                                           \
      moeffi_say(msg, cap, "%s failed: %s", #call, cudaGetErrorString(moeffi_err_));            \
      return MOEFFI_DEVICE;                                                                     \
    }                                                                                           \
  } while (0)

// After kernel launches: a bad launch configuration, or a fault of earlier asynchronous work.
#define MOEFFI_CUDA_LAUNCHED(what)                                                              \
  do {                                                                                          \
    const cudaError_t moeffi_err_ = cudaGetLastError();                                         \
    if (moeffi_err_ != cudaSuccess) {                                                           \
      moeffi_say(msg, cap, "%s: %s", (what), cudaGetErrorString(moeffi_err_));                  \
      return MOEFFI_DEVICE;                                                                     \
    }                                                                                           \
  } while (0)

// The device checks every CUDA backend's supported() starts with: tensors on CUDA, a device at that
// index (without a driver the static runtime answers cudaErrorInsufficientDriver or
// cudaErrorNoDevice, reported as "no CUDA device"), and a compute capability major in
// [major_min, major_max] (`need` names it in the reason, e.g. "sm_80+").
inline int32_t moeffi_check_cuda_device(const moeffi_problem *p, const char *backend, int major_min, int major_max,
                                        const char *need, char *msg, uint32_t cap) {
  if (p->device == MOEFFI_DEVICE_CPU) {
    moeffi_say(msg, cap, "%s runs on CUDA; tensors are on the CPU", backend);
    return MOEFFI_UNSUPPORTED;
  }
  if (p->device != MOEFFI_DEVICE_CUDA) {
    moeffi_say(msg, cap, "unknown device %u", p->device);
    return MOEFFI_UNSUPPORTED;
  }
  int count = 0, major = 0, minor = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaSuccess && count == 0) err = cudaErrorNoDevice;
  if (err != cudaSuccess) {
    moeffi_say(msg, cap, "no CUDA device: %s", cudaGetErrorString(err));
    return MOEFFI_UNSUPPORTED;
  }
  if (p->device_index < 0 || p->device_index >= count) {
    moeffi_say(msg, cap, "cuda:%d does not exist (%d CUDA devices)", p->device_index, count);
    return MOEFFI_UNSUPPORTED;
  }
  if ((err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, p->device_index)) != cudaSuccess ||
      (err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, p->device_index)) != cudaSuccess) {
    moeffi_say(msg, cap, "cannot query cuda:%d: %s", p->device_index, cudaGetErrorString(err));
    return MOEFFI_DEVICE;
  }
  if (major < major_min || major > major_max) {
    moeffi_say(msg, cap, "needs %s, device is sm_%d%d", need, major, minor);
    return MOEFFI_UNSUPPORTED;
  }
  return MOEFFI_OK;
}

// The yes of a CUDA backend's supported(): `priority`, with "<what> on <device name> (sm_XY)" as the
// reason; -1 when the device cannot be queried.
inline int32_t moeffi_cuda_yes(const moeffi_problem *p, int32_t priority, const char *what, char *reason,
                               uint32_t cap) {
  cudaDeviceProp prop;
  const cudaError_t err = cudaGetDeviceProperties(&prop, p->device_index);
  if (err != cudaSuccess) {
    moeffi_say(reason, cap, "cannot query cuda:%d: %s", p->device_index, cudaGetErrorString(err));
    return -1;
  }
  moeffi_say(reason, cap, "%s on %s (sm_%d%d)", what, prop.name, prop.major, prop.minor);
  return priority;
}
