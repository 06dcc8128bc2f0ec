// cluster_probe.cu: how many thread-block clusters of the wide kernel's shape (384 threads, 216 KB of
// dynamic shared memory, one CTA per SM) are resident at once, for cluster sizes 1, 2, 4 and 8, and
// whether a grid of one CTA per SM starts in one wave (each CTA stamps its start time and spins 2 ms).
// A dev tool for backends/hopper_fp8/NOTES.md (2-CTA TMA multicast needs every SM in a pair):
//   nvcc -O2 -std=c++17 -gencode arch=compute_90a,code=sm_90a bench/dev/cluster_probe.cu -o build/cluster_probe
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(call)                                                                                        \
  do {                                                                                                     \
    cudaError_t e_ = (call);                                                                               \
    if (e_ != cudaSuccess) {                                                                               \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));               \
      exit(1);                                                                                             \
    }                                                                                                      \
  } while (0)

__global__ void __launch_bounds__(384, 1) stamp(unsigned long long *start) {
  extern __shared__ char smem[];
  unsigned long long t0, t1;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  if (threadIdx.x != 0) return;
  start[blockIdx.x] = t0;
  do asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
  while (t1 - t0 < 2000000); // 2 ms: long enough that a CTA of a second wave starts visibly late
  smem[0] = 1;
}

int main() {
  const int smem = 216 * 1024;
  CHECK(cudaFuncSetAttribute(stamp, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  CHECK(cudaFuncSetAttribute(stamp, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  unsigned long long *start = nullptr, host[1024];
  CHECK(cudaMalloc(&start, sizeof(host)));
  for (int size : {1, 2, 4, 8}) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = size, attr[0].val.clusterDim.y = 1, attr[0].val.clusterDim.z = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(sms / size * size), cfg.blockDim = dim3(384), cfg.dynamicSmemBytes = smem;
    cfg.attrs = attr, cfg.numAttrs = 1;
    int clusters = 0;
    CHECK(cudaOccupancyMaxActiveClusters(&clusters, stamp, &cfg));
    CHECK(cudaLaunchKernelEx(&cfg, stamp, start));
    CHECK(cudaDeviceSynchronize());
    const unsigned n = cfg.gridDim.x;
    CHECK(cudaMemcpy(host, start, n * sizeof(host[0]), cudaMemcpyDeviceToHost));
    unsigned long long first = ~0ull;
    for (unsigned i = 0; i < n; i++) first = host[i] < first ? host[i] : first;
    int late = 0;
    for (unsigned i = 0; i < n; i++) late += host[i] - first > 1000000;
    printf("cluster %d: max active clusters %d (= %d SMs of %d), grid %u CTAs: %d started >1 ms late (a second wave)\n", size,
           clusters, clusters * size, sms, n, late);
  }
  CHECK(cudaFree(start));
  return 0;
}
