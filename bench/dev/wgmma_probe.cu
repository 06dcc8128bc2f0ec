// wgmma_probe.cu: how fast fp8 WGMMA groups run on one SM under the issue patterns the wide
// kernel could use (no TMA: operands sit in shared memory, filled once). Prints tensor FMAs per
// SM clock; the H100's dense FP8 peak is 4096. A dev tool for backends/hopper_fp8/NOTES.md:
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -Icuda bench/dev/wgmma_probe.cu -o build/wgmma_probe
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include "sm90.cuh"

using namespace moeffi::sm90;

constexpr int ITERS = 2048; // 128-wide K blocks per warpgroup

enum Mode {
  DRAIN,          // 4 k32 steps into one tile, wait for them, again (the wide kernel without promotion)
  DRAIN_PROMOTE,  // the same into a partial tile, then acc += partial (the wide kernel)
  DEEP,           // 4 k32 steps per group, never waiting: one long accumulation chain
  TWO_TILES,      // groups alternate between two partial tiles, wait_group 1, promote the older one
  SPLIT_CHAINS,   // one group = 2 k32 steps into partial a and 2 into partial b, wait, acc += a + b
  RING,           // DRAIN_PROMOTE behind a 5-stage full/empty mbarrier ring fed by a producer thread (no TMA)
  RING_SPIN,      // RING with the waits as test_wait spins instead of try_wait
  RING_NOPROMOTE, // RING without the promotion
};

#ifdef MOEFFI_SM90A
__device__ __forceinline__ bool mbar_test(uint64_t *bar, uint32_t parity) {
  uint32_t done;
  asm volatile("{\n .reg .pred p;\n mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
               : "=r"(done)
               : "r"(smem_addr(bar)), "r"(parity)
               : "memory");
  return done;
}
#endif

__device__ __forceinline__ void wgmma_wait1() { asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory"); }

template <int N, int MODE, int WGS> __global__ void __launch_bounds__(128 * (WGS + (MODE >= RING)), 1) probe(long long *cycles) {
#ifdef MOEFFI_SM90A
  extern __shared__ __align__(1024) uint8_t smem[];
  constexpr bool ring = MODE >= RING;
  const int wgs = WGS, wg = threadIdx.x / 128;
  constexpr int STAGES = 5;
  __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];
  if (ring && threadIdx.x == 0) {
    for (int i = 0; i < STAGES; i++) mbar_init(&full[i], 1), mbar_init(&empty[i], WGS * 4);
    mbar_init_fence();
  }
  uint8_t *a = smem, *b = smem + wgs * 64 * 128;
  for (int i = threadIdx.x; i < wgs * 64 * 128 + N * 128; i += blockDim.x) smem[i] = (uint8_t)((i * 37) & 0x77);
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();
  if constexpr (ring && WGS >= 2) { // registers as the wide kernel hands them out
    if (wg == WGS) regs_dec<WGS == 3 ? 24 : 40>();
    else regs_inc<WGS == 3 ? 160 : 232>();
  }
  if (ring && wg == WGS) { // producer
    if (threadIdx.x % 128 == 0)
      for (int it = 0; it < ITERS; it++) {
        const int st = it % STAGES;
        if (it >= STAGES) {
          if (MODE == RING_SPIN) while (!mbar_test(&empty[st], ((it / STAGES) - 1) & 1)) {}
          else mbar_wait(&empty[st], ((it / STAGES) - 1) & 1);
        }
        mbar_arrive(&full[st]);
      }
    return;
  }
  const uint64_t da = desc_k128_sw128(a + (wg % WGS) * 64 * 128), db = desc_k128_sw128(b);
  float acc[N / 2], p[N / 2], q[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; i++) acc[i] = 0.0f, p[i] = 0.0f, q[i] = 0.0f;
  auto group = [&](float (&t)[N / 2]) {
    fence_operands(t);
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < 4; k++) wgmma_m64k32_e4m3<N>(t, da + 2 * k, db + 2 * k, k);
    wgmma_commit();
  };
  auto promote = [&](float (&t)[N / 2]) {
    fence_operands(t);
#pragma unroll
    for (int i = 0; i < N / 2; i++) acc[i] = __fadd_rn(acc[i], t[i]);
  };
  const long long t0 = clock64();
  if constexpr (MODE == TWO_TILES) { // two K blocks per pass so each tile's registers are fixed
    group(q);
    for (int it = 0; it < ITERS; it += 2) {
      group(p);
      wgmma_wait1();
      promote(q);
      group(q);
      wgmma_wait1();
      promote(p);
    }
  } else if constexpr (ring) {
    for (int it = 0; it < ITERS; it++) {
      const int st = it % STAGES;
      if (MODE == RING_SPIN) while (!mbar_test(&full[st], (it / STAGES) & 1)) {}
      else mbar_wait(&full[st], (it / STAGES) & 1);
      group(p);
      wgmma_wait0();
      __syncwarp();
      if (threadIdx.x % 32 == 0) mbar_arrive(&empty[st]);
      if (MODE != RING_NOPROMOTE) promote(p);
      else fence_operands(p);
    }
  } else
  for (int it = 0; it < ITERS; it++) {
    if (MODE == DRAIN || MODE == DEEP) {
      if (MODE == DRAIN) fence_operands(acc);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < 4; k++) wgmma_m64k32_e4m3<N>(acc, da + 2 * k, db + 2 * k, 1);
      wgmma_commit();
      if (MODE == DRAIN) wgmma_wait0(), fence_operands(acc);
    } else if (MODE == DRAIN_PROMOTE) {
      fence_operands(p);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < 4; k++) wgmma_m64k32_e4m3<N>(p, da + 2 * k, db + 2 * k, k);
      wgmma_commit();
      wgmma_wait0();
      fence_operands(p);
