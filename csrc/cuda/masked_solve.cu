// CUDA masked_solve: one thread block ("CtaTeam", 128 or 256 threads) per row, grid-stride over rows, running
// the per-row code of kernels/masked_solve.cuh (the same code the CPU op runs, and the CPU emulation op runs with
// several threads). Shared memory per block: 384 bytes of team scratch plus ms_smem_words(kcap) words: the packed
// fp32 triangle of G[M, M] (kcap (kcap + 1) / 2 words), four fp64 and two fp32 kcap-vectors and the index list.
// Two launches ("tiers"): rows with k <= ms_split(B) pruned weights use kcap = ms_split(B) (B / 2 for B > 96:
// 38 KB for B = 256, 11 KB for B = 128, so several blocks share an SM), rows with more use kcap = B (140 KB for
// B = 256: one block per SM, opt-in shared memory). Each launch counts every row and skips the other tier's rows,
// so no host synchronisation is needed. The grid is the occupancy limit times the SM count (capped at rows). Every
// row is written by exactly one tier, status included (0 = solved, else 1 + the block column of the first
// non-positive pivot, with NaN in that row's E and loss: nothing raises here).
// B is limited by the opt-in shared memory per block: B <= 329 on H100/H200 (227 KB); the glue checks it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/launchers.h"
#include "cuda/tiers.cuh"
#include "kernels/masked_solve.cuh"
#include "kernels/team.cuh"

namespace pyprune {
namespace {

constexpr int MS_SCRATCH_BYTES = 32 * 8 + 32 * 4;

template <class T>
__global__ void masked_solve_kernel(const float* __restrict__ G, const float* __restrict__ U,
                                    const T* __restrict__ W, const uint8_t* __restrict__ mask,
                                    float* __restrict__ E, float* __restrict__ loss,
                                    int32_t* __restrict__ status, int rows, int B, int kmin, int kmax) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* fscr = reinterpret_cast<double*>(smem_raw);
  int* iscr = reinterpret_cast<int*>(smem_raw + 32 * 8);
  float* ws = reinterpret_cast<float*>(smem_raw + MS_SCRATCH_BYTES);
  CtaTeam t{fscr, iscr};
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    const size_t off = (size_t)row * B;
    masked_solve_row(t, G, U, W + off, mask + off, B, kmin, kmax, ws, E + off, loss + row, status + row);
  }
}

size_t ms_bytes(int kcap) { return MS_SCRATCH_BYTES + 4 * ms_smem_words(kcap); }

template <class T>
cudaError_t launch(const float* G, const float* U, const T* W, const uint8_t* mask, float* E, float* loss,
                   int32_t* status, int rows, int B, cudaStream_t stream) {
  return launch_tiers(
      masked_solve_kernel<T>, rows, B, [](int kmax) { return ms_bytes(kmax); },
      [&](int grid, int threads, size_t bytes, int kmin, int kmax) {
        masked_solve_kernel<T><<<grid, threads, bytes, stream>>>(G, U, W, mask, E, loss, status, rows, B, kmin,
                                                                 kmax);
      });
}

}  // namespace
}  // namespace pyprune

extern "C" int pyprune_masked_solve_cuda_max_b(int device) {
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return 0;
  int b = 1;
  while (pyprune::ms_bytes(b + 1) <= (size_t)optin) ++b;
  return b;
}

extern "C" cudaError_t pyprune_masked_solve_cuda(const float* G, const float* U, const void* W, int wdtype,
                                                 const uint8_t* mask, float* E, float* loss, int32_t* status,
                                                 int rows, int B, cudaStream_t stream) {
  using namespace pyprune;
  if (rows <= 0 || B <= 0) return cudaSuccess;
  switch (wdtype) {
    case 0: return launch(G, U, static_cast<const float*>(W), mask, E, loss, status, rows, B, stream);
    case 1: return launch(G, U, static_cast<const __half*>(W), mask, E, loss, status, rows, B, stream);
    case 2: return launch(G, U, static_cast<const __nv_bfloat16*>(W), mask, E, loss, status, rows, B, stream);
    default: return cudaErrorInvalidValue;
  }
}
