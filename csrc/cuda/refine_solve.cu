// CUDA refine_solve: one thread block ("CtaTeam", 128 or 256 threads) per row, grid-stride over rows, running the
// per-row code of kernels/refine_solve.cuh (the same code the CPU op runs with one thread, and the CPU emulation op
// with several). Shared memory per block: 384 bytes of team scratch plus rs_smem_words(kcap, B, m) words (Ainv and
// L^-1 of G[M, M], kcap x kcap each; G[M, K] and then U, kcap x B at most; B-vectors). Two launches ("tiers") by
// the count of pruned weights, as masked_solve's: k <= ms_split(B) with kcap = ms_split(B), then the rest with
// kcap = B. Every row is written by exactly one tier; nothing raises here (status as masked_solve's).
// B is limited by the opt-in shared memory per block (B <= 136 on H100/H200): the glue checks it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/launchers.h"
#include "cuda/tiers.cuh"
#include "kernels/refine_solve.cuh"
#include "kernels/team.cuh"

namespace pyprune {
namespace {

constexpr int RS_SCRATCH_BYTES = 32 * 8 + 32 * 4;

template <class T>
__global__ void refine_solve_kernel(const float* __restrict__ G, const float* __restrict__ U,
                                    const T* __restrict__ W, const uint8_t* __restrict__ mask, int rounds, int m,
                                    float tol, float* __restrict__ E, float* __restrict__ loss,
                                    int32_t* __restrict__ status, uint8_t* __restrict__ mout,
                                    int32_t* __restrict__ nswaps, int rows, int B, int kmin, int kmax) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* fscr = reinterpret_cast<double*>(smem_raw);
  int* iscr = reinterpret_cast<int*>(smem_raw + 32 * 8);
  float* ws = reinterpret_cast<float*>(smem_raw + RS_SCRATCH_BYTES);
  CtaTeam t{fscr, iscr};
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    const size_t off = (size_t)row * B;
    refine_solve_row(t, G, U, W + off, mask + off, B, m, rounds, tol, kmin, kmax, ws, E + off, loss + row,
                     status + row, mout + off, nswaps + row);
  }
}

size_t rs_bytes(int kcap, int B, int m) { return RS_SCRATCH_BYTES + 4 * rs_smem_words(kcap, B, m); }

template <class T>
cudaError_t launch(const float* G, const float* U, const T* W, const uint8_t* mask, int rounds, int m, float tol,
                   float* E, float* loss, int32_t* status, uint8_t* mout, int32_t* nswaps, int rows, int B,
                   cudaStream_t stream) {
  return launch_tiers(
      refine_solve_kernel<T>, rows, B, [&](int kmax) { return rs_bytes(kmax, B, m); },
      [&](int grid, int threads, size_t bytes, int kmin, int kmax) {
        refine_solve_kernel<T><<<grid, threads, bytes, stream>>>(G, U, W, mask, rounds, m, tol, E, loss, status,
                                                                 mout, nswaps, rows, B, kmin, kmax);
      });
}

}  // namespace
}  // namespace pyprune

extern "C" int pyprune_refine_solve_cuda_max_b(int device) {
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return 0;
  int b = 1;
  while (pyprune::rs_bytes(b + 1, b + 1, 0) <= (size_t)optin) ++b;
  return b;
}

extern "C" cudaError_t pyprune_refine_solve_cuda(const float* G, const float* U, const void* W, int wdtype,
                                                 const uint8_t* mask, int rounds, int m, float tol, float* E,
                                                 float* loss, int32_t* status, uint8_t* mout, int32_t* nswaps,
                                                 int rows, int B, cudaStream_t stream) {
  using namespace pyprune;
  if (rows <= 0 || B <= 0) return cudaSuccess;
  switch (wdtype) {
    case 0:
      return launch(G, U, static_cast<const float*>(W), mask, rounds, m, tol, E, loss, status, mout, nswaps, rows,
                    B, stream);
    case 1:
      return launch(G, U, static_cast<const __half*>(W), mask, rounds, m, tol, E, loss, status, mout, nswaps, rows,
                    B, stream);
    case 2:
      return launch(G, U, static_cast<const __nv_bfloat16*>(W), mask, rounds, m, tol, E, loss, status, mout, nswaps,
                    rows, B, stream);
    default: return cudaErrorInvalidValue;
  }
}
