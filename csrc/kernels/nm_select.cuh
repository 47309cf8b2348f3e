// N:M mask selection, the math of one (row, group) (docs/ALGORITHM.md section 4).
//
// exact: the n-subset S of the group's m columns minimising 1/2 w_S^T (G[S,S])^{-1} w_S. (G[S,S])^{-1} is the
// same for every row, so it is precomputed once per (group, subset) as the inverse Cholesky factor X = L^{-1}
// (G[S,S] = L L^T, computed in double): then w_S^T G[S,S]^{-1} w_S = ||X w_S||^2, a sum of squares, with
// n(n+1)/2 multiply-adds per subset and row. Subsets are enumerated in itertools.combinations order and the
// first minimum wins. A subset whose G[S,S] is not numerically positive definite gets cost +inf.
// saliency (exact=false): the n smallest w_j^2 / G_jj of the group, ties to the lowest index.
#pragma once

#include <stddef.h>

#include "kernels/common.cuh"

namespace pyprune {

constexpr int NM_MAX_M = 16;

PP_HD int nm_binom(int n, int k) {
  if (k < 0 || k > n) return 0;
  long long r = 1;
  for (int i = 1; i <= k; ++i) r = r * (n - k + i) / i;
  return (int)r;
}

// Floats per (group, subset) table entry: a penalty (0 or +inf) then X packed by rows.
PP_HD int nm_entry_floats(int n) { return 1 + n * (n + 1) / 2; }

// The s-th n-subset of range(m) in lexicographic order (itertools.combinations order).
PP_HD void nm_unrank(int s, int n, int m, uint8_t* S) {
  int c = 0;
  for (int i = 0; i < n; ++i) {
    for (;; ++c) {
      const int cnt = nm_binom(m - 1 - c, n - 1 - i);
      if (s < cnt) break;
      s -= cnt;
    }
    S[i] = (uint8_t)c;
    ++c;
  }
}

// Table entry of subset S (n indices, relative to the group's first column g0) of one group.
PP_HD void nm_build_entry(const float* G, int B, int g0, const uint8_t* S, int n, float* out) {
  double L[NM_MAX_M * (NM_MAX_M + 1) / 2];
  double X[NM_MAX_M * (NM_MAX_M + 1) / 2];
  for (int i = 0; i < n; ++i)
    for (int j = 0; j <= i; ++j) L[tri(i) + j] = (double)G[(size_t)(g0 + S[i]) * B + g0 + S[j]];
  for (int j = 0; j < n; ++j) {  // Cholesky, left-looking, in double
    double d = L[tri(j) + j];
    for (int p = 0; p < j; ++p) d -= L[tri(j) + p] * L[tri(j) + p];
    if (!(d > 0.0)) {
      out[0] = pp_inf();
      for (int p = 0; p < n * (n + 1) / 2; ++p) out[1 + p] = 0.f;
      return;
    }
    d = pp_sqrt(d);
    L[tri(j) + j] = d;
    for (int i = j + 1; i < n; ++i) {
      double v = L[tri(i) + j];
      for (int p = 0; p < j; ++p) v -= L[tri(i) + p] * L[tri(j) + p];
      L[tri(i) + j] = v / d;
    }
  }
  for (int j = 0; j < n; ++j) {  // X = L^{-1}, column by column
    X[tri(j) + j] = 1.0 / L[tri(j) + j];
    for (int i = j + 1; i < n; ++i) {
      double s = 0.0;
      for (int p = j; p < i; ++p) s += L[tri(i) + p] * X[tri(p) + j];
      X[tri(i) + j] = -s / L[tri(i) + i];
    }
  }
  out[0] = 0.f;
  for (int p = 0; p < n * (n + 1) / 2; ++p) out[1 + p] = (float)X[p];
}

// Index of the best subset for one (row, group). w[j * ws] is the group's j-th weight (fp32); tab: the group's
// ns table entries; sub: ns x n subset indices.
PP_HD int nm_best_subset(const float* w, int ws, const float* __restrict__ tab, const uint8_t* __restrict__ sub,
                         int n, int ns) {
  const int E = nm_entry_floats(n);
  int best = 0;
  float bc = pp_inf();
  for (int s = 0; s < ns; ++s) {
    const float* L = tab + (size_t)s * E;
    const uint8_t* Sx = sub + (size_t)s * n;
    float c = *L++;
    for (int i = 0; i < n; ++i) {
      float acc = 0.f;
      for (int j = 0; j <= i; ++j) acc += (*L++) * w[Sx[j] * ws];
      c += acc * acc;
    }
    if (c < bc) {
      bc = c;
      best = s;
    }
  }
  return best;
}

// Bit j of the result is set for the n smallest of the group's m scores sc[j * ss] (ties: lowest j), without
// branches on the data (a branch per column mispredicts about half the time on random scores).
PP_HD uint32_t nm_smallest_bits(const float* sc, int ss, int n, int m) {
  uint32_t bits = 0;
  for (int j = 0; j < m; ++j) {
    const float v = sc[j * ss];
    int rank = 0;
    for (int q = 0; q < m; ++q) rank += (int)(sc[q * ss] < v) + ((int)(sc[q * ss] == v) & (int)(q < j));
    bits |= (uint32_t)(rank < n) << j;
  }
  return bits;
}

// Saliency selection for one (row, group): bit j of the result is set for the n smallest w_j^2 / gdiag[j * gs]
// (ties: lowest j).
PP_HD uint32_t nm_saliency_group(const float* w, int ws, const float* gdiag, int gs, int n, int m) {
  float sc[NM_MAX_M];
  for (int j = 0; j < m; ++j) sc[j] = w[j * ws] * w[j * ws] / gdiag[(size_t)j * gs];
  return nm_smallest_bits(sc, 1, n, m);
}

// Bit set of subset s (from the ns x n index table).
PP_HD uint32_t nm_subset_bits(const uint8_t* sub, int n, int s) {
  uint32_t bits = 0;
  for (int j = 0; j < n; ++j) bits |= 1u << sub[(size_t)s * n + j];
  return bits;
}

}  // namespace pyprune
