// CUDA hessian_update: H <- beta H + alpha X^T X, a SYRK over the upper triangle of 128 x 128 tiles.
//
// One thread block (256 threads, 8 warps) per tile pair (ti <= tj), ordered by tj so that neighbouring blocks
// share the X[:, J] slab in L2. The main loop walks the k tokens in slabs: X[k0:k0+BK, I] and X[k0:k0+BK, J] go
// global -> registers (16-byte loads when aligned, zero-filled at the edges) -> shared memory, double-buffered,
// in X's own dtype (no fp32 copy of X). Diagonal tiles load one slab and use it for both operands.
//   - fp16 / bf16: WMMA 16x16x16 tensor-core MMAs with fp32 accumulation (the products of two 16-bit values are
//     exact in fp32); BK = 32; each warp owns a 32 x 64 sub-tile (2 x 4 fragments).
//   - fp32 with allow_tf32: WMMA 16x16x8 TF32 MMAs, BK = 16, same warp layout.
//   - fp32 without TF32: SIMT FFMA, BK = 8, each thread an 8 x 8 register tile.
// Epilogue, fused: in two halves of 64 rows, the accumulators go to shared memory, each value becomes
// beta * H[i, j] + alpha * C[i, j] (H read from the upper block only; beta == 0 does not read H), is written to
// H[I, J] coalesced and mirrored to H[J, I] from shared memory (diagonal tiles: upper part then its mirror), so
// H is exactly symmetric. Shared memory: at most 34 KB per block (no opt-in needed).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <stdint.h>

#include "cuda/launchers.h"

