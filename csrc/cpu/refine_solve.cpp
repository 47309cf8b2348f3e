// CPU refine_solve: the per-row math of kernels/refine_solve.cuh with a SerialTeam, rows in parallel (each row's
// state, about 3 B^2 floats, stays in the core's cache); eight rows with the same count of pruned weights share
// their setup through the header's multi-row path (refine_solve_rows8, the same bits as one row at a time). Also
// the test-only _refine_solve_emulated: the same code on a ThreadTeam, with the CUDA launcher's two tiers, and
// _refine_solve_rowwise: every row one at a time. All return (E, loss, status, mask, swaps) and never raise for a
// row whose G[M, M] is not positive definite (status, NaN; pyprune.ops.refine_solve raises).
//
// On x86-64 the row code is compiled for AVX2 + FMA (the rest of pyprune._C is not): its inner loops are short dot
// products and rank-two updates over contiguous rows, and the eight-row setup keeps eight rows in the lanes of its
// vectors (measured: benchmarks/results/bench_refine_solve.md). The op checks the processor at run time and refuses
// with a clear error where it lacks them; pyprune.ops then takes the torch path under backend="auto".
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "cpu/thread_team.h"
#include "kernels/common.cuh"
#include "kernels/masked_solve.cuh"
#include "kernels/team.cuh"
#include "op_checks.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PP_RS_TARGETED 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define PP_RS_FMA 1
#endif
#include "kernels/refine_solve.cuh"

namespace pyprune {
namespace {

// Rows grouped by their count of pruned weights (a stable counting sort): eight rows of one count at a time through
// refine_solve_rows8 (their setup in the lanes of 8-wide vectors), the rest of each count one by one; with
// multi = false every row one by one (the test-only _refine_solve_rowwise). Both give the same bits.
template <class T>
void refine_rows_serial(const float* g, const float* u, const T* w, const uint8_t* mk, int64_t rows, int B, int m,
                        int rounds, float tol, float* e, float* l, int32_t* st, uint8_t* mo, int32_t* ns,
                        bool multi) {
  std::vector<int64_t> order(rows);
  std::vector<int64_t> first(B + 2, 0);
  std::vector<int> cnt(rows);
  for (int64_t r = 0; r < rows; ++r) {
    int k = 0;
    for (int j = 0; j < B; ++j) k += mk[r * B + j] ? 1 : 0;
    cnt[r] = k;
    ++first[k + 1];
  }
  for (int k = 0; k <= B; ++k) first[k + 1] += first[k];
  {
    std::vector<int64_t> at(first.begin(), first.end() - 1);
    for (int64_t r = 0; r < rows; ++r) order[at[cnt[r]]++] = r;
  }
  std::vector<std::pair<int64_t, int>> tasks;  // (position in order, 8 or 1 rows)
  for (int k = 0; k <= B; ++k) {
    int64_t i = first[k];
    if (multi)
      for (; i + kRsLanes <= first[k + 1]; i += kRsLanes) tasks.emplace_back(i, kRsLanes);
    for (; i < first[k + 1]; ++i) tasks.emplace_back(i, 1);
  }
  std::vector<float> ubt((size_t)B * B);  // U_B^T, zero above its diagonal: the rows e is summed from
  for (int col = 0; col < B; ++col)
    for (int r = 0; r < B; ++r) ubt[(size_t)col * B + r] = r <= col ? u[(size_t)r * B + col] : 0.f;
  const size_t row_words = ((rs_host_words(B) + 15) / 16) * 16;  // 64-byte multiples
  const size_t soa_words = ((rs8_soa_words(B) + 15) / 16) * 16;
  at::parallel_for(0, (int64_t)tasks.size(), 1, [&](int64_t t0, int64_t t1) {
    std::unique_ptr<float[]> buf(new float[kRsLanes * row_words + soa_words + 16]);
    float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.get()) + 63) & ~uintptr_t(63));
    float* ws[kRsLanes];
    for (int x = 0; x < kRsLanes; ++x) ws[x] = base + x * row_words;
    float* soa = base + kRsLanes * row_words;
    SerialTeam t;
    for (int64_t k = t0; k < t1; ++k) {
      const auto [at, n] = tasks[k];
      if (n == kRsLanes) {
        refine_solve_rows8(g, u, w, mk, order.data() + at, B, m, rounds, tol, ws, soa, e, l, st, mo, ns, ubt.data());
        continue;
      }
      const int64_t r = order[at];
      refine_solve_row(t, g, u, w + r * B, mk + r * B, B, m, rounds, tol, 0, B, ws[0], e + r * B, l + r, st + r,
                       mo + r * B, ns + r, ubt.data());
    }
  });
}

template <class T>
void refine_rows_emulated(const float* g, const float* u, const T* w, const uint8_t* mk, int64_t rows, int B, int m,
                          int rounds, float tol, float* e, float* l, int32_t* st, uint8_t* mo, int32_t* ns,
                          int threads, int warp) {
  const int split = ms_split(B);
  const int tiers[2][2] = {{0, split}, {split + 1, B}};
  for (int tier = 0; tier < (split < B ? 2 : 1); ++tier) {
    const int kmin = tiers[tier][0], kmax = tiers[tier][1];
    ThreadTeamShared sh(threads, warp);
    std::vector<double> smem((rs_smem_words(kmax, B, m) + 1) / 2, -7.0);
    std::vector<std::thread> pool;
    for (int rk = 0; rk < threads; ++rk) {
      pool.emplace_back([&, rk] {
        ThreadTeam t{&sh, rk};
        for (int64_t r = 0; r < rows; ++r)
          refine_solve_row(t, g, u, w + r * B, mk + r * B, B, m, rounds, tol, kmin, kmax,
                           reinterpret_cast<float*>(smem.data()), e + r * B, l + r, st + r, mo + r * B, ns + r);
      });
    }
    for (auto& th : pool) th.join();
  }
}

}  // namespace
}  // namespace pyprune