#pragma unroll
      for (int i = 0; i < N / 2; i++) acc[i] = __fadd_rn(acc[i], p[i]);
    } else { // SPLIT_CHAINS
      fence_operands(p);
      fence_operands(q);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < 2; k++) {
        wgmma_m64k32_e4m3<N>(p, da + 4 * k, db + 4 * k, k);
        wgmma_m64k32_e4m3<N>(q, da + 4 * k + 2, db + 4 * k + 2, k);
      }
      wgmma_commit();
      wgmma_wait0();
      fence_operands(p);
      fence_operands(q);
#pragma unroll
      for (int i = 0; i < N / 2; i++) acc[i] = __fadd_rn(acc[i], __fadd_rn(p[i], q[i]));
    }
  }
  wgmma_wait0();
  fence_operands(acc);
  const long long t1 = clock64();
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < N / 2; i++) s += acc[i] + p[i] + q[i];
  if (s == 1234.5f) cycles[gridDim.x] = 1; // keeps the sums alive
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
#endif
}

template <int N, int MODE, int wgs> void run(const char *name, int sms, long long *d, long long *h) {
  const int smem = 200 * 1024; // one CTA per SM
  cudaFuncSetAttribute(probe<N, MODE, wgs>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  probe<N, MODE, wgs><<<sms, 128 * (wgs + (MODE >= RING)), smem>>>(d);
  cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) { printf("%s: %s\n", name, cudaGetErrorString(e)); return; }
  cudaMemcpy(h, d, sizeof(long long) * sms, cudaMemcpyDeviceToHost);
  double mean = 0;
  for (int i = 0; i < sms; i++) mean += (double)h[i] / sms;
  const double fma = (double)wgs * ITERS * 4 * 64.0 * N * 32;
  printf("%-14s N=%3d warpgroups=%d  %8.0f cycles/SM  %6.1f clocks per K block per warpgroup  %6.0f FMA/clk/SM (%.0f%% of 4096)\n", name, N,
         wgs, mean, mean / ITERS, fma / mean, 100 * fma / mean / 4096);
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  long long *d, h[1024];
  cudaMalloc(&d, sizeof(long long) * (sms + 1));
  run<192, DRAIN, 1>("drain", sms, d, h);
  run<192, DEEP, 1>("deep", sms, d, h);
  run<192, DRAIN_PROMOTE, 1>("drain+promote", sms, d, h);
  run<128, DRAIN, 1>("drain", sms, d, h);
  run<128, DRAIN_PROMOTE, 1>("drain+promote", sms, d, h);
  run<128, TWO_TILES, 1>("two tiles", sms, d, h);
  run<64, DRAIN_PROMOTE, 1>("drain+promote", sms, d, h);
  run<64, SPLIT_CHAINS, 1>("split chains", sms, d, h);
  run<192, DRAIN, 2>("drain", sms, d, h);
  run<192, DEEP, 2>("deep", sms, d, h);
  run<192, DRAIN_PROMOTE, 2>("drain+promote", sms, d, h);
  run<128, DRAIN, 2>("drain", sms, d, h);
  run<128, DRAIN_PROMOTE, 2>("drain+promote", sms, d, h);
  run<128, TWO_TILES, 2>("two tiles", sms, d, h);
  run<64, DRAIN_PROMOTE, 2>("drain+promote", sms, d, h);
  run<64, SPLIT_CHAINS, 2>("split chains", sms, d, h);
  run<128, DRAIN_PROMOTE, 3>("drain+promote", sms, d, h);
  run<64, DRAIN_PROMOTE, 4>("drain+promote", sms, d, h);
  run<192, RING, 2>("ring", sms, d, h);
  run<192, RING_SPIN, 2>("ring spin", sms, d, h);
  run<192, RING_NOPROMOTE, 2>("ring nopromote", sms, d, h);
  run<128, RING, 3>("ring", sms, d, h);
  run<128, RING_SPIN, 3>("ring spin", sms, d, h);
  run<128, RING_NOPROMOTE, 3>("ring nopromote", sms, d, h);
  return 0;
}
