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
