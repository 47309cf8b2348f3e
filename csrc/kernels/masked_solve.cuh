// Batched masked solve, the math of one row (docs/ALGORITHM.md section 3):
//   G[M, M] lambda = w[M],   e = U_B[:, M] lambda,   loss = 1/2 lambda^T w[M]
// written once against the Team interface (team.cuh), so the C++ CPU op (SerialTeam), the CUDA kernel (CtaTeam)
// and the threaded CPU emulation of the CUDA kernel (ThreadTeam) run the same code.
//
// Per row:
//  1. compact the mask into the ascending index list M (team prefix sums), k = |M|;
//  2. gather A = G[M, M] as a packed lower triangle in team-local ("shared") memory;
//  3. right-looking Cholesky A = L L^T in fp32 (two barriers per column; the trailing update runs warp-per-row,
//     lane-per-column so that shared-memory accesses are contiguous);
//  4. forward and backward triangular solves (vectors in fp64, one barrier per column);
//  5. one step of iterative refinement: r = w[M] - G[M, M] lambda with fp64 accumulation (G re-read from global
//     memory), solve L L^T d = r, lambda += d. This makes lambda accurate to about fp32 rounding of the inputs
//     instead of cond(G[M, M]) times it, for O(k^2) extra work next to the O(k^3 / 6) factorisation;
//  6. loss = 1/2 lambda . w[M] (fp64 accumulation), e_r = sum over M_j >= r of U_B[r, M_j] lambda_j (warp per r,
//     fp64 accumulation; U_B is upper triangular).
// Nothing of size B x B is written per row; G and U_B are only read.
//
// Status contract (the same on every backend): status = 0 for a solved row, else 1 + the block column of the first
// non-positive (or NaN) Cholesky pivot, i.e. the column j of the block at which G[M, M] stops being positive
// definite in fp32 (the torch reference reports the same number: cholesky_ex's info on the padded system). Such a
// row gets NaN in e and loss; the caller (pyprune.ops.masked_solve) raises before anything uses them.
#pragma once

#include <stddef.h>

#include "kernels/common.cuh"

