// CPU nm_select: per-(group, subset) tables then per-(row, group) selection, the math of kernels/nm_select.cuh.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "kernels/nm_select.cuh"
#include "op_checks.h"

namespace pyprune {
namespace {

at::Tensor nm_select_cpu(const at::Tensor& W1, const at::Tensor& G, int64_t n64, int64_t m64, bool exact) {
  check_nm_select(W1, G, n64, m64);
  const int n = (int)n64, m = (int)m64;
  const int64_t rows = W1.size(0);
  const int B = (int)W1.size(1);
  at::Tensor out = at::empty({rows, (int64_t)B}, W1.options().dtype(at::kBool));
  if (rows == 0 || B == 0) return out;
  uint8_t* o = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  const float* g = G.data_ptr<float>();
  const int ngroups = B / m;
  dispatch_weight_cpu(W1.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* w = W1.data_ptr<T>();
    if (!exact) {
      // the scores of a whole row first (w^2 / G_jj over contiguous columns: vectorised divisions), then the
      // groups' bits; the same arithmetic per entry as nm_saliency_group
      std::vector<float> gd(B);
      for (int c = 0; c < B; ++c) gd[c] = g[(size_t)c * (B + 1)];
      at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
        std::vector<float> sc(B);
        for (int64_t r = r0; r < r1; ++r) {
          const T* wr = w + r * B;
          for (int c = 0; c < B; ++c) {
            const float x = to_f32(wr[c]);
            sc[c] = x * x / gd[c];
          }
          uint8_t* orow = o + r * B;
          auto groups = [&](auto mm) {  // mm: the group size, a compile-time 4 for 2:4 and 1:4 (unrolled compares)
            const int M = mm;
            for (int gi = 0; gi < ngroups; ++gi) {
              const uint32_t bits = nm_smallest_bits(sc.data() + gi * M, 1, n, M);
              for (int j = 0; j < M; ++j) orow[gi * M + j] = (bits >> j) & 1u;
            }
          };
          if (m == 4)
            groups(std::integral_constant<int, 4>());
          else
            groups(m);
        }
      });
      return;
    }
    const int ns = nm_binom(m, n), E = nm_entry_floats(n);
    std::vector<uint8_t> sub((size_t)ns * n);
    for (int s = 0; s < ns; ++s) nm_unrank(s, n, m, sub.data() + (size_t)s * n);
    const int chunk = (int)nm_groups_per_chunk(n, m, ngroups);
    std::vector<float> tab((size_t)chunk * ns * E);
    for (int c0 = 0; c0 < ngroups; c0 += chunk) {
      const int nc = std::min(chunk, ngroups - c0);
      at::parallel_for(0, (int64_t)nc * ns, 256, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int gi = (int)(p / ns), s = (int)(p % ns);
          nm_build_entry(g, B, (c0 + gi) * m, sub.data() + (size_t)s * n, n, tab.data() + (size_t)p * E);
        }
      });
      at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / ((int64_t)nc * ns * E / 64 + 1)),
                       [&](int64_t r0, int64_t r1) {
        float wf[NM_MAX_M];
        for (int64_t r = r0; r < r1; ++r) {
          for (int gi = 0; gi < nc; ++gi) {
            const int64_t base = r * B + (int64_t)(c0 + gi) * m;
            for (int j = 0; j < m; ++j) wf[j] = to_f32(w[base + j]);
            const int best = nm_best_subset(wf, 1, tab.data() + (size_t)gi * ns * E, sub.data(), n, ns);
            const uint32_t bits = nm_subset_bits(sub.data(), n, best);
            for (int j = 0; j < m; ++j) o[base + j] = (bits >> j) & 1u;
          }
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyprune, CPU, m) { m.impl("nm_select", &nm_select_cpu); }

}  // namespace pyprune
