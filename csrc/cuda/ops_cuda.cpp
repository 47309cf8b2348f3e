// Torch glue of the CUDA kernels (compiled only in CUDA builds): argument checks, outputs, workspace from the
// caching allocator, the current stream, and TORCH_LIBRARY_IMPL(pyprune, CUDA). The kernels themselves are in
// csrc/cuda/*.cu behind the extern "C" launchers of launchers.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "cuda/launchers.h"
#include "op_checks.h"

namespace pyprune {
namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK_TYPE(false, pp_msg("unsupported dtype ", t.scalar_type()));
  }
}

void check_cuda(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, pp_msg(op, ": CUDA kernel launch failed: ", cudaGetErrorString(err)));
}

at::Tensor nm_select_cuda(const at::Tensor& W1, const at::Tensor& G, int64_t n, int64_t m, bool exact) {
  check_nm_select(W1, G, n, m);
  const c10::cuda::CUDAGuard guard(W1.device());
  const int64_t rows = W1.size(0), B = W1.size(1);
  at::Tensor out = at::empty({rows, B}, W1.options().dtype(at::kBool));
  if (rows == 0 || B == 0) return out;
  int64_t chunk = 0;
  at::Tensor ws;
  float* tab = nullptr;
  uint8_t* sub = nullptr;
  if (exact) {
    const int64_t ns = nm_binom((int)m, (int)n), E = nm_entry_floats((int)n);
    chunk = nm_groups_per_chunk(n, m, B / m);
    ws = at::empty({chunk * ns * E * 4 + ns * n}, W1.options().dtype(at::kByte));
    tab = reinterpret_cast<float*>(ws.data_ptr<uint8_t>());
    sub = ws.data_ptr<uint8_t>() + chunk * ns * E * 4;
  }
  check_cuda("pyprune.nm_select",
             pyprune_nm_select_cuda(W1.data_ptr(), dtype_code(W1), G.data_ptr<float>(),
                                    reinterpret_cast<uint8_t*>(out.data_ptr<bool>()), (int)rows, (int)B, (int)n,
                                    (int)m, exact ? 1 : 0, (int)chunk, tab, sub,
                                    c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_solve_cuda(const at::Tensor& G, const at::Tensor& U_B,
                                                                 const at::Tensor& W1, const at::Tensor& mask) {
  check_masked_solve(G, U_B, W1, mask);
  const c10::cuda::CUDAGuard guard(G.device());
  const int64_t rows = W1.size(0), B = G.size(0);
  const int max_b = pyprune_masked_solve_cuda_max_b(G.get_device());
  TORCH_CHECK_VALUE(B <= max_b, pp_msg("pyprune.masked_solve: block size B=", B, " is too large for the CUDA kernel "
                                       "on ", G.device(), " (at most ", max_b, ": a fully pruned row needs a packed "
                                       "B x B triangle in shared memory); use a smaller block or backend='triton' / "
                                       "'torch'"));
  at::Tensor E = at::empty({rows, B}, G.options());
  at::Tensor loss = at::empty({rows}, G.options());
  at::Tensor status = at::empty({rows}, G.options().dtype(at::kInt));
  if (rows == 0 || B == 0) return {E.zero_(), loss.zero_(), status.zero_()};
  check_cuda("pyprune.masked_solve",
             pyprune_masked_solve_cuda(G.data_ptr<float>(), U_B.data_ptr<float>(), W1.data_ptr(), dtype_code(W1),
                                       reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()),
                                       E.data_ptr<float>(), loss.data_ptr<float>(), status.data_ptr<int32_t>(),
                                       (int)rows, (int)B, c10::cuda::getCurrentCUDAStream().stream()));
  return {E, loss, status};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> refine_solve_cuda(
    const at::Tensor& G, const at::Tensor& U_B, const at::Tensor& W1, const at::Tensor& mask, int64_t rounds,
    int64_t m, double tol) {
  check_refine_solve(G, U_B, W1, mask, rounds, m, tol);
  const c10::cuda::CUDAGuard guard(G.device());
  const int64_t rows = W1.size(0), B = G.size(0);
  const int max_b = pyprune_refine_solve_cuda_max_b(G.get_device());
  TORCH_CHECK_VALUE(B <= max_b, pp_msg("pyprune.refine_solve: block size B=", B, " is too large for the CUDA kernel "
                                       "on ", G.device(), " (at most ", max_b, ": a fully pruned row keeps two B x B "
                                       "matrices in shared memory); use a smaller block or backend='torch'"));
  at::Tensor E = at::empty({rows, B}, G.options());
  at::Tensor loss = at::empty({rows}, G.options());
  at::Tensor status = at::empty({rows}, G.options().dtype(at::kInt));
  at::Tensor mout = at::empty({rows, B}, G.options().dtype(at::kBool));
  at::Tensor nsw = at::empty({rows}, G.options().dtype(at::kInt));
  if (rows == 0 || B == 0) return {E.zero_(), loss.zero_(), status.zero_(), mout.zero_(), nsw.zero_()};
  check_cuda("pyprune.refine_solve",
             pyprune_refine_solve_cuda(G.data_ptr<float>(), U_B.data_ptr<float>(), W1.data_ptr(), dtype_code(W1),
                                       reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()), (int)rounds, (int)m,
                                       (float)tol, E.data_ptr<float>(), loss.data_ptr<float>(),
                                       status.data_ptr<int32_t>(), reinterpret_cast<uint8_t*>(mout.data_ptr<bool>()),
                                       nsw.data_ptr<int32_t>(), (int)rows, (int)B,
                                       c10::cuda::getCurrentCUDAStream().stream()));
  return {E, loss, status, mout, nsw};
}

void hessian_update_cuda(at::Tensor H, const at::Tensor& X, double alpha, double beta, bool allow_tf32) {
  check_hessian_update(H, X);
  const c10::cuda::CUDAGuard guard(H.device());
  TORCH_CHECK_VALUE(X.size(0) <= INT32_MAX && H.size(0) <= INT32_MAX, pp_msg("pyprune.hessian_update: X is too large"));
  // float64 activations are rare: round them to fp32 once (every other dtype is read as it is).
  const at::Tensor Xc = X.scalar_type() == at::kDouble ? X.to(at::kFloat) : X;
  check_cuda("pyprune.hessian_update",
             pyprune_hessian_update_cuda(H.data_ptr<float>(), Xc.data_ptr(), dtype_code(Xc), (int)Xc.size(0),
                                         (int)H.size(0), (float)alpha, (float)beta, allow_tf32 ? 1 : 0,
                                         c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CUDA, m) {
  m.impl("nm_select", &nm_select_cuda);
  m.impl("masked_solve", &masked_solve_cuda);
  m.impl("refine_solve", &refine_solve_cuda);
  m.impl("hessian_update", &hessian_update_cuda);
}

}  // namespace pyprune