#ifdef PP_RS_TARGETED
#pragma GCC pop_options
#endif

namespace pyprune {
namespace {

bool cpu_supported() {
#ifdef PP_RS_TARGETED
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return true;
#endif
}

using RsOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// `fill` for outputs that every row writes itself: the serial op writes each row's e, loss, status, mask and count
// (MS_SKIPPED never happens with kmin = 0 and kmax = B), so they stay uninitialised (two passes over rows x B saved
// per block); the emulation's tiers leave rows to each other and fill them.
constexpr float kRowsWriteAll = std::numeric_limits<float>::quiet_NaN();

RsOut refine_outputs(const at::Tensor& G, const at::Tensor& W1, float fill) {
  const int64_t rows = W1.size(0), B = G.size(0);
  if (std::isnan(fill))
    return {at::empty({rows, B}, G.options()), at::empty({rows}, G.options()),
            at::empty({rows}, G.options().dtype(at::kInt)), at::empty({rows, B}, G.options().dtype(at::kBool)),
            at::empty({rows}, G.options().dtype(at::kInt))};
  return {at::full({rows, B}, fill, G.options()), at::full({rows}, fill, G.options()),
          at::full({rows}, (int)fill, G.options().dtype(at::kInt)),
          at::zeros({rows, B}, G.options().dtype(at::kBool)), at::full({rows}, (int)fill, G.options().dtype(at::kInt))};
}

template <class F>
RsOut run(const at::Tensor& G, const at::Tensor& U_B, const at::Tensor& W1, const at::Tensor& mask, float fill,
          F&& rows_fn) {
  RsOut out = refine_outputs(G, W1, fill);
  auto& [E, loss, status, mout, nsw] = out;
  if (W1.size(0) == 0 || G.size(0) == 0) return out;
  dispatch_weight_cpu(W1.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rows_fn(G.data_ptr<float>(), U_B.data_ptr<float>(), W1.data_ptr<T>(),
            reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()), E.data_ptr<float>(), loss.data_ptr<float>(),
            status.data_ptr<int32_t>(), reinterpret_cast<uint8_t*>(mout.data_ptr<bool>()), nsw.data_ptr<int32_t>());
  });
  return out;
}

RsOut refine_solve_cpu_impl(const at::Tensor& G, const at::Tensor& U_B, const at::Tensor& W1, const at::Tensor& mask,
                            int64_t rounds, int64_t m, double tol, bool multi) {
  check_refine_solve(G, U_B, W1, mask, rounds, m, tol);
  TORCH_CHECK(cpu_supported(), "pyprune.refine_solve: the C++ CPU op needs a processor with AVX2 and FMA; use "
                               "backend='torch' (backend='auto' does)");
  const int B = (int)G.size(0);
  return run(G, U_B, W1, mask, kRowsWriteAll, [&](const float* g, const float* u, const auto* w, const uint8_t* mk,
                                                float* e, float* l, int32_t* st, uint8_t* mo, int32_t* ns) {
    refine_rows_serial(g, u, w, mk, W1.size(0), B, (int)m, (int)rounds, (float)tol, e, l, st, mo, ns, multi);
  });
}

RsOut refine_solve_cpu(const at::Tensor& G, const at::Tensor& U_B, const at::Tensor& W1, const at::Tensor& mask,
                       int64_t rounds, int64_t m, double tol) {
  return refine_solve_cpu_impl(G, U_B, W1, mask, rounds, m, tol, true);
}

// test-only: every row through the one-row code (the multi-row path must give the same bits)
RsOut refine_solve_rowwise_cpu(const at::Tensor& G, const at::Tensor& U_B, const at::Tensor& W1,
                               const at::Tensor& mask, int64_t rounds, int64_t m, double tol) {
  return refine_solve_cpu_impl(G, U_B, W1, mask, rounds, m, tol, false);
}

RsOut refine_solve_emulated_cpu(const at::Tensor& G, const at::Tensor& U_B, const at::Tensor& W1,
                                const at::Tensor& mask, int64_t rounds, int64_t m, double tol, int64_t threads,
                                int64_t warp) {
  check_refine_solve(G, U_B, W1, mask, rounds, m, tol);
  TORCH_CHECK(cpu_supported(), "pyprune._refine_solve_emulated needs a processor with AVX2 and FMA");
  TORCH_CHECK_VALUE(warp >= 1 && threads >= warp && threads % warp == 0 && threads <= 64,
                    pp_msg("_refine_solve_emulated: threads must be a multiple of warp (at most 64), got ", threads,
                           ", ", warp));
  const int B = (int)G.size(0);
  return run(G, U_B, W1, mask, -1.f, [&](const float* g, const float* u, const auto* w, const uint8_t* mk, float* e,
                                         float* l, int32_t* st, uint8_t* mo, int32_t* ns) {
    refine_rows_emulated(g, u, w, mk, W1.size(0), B, (int)m, (int)rounds, (float)tol, e, l, st, mo, ns,
                         (int)threads, (int)warp);
  });
}

bool refine_solve_cpu_supported() { return cpu_supported(); }

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) {
  m.impl("refine_solve", &refine_solve_cpu);
  m.impl("_refine_solve_emulated", &refine_solve_emulated_cpu);
  m.impl("_refine_solve_rowwise", &refine_solve_rowwise_cpu);
}

TORCH_LIBRARY_FRAGMENT(pyprune, m) {
  m.def("_refine_solve_cpu_supported() -> bool", &refine_solve_cpu_supported);
}

}  // namespace pyprune