namespace pyprune {

enum MsStatus { MS_DONE = 0, MS_SKIPPED = 1, MS_NOT_SPD = 2 };

// Team-local memory for rows with at most kcap pruned weights, in 4-byte words: four fp64 kcap-vectors (rhs, y,
// lambda, d), the packed fp32 triangle, two fp32 kcap-vectors (col, rdiag) and the index list.
PP_HD size_t ms_smem_words(int kcap) { return (size_t)kcap * (kcap + 1) / 2 + 11 * (size_t)kcap; }

// Rows are processed in two tiers by the number k of pruned weights: k <= ms_split(B) with a small workspace,
// then k > ms_split(B) with a workspace for k = B (so the common half-sparse rows do not pay for the worst case).
PP_HD int ms_split(int B) { return B <= 96 ? B : (B + 1) / 2; }

// First position p in the ascending list idx[0:k) with idx[p] >= r.
PP_HD int ms_lower_bound(const int* idx, int k, int r) {
  int lo = 0, hi = k;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (idx[mid] < r) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// L y = rhs (rhs is overwritten). L: strictly lower part in A (packed rows), 1 / diagonal in rdiag (a multiply,
// not a division, on the barrier-to-barrier critical path of each step).
template <class Team>
PP_HD void ms_forward(Team& t, const float* A, const float* rdiag, double* rhs, double* y, int k) {
  const int R = t.rank(), S = t.size();
  for (int j = 0; j < k; ++j) {
    const double yj = rhs[j] * (double)rdiag[j];
    if (R == 0) y[j] = yj;
    for (int i = j + 1 + R; i < k; i += S) rhs[i] -= (double)A[tri(i) + j] * yj;
    t.sync();
  }
}

// L^T x = y (y is overwritten). Row j of L is contiguous in the packed layout.
template <class Team>
PP_HD void ms_backward(Team& t, const float* A, const float* rdiag, double* y, double* x, int k) {
  const int R = t.rank(), S = t.size();
  for (int j = k - 1; j >= 0; --j) {
    const double xj = y[j] * (double)rdiag[j];
    if (R == 0) x[j] = xj;
    const float* Lj = A + tri(j);
    for (int i = R; i < j; i += S) y[i] -= (double)Lj[i] * xj;
    t.sync();
  }
}

// One row. G, U: (B, B) fp32 row-major; w: the row of W1 (B values); msk: the row of the mask (B bytes, nonzero =
// pruned); smem: ms_smem_words(kmax) words, 8-byte aligned; e: the row of E (B floats); loss, status: one value
// each. Rows whose count k lies outside [kmin, kmax] are skipped (nothing written, MS_SKIPPED). A non-positive pivot
// at position j of M writes NaN to e and loss, status = M[j] + 1, and returns MS_NOT_SPD; otherwise status = 0.
// All threads of the team call this with the same arguments.
template <class Team, class T>
PP_HD int masked_solve_row(Team& t, const float* __restrict__ G, const float* __restrict__ U,
                           const T* __restrict__ w, const uint8_t* __restrict__ msk, int B, int kmin, int kmax,
                           float* smem, float* __restrict__ e, float* __restrict__ loss,
                           int32_t* __restrict__ status) {
  const int R = t.rank(), S = t.size();
  const int ln = t.lane(), W = t.warp_size(), wp = t.warp(), NW = t.nwarps();
  const int kcap = kmax;
  double* rhs = reinterpret_cast<double*>(smem);
  double* y = rhs + kcap;
  double* lam = y + kcap;
  double* dlt = lam + kcap;
  float* A = reinterpret_cast<float*>(dlt + kcap);
  float* col = A + (size_t)kcap * (kcap + 1) / 2;
  float* rdiag = col + kcap;
  int* idx = reinterpret_cast<int*>(rdiag + kcap);

  t.sync();  // the previous row of this team may still read idx / lam

  // 1. M = positions of the mask row, ascending (team-wide exclusive scan per chunk of S columns).
  int k = 0;
  for (int c0 = 0; c0 < B; c0 += S) {
    const int c = c0 + R;
    const int f = (c < B && msk[c]) ? 1 : 0;
    int tot;
    const int pos = t.excl_scan(f, &tot);
    if (f && k + pos < kcap) idx[k + pos] = c;
    k += tot;
  }
  if (k < kmin || k > kmax) return MS_SKIPPED;
  if (k == 0) {
    for (int r = R; r < B; r += S) e[r] = 0.f;
    if (R == 0) {
      *loss = 0.f;
      *status = 0;
    }
    return MS_DONE;
  }
  t.sync();

  // 2. Gather A = G[M, M] (lower triangle, packed by rows) and rhs = w[M].
  for (int i = wp; i < k; i += NW) {
    const float* Gi = G + (size_t)idx[i] * B;
    float* Ai = A + tri(i);
    for (int j = ln; j <= i; j += W) Ai[j] = Gi[idx[j]];
  }
  for (int i = R; i < k; i += S) rhs[i] = (double)to_f32(w[idx[i]]);
  t.sync();

  // 3. Right-looking Cholesky. Column j of L goes to A (below the diagonal) and to col[] (contiguous copy for
  //    the trailing update); 1 / the diagonal of L goes to rdiag[] (A's diagonal keeps the pivots).
  int bad = -1;
  for (int j = 0; j < k; ++j) {
    const float d = A[tri(j) + j];
    if (!(d > 0.f)) {  // every thread read the same value: a uniform exit (NaN included)
      bad = j;
      break;
    }
    const float inv = 1.f / pp_sqrtf(d);
    if (R == 0) rdiag[j] = inv;
    for (int i = j + 1 + R; i < k; i += S) {
      float* p = A + tri(i) + j;
      const float v = *p * inv;
      *p = v;
      col[i] = v;
    }
    t.sync();
    for (int i = j + 1 + wp; i < k; i += NW) {
      const float a = col[i];
      float* Ai = A + tri(i);
      for (int l = j + 1 + ln; l <= i; l += W) Ai[l] = pp_fmaf(-a, col[l], Ai[l]);
    }
    t.sync();
  }
  if (bad >= 0) {
    for (int r = R; r < B; r += S) e[r] = pp_nan();
    if (R == 0) {
      *loss = pp_nan();
      *status = idx[bad] + 1;
    }
    return MS_NOT_SPD;
  }

  // 4. lambda = L^-T L^-1 w[M].
  ms_forward(t, A, rdiag, rhs, y, k);
  ms_backward(t, A, rdiag, y, lam, k);

  // 5. Refinement: rhs = w[M] - G[M, M] lambda (fp64), L L^T d = rhs, lambda += d.
  for (int i = wp; i < k; i += NW) {
    const float* Gi = G + (size_t)idx[i] * B;
    double acc = 0.0;
    for (int jb = 0; jb < k; jb += W) {
      const int j = jb + ln;
      if (j < k) acc += (double)Gi[idx[j]] * lam[j];
    }
    acc = t.warp_sum(acc);
    if (ln == 0) rhs[i] = (double)to_f32(w[idx[i]]) - acc;
  }
  t.sync();
  ms_forward(t, A, rdiag, rhs, y, k);
  ms_backward(t, A, rdiag, y, dlt, k);
  for (int i = R; i < k; i += S) lam[i] += dlt[i];
  t.sync();

  // 6. loss = 1/2 lambda . w[M]; e_r = sum over M_j >= r of U[r, M_j] lambda_j (warp per r, lanes over j).
  double part = 0.0;
  for (int i = R; i < k; i += S) part += lam[i] * (double)to_f32(w[idx[i]]);
  const double tot = t.sum(part);
  if (R == 0) {
    *loss = (float)(0.5 * tot);
    *status = 0;
  }
  for (int r = wp; r < B; r += NW) {
    const float* Ur = U + (size_t)r * B;
    const int j0 = ms_lower_bound(idx, k, r);
    double acc = 0.0;
    for (int jb = j0; jb < k; jb += W) {
      const int j = jb + ln;
      if (j < k) acc += (double)Ur[idx[j]] * lam[j];
    }
    acc = t.warp_sum(acc);
    if (ln == 0) e[r] = (float)acc;
  }
  return MS_DONE;
}

}  // namespace pyprune
