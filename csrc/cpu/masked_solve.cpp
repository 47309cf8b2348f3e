// CPU masked_solve: the per-row math of kernels/masked_solve.cuh with a SerialTeam, rows in parallel.
// Also the test-only _masked_solve_emulated: the same code on a ThreadTeam, with the CUDA launcher's tiers.
// Both return (E, loss, status) and never raise for a row whose G[M, M] is not positive definite: that row gets
// status = 1 + the block column of the failing pivot and NaN in E and loss (the contract of every backend; the
// Python wrapper pyprune.ops.masked_solve checks status and raises).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <thread>
#include <vector>

#include "cpu/thread_team.h"
#include "kernels/masked_solve.cuh"
#include "kernels/team.cuh"
#include "op_checks.h"

namespace pyprune {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_solve_cpu(const at::Tensor& G, const at::Tensor& U_B,
                                                                const at::Tensor& W1, const at::Tensor& mask) {
  check_masked_solve(G, U_B, W1, mask);
  const int64_t rows = W1.size(0);
  const int B = (int)G.size(0);
  at::Tensor E = at::empty({rows, (int64_t)B}, G.options());
  at::Tensor loss = at::empty({rows}, G.options());
  at::Tensor status = at::empty({rows}, G.options().dtype(at::kInt));
  if (rows == 0 || B == 0) return {E.zero_(), loss.zero_(), status.zero_()};
  const float* g = G.data_ptr<float>();
  const float* u = U_B.data_ptr<float>();
  const uint8_t* mk = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  float* e = E.data_ptr<float>();
  float* l = loss.data_ptr<float>();
  int32_t* st = status.data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(1, 4096 / ((int64_t)B * B / 8 + 1));
  dispatch_weight_cpu(W1.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* w = W1.data_ptr<T>();
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      std::vector<float> ws(ms_smem_words(B));
      SerialTeam t;
      for (int64_t r = r0; r < r1; ++r)
        masked_solve_row(t, g, u, w + r * B, mk + r * B, B, 0, B, ws.data(), e + r * B, l + r, st + r);
    });
  });
  return {E, loss, status};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_solve_emulated_cpu(const at::Tensor& G, const at::Tensor& U_B,
                                                                         const at::Tensor& W1, const at::Tensor& mask,
                                                                         int64_t threads, int64_t warp) {
  check_masked_solve(G, U_B, W1, mask);
  TORCH_CHECK_VALUE(warp >= 1 && threads >= warp && threads % warp == 0 && threads <= 64,
                    pp_msg("_masked_solve_emulated: threads must be a multiple of warp (at most 64), got ", threads,
                           ", ", warp));
  const int64_t rows = W1.size(0);
  const int B = (int)G.size(0);
  at::Tensor E = at::full({rows, (int64_t)B}, -1.f, G.options());  // unwritten entries stay visible
  at::Tensor loss = at::full({rows}, -1.f, G.options());
  at::Tensor status = at::full({rows}, -1, G.options().dtype(at::kInt));
  if (rows == 0 || B == 0) return {E, loss, status};
  const float* g = G.data_ptr<float>();
  const float* u = U_B.data_ptr<float>();
  const uint8_t* mk = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  float* e = E.data_ptr<float>();
  float* l = loss.data_ptr<float>();
  int32_t* st = status.data_ptr<int32_t>();
  const int split = ms_split(B);
  const int tiers[2][2] = {{0, split}, {split + 1, B}};
  dispatch_weight_cpu(W1.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* w = W1.data_ptr<T>();
    for (int tier = 0; tier < (split < B ? 2 : 1); ++tier) {
      const int kmin = tiers[tier][0], kmax = tiers[tier][1];
      ThreadTeamShared sh((int)threads, (int)warp);
      std::vector<float> smem(ms_smem_words(kmax), -7.f);
      std::vector<std::thread> pool;
      for (int rk = 0; rk < threads; ++rk) {
        pool.emplace_back([&, rk] {
          ThreadTeam t{&sh, rk};
          for (int64_t r = 0; r < rows; ++r)
            masked_solve_row(t, g, u, w + r * B, mk + r * B, B, kmin, kmax, smem.data(), e + r * B, l + r, st + r);
        });
      }
      for (auto& th : pool) th.join();
    }
  });
  return {E, loss, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("masked_solve", &masked_solve_cpu);
  m.impl("_masked_solve_emulated", &masked_solve_emulated_cpu);
}

}  // namespace pyprune
