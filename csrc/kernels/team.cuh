// "Teams": the threads that cooperate on one row. The per-row math in masked_solve.cuh is written once against
// this small interface and runs as
//   - SerialTeam (one CPU thread; the C++ CPU op),
//   - CtaTeam (one CUDA thread block; the CUDA kernel),
//   - ThreadTeam (csrc/cpu/thread_team.h: several std::threads with barriers; a test-only op that runs the CUDA
//     partitioning and synchronisation on the CPU).
// Interface: rank(), size(), lane(), warp(), nwarps(), warp_size(), sync() (team barrier), sum(v) (fp64 all-reduce),
// excl_scan(v, &total) (exclusive prefix sum over ranks), warp_sum(v) (fp64 all-reduce over the warp: only the lanes
// of one warp take part, so it may be called inside loops whose trip count is uniform per warp only), argmin(v, i,
// &imin) (team-wide minimum of v with the smallest i among equal minima; NaN never wins). kSerial: true for a
// one-thread team, whose inner loops the per-row code may write for the CPU's vector units instead.
// Every collective must be reached by all the threads it involves.
#pragma once

#include "kernels/common.cuh"

namespace pyprune {

struct SerialTeam {
  static constexpr bool kSerial = true;
  PP_HD int rank() const { return 0; }
  PP_HD int size() const { return 1; }
  PP_HD int lane() const { return 0; }
  PP_HD int warp() const { return 0; }
  PP_HD int nwarps() const { return 1; }
  PP_HD int warp_size() const { return 1; }
  PP_HD void sync() {}
  PP_HD double sum(double v) { return v; }
  PP_HD int excl_scan(int v, int* total) {
    *total = v;
    return 0;
  }
  PP_HD double warp_sum(double v) { return v; }
  PP_HD float argmin(float v, int i, int* imin) {
    *imin = i;
    return v;
  }
};

// The ordering of argmin: (v, i) before (w, j) when v < w, or v == w and i < j; NaN after everything.
PP_HD bool pp_before(float v, int i, float w, int j) {
  if (v != v) return false;
  if (w != w) return true;
  return v < w || (v == w && i < j);
}

#ifdef __CUDACC__
// One thread block; blockDim.x must be a multiple of 32 and blockDim.y == blockDim.z == 1. `fscr` and `iscr`
// point to 32 doubles / 32 ints of shared memory owned by the team.
struct CtaTeam {
  static constexpr bool kSerial = false;
  double* fscr;
  int* iscr;
  PP_DEV int rank() const { return threadIdx.x; }
  PP_DEV int size() const { return blockDim.x; }
  PP_DEV int lane() const { return threadIdx.x & 31; }
  PP_DEV int warp() const { return threadIdx.x >> 5; }
  PP_DEV int nwarps() const { return blockDim.x >> 5; }
  PP_DEV int warp_size() const { return 32; }
  PP_DEV void sync() { __syncthreads(); }
  PP_DEV double warp_sum(double v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
  }
  PP_DEV double sum(double v) {
    v = warp_sum(v);
    if (lane() == 0) fscr[warp()] = v;
    __syncthreads();
    double tot = 0.0;
    const int nw = nwarps();
    for (int w = 0; w < nw; ++w) tot += fscr[w];
    __syncthreads();  // fscr may be reused right after
    return tot;
  }
  PP_DEV int excl_scan(int v, int* total) {
    const int ln = lane();
    int x = v;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, x, off);
      if (ln >= off) x += y;
    }
    if (ln == 31) iscr[warp()] = x;
    __syncthreads();
    int before = 0, tot = 0;
    const int nw = nwarps(), me = warp();
    for (int w = 0; w < nw; ++w) {
      const int t = iscr[w];
      before += (w < me) ? t : 0;
      tot += t;
    }
    __syncthreads();
    *total = tot;
    return before + x - v;
  }
  PP_DEV float argmin(float v, int i, int* imin) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float w = __shfl_xor_sync(0xffffffffu, v, off);
      const int j = __shfl_xor_sync(0xffffffffu, i, off);
      if (pp_before(w, j, v, i)) {
        v = w;
        i = j;
      }
    }
    float* fv = reinterpret_cast<float*>(fscr);
    if (lane() == 0) {
      fv[warp()] = v;
      iscr[warp()] = i;
    }
    __syncthreads();
    v = fv[0];
    i = iscr[0];
    const int nw = nwarps();
    for (int w = 1; w < nw; ++w)
      if (pp_before(fv[w], iscr[w], v, i)) {
        v = fv[w];
        i = iscr[w];
      }
    __syncthreads();
    *imin = i;
    return v;
  }
};
#endif

}  // namespace pyprune
