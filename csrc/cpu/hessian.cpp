// CPU hessian_update: the upper triangle of H by BLAS GEMMs on X up-cast to fp32, one per strip of rows
// (H[i0:i1, i0:] += X[:, i0:i1]^T X[:, i0:]: about half the flops of the whole X^T X), then the upper triangle
// mirrored onto the lower one in place (blocked), which gives the CUDA kernel's contract: H's upper triangle is what
// is read and computed, and the result is exactly symmetric. beta == 0 does not read H. Measured against the whole
// GEMM (the torch backend) in benchmarks/results/cpu_ops.md. The CUDA kernel (csrc/cuda/hessian.cu) is the fused
// one.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "op_checks.h"

namespace pyprune {
namespace {

void mirror_upper_to_lower(float* h, int64_t n) {
  constexpr int64_t T = 64;
  const int64_t nt = (n + T - 1) / T;
  at::parallel_for(0, nt, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) {      // tile row of the lower triangle
      for (int64_t bj = 0; bj <= bi; ++bj) {    // tile column
        const int64_t i1 = std::min(n, (bi + 1) * T), j1 = std::min(n, (bj + 1) * T);
        for (int64_t i = bi * T; i < i1; ++i)
          for (int64_t j = bj * T; j < std::min(j1, i); ++j) h[i * n + j] = h[j * n + i];
      }
    }
  });
}

void hessian_update_cpu(at::Tensor H, const at::Tensor& X, double alpha, double beta, bool allow_tf32) {
  (void)allow_tf32;  // no TF32 on the CPU
  check_hessian_update(H, X);
  const at::Tensor Xf = X.scalar_type() == at::kFloat ? X : X.to(at::kFloat);
  const int64_t n = H.size(0);
  // strip height: narrower strips do less work above the diagonal, wider ones make larger GEMMs; 128 up to 1024
  // columns and 256 past it were within a few percent of the best of 64-384 at 576-4096 columns (1 thread)
  const int64_t strip = n <= 1024 ? 128 : 256;
  for (int64_t i0 = 0; i0 < n; i0 += strip) {
    const int64_t i1 = std::min(n, i0 + strip);
    H.slice(0, i0, i1).slice(1, i0, n).addmm_(Xf.slice(1, i0, i1).t(), Xf.slice(1, i0, n), beta, alpha);
  }
  mirror_upper_to_lower(H.data_ptr<float>(), n);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) { m.impl("hessian_update", &hessian_update_cpu); }

}  // namespace pyprune
