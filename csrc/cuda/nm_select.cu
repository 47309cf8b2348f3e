// CUDA nm_select. exact: a table kernel (one thread per (group, subset): unrank the subset, Cholesky of G[S, S]
// and its inverse in fp64, written as fp32) then a selection kernel; saliency: the selection kernel only.
// Selection: one thread per (row, group), blocks of 32 rows x 8 groups, so the 32 lanes of a warp share one
// group and read its table entries as broadcasts; each thread keeps its m weights in shared memory ([group][j]
// [lane]: conflict-free) and writes its m mask bytes (as 32-bit words when m % 4 == 0 and B % 4 == 0). Groups are
// processed in chunks so that the exact tables stay under ~64 MB (one chunk for 2:4 or 4:8 at any B).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/launchers.h"
#include "kernels/nm_select.cuh"

namespace pyprune {
namespace {

constexpr int NM_ROWS = 32, NM_GROUPS = 8;

__global__ void nm_tables_kernel(const float* __restrict__ G, int B, int n, int m, int g_first, int nc, int ns,
                                 float* __restrict__ tab, uint8_t* __restrict__ sub) {
  const long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= (long long)nc * ns) return;
  const int gi = (int)(p / ns), s = (int)(p % ns);
  uint8_t S[NM_MAX_M];
  nm_unrank(s, n, m, S);
  if (gi == 0)
    for (int j = 0; j < n; ++j) sub[(size_t)s * n + j] = S[j];
  nm_build_entry(G, B, (g_first + gi) * m, S, n, tab + (size_t)p * nm_entry_floats(n));
}

template <class T>
__global__ void __launch_bounds__(NM_ROWS * NM_GROUPS)
    nm_select_kernel(const T* __restrict__ W, const float* __restrict__ G, uint8_t* __restrict__ out, int rows,
                     int B, int n, int m, int g_first, int nc, int ns, const float* __restrict__ tab,
                     const uint8_t* __restrict__ sub, int exact, int word_out) {
  __shared__ float sw[NM_GROUPS][NM_MAX_M][NM_ROWS];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int row = blockIdx.x * NM_ROWS + tx;
  const int gi = blockIdx.y * NM_GROUPS + ty;
  if (row >= rows || gi >= nc) return;  // no barrier below: every thread only reads its own weights
  const int g = g_first + gi;
  const size_t base = (size_t)row * B + (size_t)g * m;
  float* w = &sw[ty][0][tx];
  for (int j = 0; j < m; ++j) w[j * NM_ROWS] = to_f32(W[base + j]);
  uint32_t bits;
  if (exact) {
    const int best = nm_best_subset(w, NM_ROWS, tab + (size_t)gi * ns * nm_entry_floats(n), sub, n, ns);
    bits = nm_subset_bits(sub, n, best);
  } else {
    bits = nm_saliency_group(w, NM_ROWS, G + (size_t)g * m * (B + 1), B + 1, n, m);
  }
  if (word_out) {  // 4 mask bytes per store (little endian: byte j of the word is column j)
    uint32_t* o = reinterpret_cast<uint32_t*>(out + base);
    for (int q = 0; q < m / 4; ++q) {
      const uint32_t b = bits >> (4 * q);
      o[q] = (b & 1u) | ((b >> 1) & 1u) << 8 | ((b >> 2) & 1u) << 16 | ((b >> 3) & 1u) << 24;
    }
  } else {
    for (int j = 0; j < m; ++j) out[base + j] = (bits >> j) & 1u;
  }
}

template <class T>
cudaError_t launch(const T* W, const float* G, uint8_t* out, int rows, int B, int n, int m, int exact, int chunk,
                   float* tab, uint8_t* sub, cudaStream_t stream) {
  const int ngroups = B / m;
  const int ns = exact ? nm_binom(m, n) : 0;
  const int word_out = (m % 4 == 0 && B % 4 == 0 && reinterpret_cast<uintptr_t>(out) % 4 == 0) ? 1 : 0;
  if (!exact) chunk = ngroups;
  if (chunk <= 0) return cudaErrorInvalidValue;
  for (int g0 = 0; g0 < ngroups; g0 += chunk) {
    const int nc = ngroups - g0 < chunk ? ngroups - g0 : chunk;
    if (exact) {
      const long long work = (long long)nc * ns;
      const int threads = 128;
      nm_tables_kernel<<<(unsigned)((work + threads - 1) / threads), threads, 0, stream>>>(G, B, n, m, g0, nc, ns,
                                                                                          tab, sub);
    }
    const dim3 block(NM_ROWS, NM_GROUPS);
    const dim3 grid((unsigned)((rows + NM_ROWS - 1) / NM_ROWS), (unsigned)((nc + NM_GROUPS - 1) / NM_GROUPS));
    nm_select_kernel<T><<<grid, block, 0, stream>>>(W, G, out, rows, B, n, m, g0, nc, ns, tab, sub, exact,
                                                    word_out);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace pyprune

extern "C" cudaError_t pyprune_nm_select_cuda(const void* W, int wdtype, const float* G, uint8_t* out, int rows,
                                              int B, int n, int m, int exact, int groups_per_chunk, float* tab,
                                              uint8_t* sub, cudaStream_t stream) {
  using namespace pyprune;
  if (rows <= 0 || B <= 0) return cudaSuccess;
  if (n <= 0 || n >= m || m > NM_MAX_M || B % m) return cudaErrorInvalidValue;
  switch (wdtype) {
    case 0: return launch(static_cast<const float*>(W), G, out, rows, B, n, m, exact, groups_per_chunk, tab, sub, stream);
    case 1: return launch(static_cast<const __half*>(W), G, out, rows, B, n, m, exact, groups_per_chunk, tab, sub, stream);
    case 2: return launch(static_cast<const __nv_bfloat16*>(W), G, out, rows, B, n, m, exact, groups_per_chunk, tab, sub, stream);
    default: return cudaErrorInvalidValue;
  }
}