namespace pyprune {
namespace {

using namespace nvcuda;

constexpr int HT = 128;      // tile edge
constexpr int NT = 256;      // threads per block
constexpr int LDC = HT + 4;  // epilogue row stride in floats
constexpr int EPI_ROWS = 64;

__device__ __forceinline__ void tile_pair(int b, int& ti, int& tj) {
  int j = (int)((sqrtf(8.f * (float)b + 1.f) - 1.f) * 0.5f);
  while (j > 0 && j * (j + 1) / 2 > b) --j;
  while ((j + 1) * (j + 2) / 2 <= b) ++j;
  tj = j;
  ti = b - j * (j + 1) / 2;
}

// Epilogue for tile rows [r0, r0 + EPI_ROWS): sC holds those rows of C (row r at (r - r0) * LDC).
__device__ __forceinline__ void epilogue_half(float* sC, float* __restrict__ H, int cols, int I0, int J0, int r0,
                                              float alpha, float beta, bool diag) {
  for (int id = threadIdx.x; id < EPI_ROWS * HT; id += NT) {
    const int rr = id / HT, c = id % HT, r = r0 + rr;
    const int gi = I0 + r, gj = J0 + c;
    if (gi < cols && gj < cols && (!diag || c >= r)) {
      float* p = H + (size_t)gi * cols + gj;
      const float ac = alpha * sC[rr * LDC + c];
      const float v = beta == 0.f ? ac : fmaf(beta, *p, ac);
      *p = v;
      sC[rr * LDC + c] = v;
    }
  }
  __syncthreads();
  for (int id = threadIdx.x; id < EPI_ROWS * HT; id += NT) {
    const int c = id / EPI_ROWS, rr = id % EPI_ROWS, r = r0 + rr;
    const int gi = J0 + c, gj = I0 + r;
    if (gi < cols && gj < cols && (!diag || c > r)) H[(size_t)gi * cols + gj] = sC[rr * LDC + c];
  }
  __syncthreads();
}

// Global -> register loads of one BK x HT slab X[k0:k0+BK, c0:c0+HT], in 16-byte chunks of EPC elements of
// `Bits` (the raw bits of X's dtype; 0 bits is 0.0 in every float format).
template <class Bits, int BK>
struct Slab {
  static constexpr int EPC = 16 / sizeof(Bits);
  static constexpr int CPR = HT / EPC;  // chunks per slab row
  static constexpr int NCH = BK * CPR / NT;  // chunks per thread
  static_assert(BK * CPR % NT == 0, "slab must split evenly over the threads");
  uint4 r[NCH];
  __device__ __forceinline__ void load(const Bits* __restrict__ X, int k, int cols, int k0, int c0, bool vec) {
#pragma unroll
    for (int q = 0; q < NCH; ++q) {
      const int ch = threadIdx.x + q * NT;
      const int gk = k0 + ch / CPR, gc = c0 + (ch % CPR) * EPC;
      const Bits* src = X + (size_t)gk * cols + gc;
      if (vec && gk < k && gc + EPC <= cols) {
        r[q] = __ldg(reinterpret_cast<const uint4*>(src));
      } else {
        union {
          uint4 v;
          Bits h[EPC];
        } u;
#pragma unroll
        for (int e = 0; e < EPC; ++e) u.h[e] = (gk < k && gc + e < cols) ? src[e] : Bits(0);
        r[q] = u.v;
      }
    }
  }
  // dst: the slab in shared memory, row stride lds elements of Bits.
  __device__ __forceinline__ void store(Bits* dst, int lds) const {
#pragma unroll
    for (int q = 0; q < NCH; ++q) {
      const int ch = threadIdx.x + q * NT;
      *reinterpret_cast<uint4*>(dst + (ch / CPR) * lds + (ch % CPR) * EPC) = r[q];
    }
  }
};

template <class T>
struct WmmaCfg;
template <>
struct WmmaCfg<__half> {
  using In = __half;
  using Frag = __half;
  using Bits = uint16_t;
  static constexpr int BK = 32, KS = 16, LDS = HT + 8;
  static constexpr bool kTf32 = false;
};
template <>
struct WmmaCfg<__nv_bfloat16> {
  using In = __nv_bfloat16;
  using Frag = __nv_bfloat16;
  using Bits = uint16_t;
  static constexpr int BK = 32, KS = 16, LDS = HT + 8;
  static constexpr bool kTf32 = false;
};
struct Tf32Tag {};
template <>
struct WmmaCfg<Tf32Tag> {
  using In = float;
  using Frag = wmma::precision::tf32;
  using Bits = uint32_t;
  static constexpr int BK = 16, KS = 8, LDS = HT + 4;
  static constexpr bool kTf32 = true;
};

template <class Cfg>
constexpr size_t wmma_smem_bytes() {
  return 2 * 2 * Cfg::BK * Cfg::LDS * sizeof(typename Cfg::Bits) > EPI_ROWS * LDC * sizeof(float)
             ? 2 * 2 * Cfg::BK * Cfg::LDS * sizeof(typename Cfg::Bits)
             : EPI_ROWS * LDC * sizeof(float);
}

template <class Cfg>
__global__ void __launch_bounds__(NT, 2)
    syrk_wmma_kernel(const typename Cfg::Bits* __restrict__ X, float* __restrict__ H, int k, int cols,
                     float alpha, float beta, int vec) {
  using Bits = typename Cfg::Bits;
  using In = typename Cfg::In;
  constexpr int BK = Cfg::BK, KS = Cfg::KS, LDS = Cfg::LDS;
  extern __shared__ __align__(128) unsigned char smem[];
  Bits* sA = reinterpret_cast<Bits*>(smem);  // [2][BK][LDS]
  Bits* sB = sA + 2 * BK * LDS;              // [2][BK][LDS]
  float* sC = reinterpret_cast<float*>(smem);

  int ti, tj;
  tile_pair(blockIdx.x, ti, tj);
  const int I0 = ti * HT, J0 = tj * HT;
  const bool diag = ti == tj;
  const int warp = threadIdx.x >> 5;
  const int wm = warp >> 1, wn = warp & 1;  // warp sub-tile: rows wm * 32, columns wn * 64

  wmma::fragment<wmma::accumulator, 16, 16, KS, float> acc[2][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  Slab<Bits, BK> la, lb;
  la.load(X, k, cols, 0, I0, vec);
  if (!diag) lb.load(X, k, cols, 0, J0, vec);
  la.store(sA, LDS);
  if (!diag) lb.store(sB, LDS);
  __syncthreads();

  for (int k0 = 0, buf = 0; k0 < k; k0 += BK, buf ^= 1) {
    const bool more = k0 + BK < k;
    if (more) {
      la.load(X, k, cols, k0 + BK, I0, vec);
      if (!diag) lb.load(X, k, cols, k0 + BK, J0, vec);
    }
    const In* a = reinterpret_cast<const In*>(sA + buf * BK * LDS);
    const In* b = diag ? a : reinterpret_cast<const In*>(sB + buf * BK * LDS);
#pragma unroll
    for (int kk = 0; kk < BK; kk += KS) {
      wmma::fragment<wmma::matrix_a, 16, 16, KS, typename Cfg::Frag, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, KS, typename Cfg::Frag, wmma::row_major> fb[4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(fa[i], a + kk * LDS + wm * 32 + i * 16, LDS);
        if constexpr (Cfg::kTf32) {
#pragma unroll
          for (int e = 0; e < fa[i].num_elements; ++e) fa[i].x[e] = wmma::__float_to_tf32(fa[i].x[e]);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wmma::load_matrix_sync(fb[j], b + kk * LDS + wn * 64 + j * 16, LDS);
        if constexpr (Cfg::kTf32) {
#pragma unroll
          for (int e = 0; e < fb[j].num_elements; ++e) fb[j].x[e] = wmma::__float_to_tf32(fb[j].x[e]);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    if (more) {
      la.store(sA + (buf ^ 1) * BK * LDS, LDS);
      if (!diag) lb.store(sB + (buf ^ 1) * BK * LDS, LDS);
    }
    __syncthreads();
  }

  // Epilogue in two halves of 64 rows: warps wm in {0, 1} hold rows 0..63, wm in {2, 3} rows 64..127.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    if ((wm >> 1) == half) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          wmma::store_matrix_sync(sC + ((wm & 1) * 32 + i * 16) * LDC + wn * 64 + j * 16, acc[i][j], LDC,
                                  wmma::mem_row_major);
    }
    __syncthreads();
    epilogue_half(sC, H, cols, I0, J0, half * EPI_ROWS, alpha, beta, diag);
  }
}

// fp32 without TF32: SIMT FFMA. Thread (ty, tx) of a 16 x 16 grid owns rows {ty*4 + i, 64 + ty*4 + i} and
// columns {tx*4 + j, 64 + tx*4 + j}, i, j < 4.
constexpr int SIMT_BK = 8;
constexpr size_t simt_smem_bytes() {
  return 2 * 2 * SIMT_BK * HT * sizeof(float) > EPI_ROWS * LDC * sizeof(float) ? 2 * 2 * SIMT_BK * HT * sizeof(float)
                                                                               : EPI_ROWS * LDC * sizeof(float);
}

__global__ void __launch_bounds__(NT, 2)
    syrk_simt_kernel(const uint32_t* __restrict__ X, float* __restrict__ H, int k, int cols, float alpha,
                     float beta, int vec) {
  extern __shared__ __align__(128) unsigned char smem[];
  float* sA = reinterpret_cast<float*>(smem);  // [2][BK][HT]
  float* sB = sA + 2 * SIMT_BK * HT;           // [2][BK][HT]
  float* sC = reinterpret_cast<float*>(smem);
  int ti, tj;
  tile_pair(blockIdx.x, ti, tj);
  const int I0 = ti * HT, J0 = tj * HT;
  const bool diag = ti == tj;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;

  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

  Slab<uint32_t, SIMT_BK> la, lb;
  la.load(X, k, cols, 0, I0, vec);
  if (!diag) lb.load(X, k, cols, 0, J0, vec);
  la.store(reinterpret_cast<uint32_t*>(sA), HT);
  if (!diag) lb.store(reinterpret_cast<uint32_t*>(sB), HT);
  __syncthreads();

  for (int k0 = 0, buf = 0; k0 < k; k0 += SIMT_BK, buf ^= 1) {
    const bool more = k0 + SIMT_BK < k;
    if (more) {
      la.load(X, k, cols, k0 + SIMT_BK, I0, vec);
      if (!diag) lb.load(X, k, cols, k0 + SIMT_BK, J0, vec);
    }
    const float* a = sA + buf * SIMT_BK * HT;
    const float* b = diag ? a : sB + buf * SIMT_BK * HT;
#pragma unroll
    for (int kk = 0; kk < SIMT_BK; ++kk) {
      float av[8], bv[8];
      *reinterpret_cast<float4*>(av) = *reinterpret_cast<const float4*>(a + kk * HT + ty * 4);
      *reinterpret_cast<float4*>(av + 4) = *reinterpret_cast<const float4*>(a + kk * HT + 64 + ty * 4);
      *reinterpret_cast<float4*>(bv) = *reinterpret_cast<const float4*>(b + kk * HT + tx * 4);
      *reinterpret_cast<float4*>(bv + 4) = *reinterpret_cast<const float4*>(b + kk * HT + 64 + tx * 4);
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    if (more) {
      la.store(reinterpret_cast<uint32_t*>(sA + (buf ^ 1) * SIMT_BK * HT), HT);
      if (!diag) lb.store(reinterpret_cast<uint32_t*>(sB + (buf ^ 1) * SIMT_BK * HT), HT);
    }
    __syncthreads();
  }

#pragma unroll
  for (int half = 0; half < 2; ++half) {  // half h holds the rows h * 64 + ty * 4 + i: acc[h * 4 + i][*]
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float* dst = sC + (ty * 4 + i) * LDC;
      *reinterpret_cast<float4*>(dst + tx * 4) =
          make_float4(acc[half * 4 + i][0], acc[half * 4 + i][1], acc[half * 4 + i][2], acc[half * 4 + i][3]);
      *reinterpret_cast<float4*>(dst + 64 + tx * 4) =
          make_float4(acc[half * 4 + i][4], acc[half * 4 + i][5], acc[half * 4 + i][6], acc[half * 4 + i][7]);
    }
    __syncthreads();
    epilogue_half(sC, H, cols, I0, J0, half * EPI_ROWS, alpha, beta, diag);
  }
}

}  // namespace
}  // namespace pyprune

extern "C" cudaError_t pyprune_hessian_update_cuda(float* H, const void* X, int xdtype, int k, int cols,
                                                   float alpha, float beta, int allow_tf32, cudaStream_t stream) {
  using namespace pyprune;
  if (cols <= 0) return cudaSuccess;
  if (k < 0) return cudaErrorInvalidValue;
  const long long T = (cols + HT - 1) / HT;
  const long long blocks = T * (T + 1) / 2;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  const bool aligned = reinterpret_cast<uintptr_t>(X) % 16 == 0;
  switch (xdtype) {
    case 1:
    case 2: {
      const int vec = aligned && cols % 8 == 0;
      const uint16_t* Xb = static_cast<const uint16_t*>(X);
      if (xdtype == 1)
        syrk_wmma_kernel<WmmaCfg<__half>><<<(unsigned)blocks, NT, wmma_smem_bytes<WmmaCfg<__half>>(), stream>>>(
            Xb, H, k, cols, alpha, beta, vec);
      else
        syrk_wmma_kernel<WmmaCfg<__nv_bfloat16>>
            <<<(unsigned)blocks, NT, wmma_smem_bytes<WmmaCfg<__nv_bfloat16>>(), stream>>>(Xb, H, k, cols, alpha,
                                                                                          beta, vec);
      break;
    }
    case 0: {
      const int vec = aligned && cols % 4 == 0;
      const uint32_t* Xf = static_cast<const uint32_t*>(X);
      if (allow_tf32)
        syrk_wmma_kernel<WmmaCfg<Tf32Tag>><<<(unsigned)blocks, NT, wmma_smem_bytes<WmmaCfg<Tf32Tag>>(), stream>>>(
            Xf, H, k, cols, alpha, beta, vec);
      else
        syrk_simt_kernel<<<(unsigned)blocks, NT, simt_smem_bytes(), stream>>>(Xf, H, k, cols, alpha, beta, vec);
      break;
    }
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
