// pdl.cuh: programmatic dependent launch (sm_90+). A kernel launched with launch_pdl may start while
// its predecessor on the stream is still running, so its prologue (barrier setup, weight loads) hides
// the kernel boundary. Rules that keep it safe: every kernel so launched calls pdl_wait() before it
// touches memory its predecessor writes or reads, and pdl_trigger() only after pdl_wait(); then a
// kernel's pre-wait code may read what kernels two or more launches back wrote (they completed before
// the predecessor passed its own wait). On other targets both calls compile to nothing.
#pragma once
#include <cuda_runtime.h>

#include <utility>

namespace moeffi {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, s>>>(args...) in clusters of `cluster` CTAs along x (grid.x a multiple of
// it; 1: no clusters) that may overlap the end of the previous kernel on s (when pdl is false: an
// ordinary launch).
template <class... Params, class... Args>
cudaError_t launch_pdl_clusters(bool pdl, unsigned cluster, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                cudaStream_t s, Args &&...args) {
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster, attr[n].val.clusterDim.y = 1, attr[n++].val.clusterDim.z = 1;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid, cfg.blockDim = block, cfg.dynamicSmemBytes = smem, cfg.stream = s;
  cfg.attrs = attr, cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// The same without clusters.
template <class... Params, class... Args>
cudaError_t launch_pdl(bool pdl, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                       Args &&...args) {
  return launch_pdl_clusters(pdl, 1, kernel, grid, block, smem, s, std::forward<Args>(args)...);
}

} // namespace moeffi
