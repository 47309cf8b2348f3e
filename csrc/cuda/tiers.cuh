// The two-tier launch shared by the per-row CUDA kernels (masked_solve, refine_solve): rows are split by their count
// k of pruned weights into k <= ms_split(B) (a small shared-memory workspace, several blocks per SM) and the rest
// (workspace for k = B). Each launch sees every row and skips the other tier's, so no host synchronisation is
// needed. Block size: 128 threads for workspaces of at most 64 pruned weights, else 256; grid: the occupancy limit
// times the SM count, capped at the rows.
#pragma once

#include <cuda_runtime.h>

#include "kernels/masked_solve.cuh"

namespace pyprune {

// bytes_of(kmax): dynamic shared memory for a tier; go(grid, threads, bytes, kmin, kmax): the launch itself.
template <class Kernel, class Bytes, class Go>
cudaError_t launch_tiers(Kernel kernel, int rows, int B, Bytes bytes_of, Go go) {
  int dev = 0, nsm = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&nsm, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) != cudaSuccess)
    return err;
  const int split = ms_split(B);
  const int tiers[2][2] = {{0, split}, {split + 1, B}};
  for (int tier = 0; tier < (split < B ? 2 : 1); ++tier) {
    const int kmin = tiers[tier][0], kmax = tiers[tier][1];
    const size_t bytes = bytes_of(kmax);
    if (bytes > (size_t)optin) return cudaErrorInvalidValue;
    const int threads = kmax <= 64 ? 128 : 256;
    if ((err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes)) != cudaSuccess)
      return err;
    int per_sm = 0;
    if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, bytes)) != cudaSuccess)
      return err;
    const long long want = (long long)(per_sm > 0 ? per_sm : 1) * nsm;
    go((int)(want < rows ? want : rows), threads, bytes, kmin, kmax);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace pyprune
