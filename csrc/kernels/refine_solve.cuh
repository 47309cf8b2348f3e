// The joint solve with exchange refinement, the math of one row of a block (docs/ALGORITHM.md section 4;
// pyprune/reference/swap.py states the exchange rule and its closed-form updates in torch). Written once
// against the Team interface (team.cuh): the C++ CPU op (SerialTeam, rows over threads), the CUDA kernel (CtaTeam,
// a block per row) and the CPU emulation of the CUDA kernel (ThreadTeam) run this code.
//
// Per row, with M the pruned positions (c of them) and K the kept ones:
//  1. compact the mask into M and K (ascending);
//  2. factor A = G[M, M] = L L^T once (right-looking Cholesky, fp32), X = L^-1 in place, Ainv = X^T X;
//     Y = X G[M, K], the Schur complements s_k = G_kk - |Y[:, k]|^2 (adding k to M), and U = X^T Y = Ainv G[M, K]
//     (every pair; N:M from a grouped start: only the entries whose pruned and kept positions share a group);
//  3. up to `rounds` exchanges: score every allowed pair (j pruned, k kept) with
//        delta = r_k t_k / 2 - (lam_j - U_jk t_k)^2 / (2 (Ainv_jj + U_jk^2 / s_k)),
//     lam = Ainv w_M, r = w_K - G[K, M] lam, t = r / s; take the smallest when it lowers the row's loss by more than
//     tol * |loss|, and update Ainv, U and s by the rank-two formulas of swap.py (no new factorisation);
//  4. the final solve from the same Ainv: lambda = Ainv w_M plus one step of iterative refinement against G[M, M]
//     with fp64 accumulation, loss = 1/2 lambda . w_M, e = U_B[:, M] lambda.
// Outputs: e, loss, status (as masked_solve: 0, or 1 + the block column of the first non-positive pivot, with NaN
// in e and loss), the final mask row and the number of exchanges made.
//
// The row's code is three functions (rs_row_begin: step 1; rs_row_setup: step 2; rs_row_finish: steps 3 and 4),
// which refine_solve_row runs in turn. The CPU op's specialisation of step 2 sits at the end of this file
// (refine_solve_rows8 / rs8_setup): eight rows of a block with the same count of pruned weights go through step 2
// together, one row per lane of 8-wide vectors, with the same arithmetic per entry as the one-row code (the same
// bits; tested against the one-row path, pyprune._refine_solve_rowwise), since one row's short triangular loops
// (lengths below c ~ 64) leave most of a vector unit idle. Steps 3 and 4 stay per row (the exchanges differ per row).
#pragma once

#include <stddef.h>

#include "kernels/common.cuh"
#include "kernels/masked_solve.cuh"
#include "kernels/team.cuh"

#if !defined(__CUDACC__) && defined(PP_RS_FMA) && defined(__x86_64__)
#include <immintrin.h>
#define PP_RS_X86_FMA 1
#endif

// Phase timers for benchmarks/bench_refine_solve_phases.py, which defines PP_RS_PHASE_TIMERS and pp_rs_phase(i)
// (charge the time since the previous call to phase i; i < 0: start) before including this header; compiled out
// everywhere else.
#if defined(PP_RS_PHASE_TIMERS) && !defined(__CUDACC__)
#define PP_RS_PHASE(i) pp_rs_phase(i)
#else
#define PP_RS_PHASE(i) ((void)0)
#endif

namespace pyprune {

// Fused multiply-add where the target has it (the CPU op compiles this header for AVX2 + FMA and defines PP_RS_FMA:
// csrc/cpu/refine_solve.cpp).
PP_HD float rs_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#elif defined(__FMA__) || defined(PP_RS_FMA)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

PP_HD float rs_max(float a, float b) { return a > b ? a : b; }

// Team-local memory (4-byte words) for rows with at most kcap pruned weights of B, groups of m (0: none): two fp64
// B-vectors, two int B-vectors, fourteen fp32 B-vectors, Ainv and X (kcap x kcap each), Y / U (kcap x (B - c)) and
// U's in-group entries (kcap x m at most).
PP_HD size_t rs_smem_words(int kcap, int B, int m) {
  return 2 * (size_t)kcap * kcap + (size_t)kcap * (B + (m > 0 ? m : 0)) + 20 * (size_t)B + 8;
}
// the same for the CPU op (one-thread teams pad the rows of X and Ainv: refine_solve_row's cs; past Ug, the scores
// and the slot map of rs_row_finish, as large as Ug each)
PP_HD size_t rs_host_words(int B) {
  const size_t cs = ((size_t)(B + 7) / 8) * 8 + 8;
  return 2 * cs * B + (size_t)2 * B * B + 20 * (size_t)B + 16;
}


#if !defined(__CUDACC__)
// One-thread teams (the CPU op): the two reductions of the row code in 8-wide vector registers (GCC/Clang vector
// extensions; the compiler does not vectorise float reductions by itself without reassociation flags).
typedef float rs_v8 __attribute__((vector_size(32)));

inline rs_v8 rs_load8(const float* p) {
  rs_v8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline void rs_store8(float* p, rs_v8 v) { __builtin_memcpy(p, &v, sizeof v); }

typedef int rs_v8i __attribute__((vector_size(32)));

inline rs_v8i rs_load8i(const int* p) {
  rs_v8i v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// lane r = base[off[r]]
inline rs_v8 rs_gather8(const float* base, rs_v8i off) {
#ifdef PP_RS_X86_FMA
  return (rs_v8)_mm256_i32gather_ps(base, (__m256i)off, 4);
#else
  rs_v8 v;
  for (int l = 0; l < 8; ++l) v[l] = base[off[l]];
  return v;
#endif
}

// Per kept slot q < n of rs_row_finish's scoring round: t = (w_K - y_K) / s', the score's first term r = (w_K -
// y_K) t / 2 and 1 / s', with s' = max(s, tiny) (whole vectors; the same arithmetic as the team loop)
inline void rs_kept_terms_host(float* __restrict__ tq, float* __restrict__ r, float* __restrict__ isq,
                               const float* __restrict__ wK, const float* __restrict__ yK, const float* __restrict__ s,
                               float tiny, int n) {
  const rs_v8 tv = {tiny, tiny, tiny, tiny, tiny, tiny, tiny, tiny}, one = {1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f};
  const rs_v8 half = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f};
  int q = 0;
  for (; q + 8 <= n; q += 8) {
    const rs_v8 v = rs_load8(wK + q) - rs_load8(yK + q), sv = rs_load8(s + q);
    const rs_v8 sq = sv > tv ? sv : tv;
    const rs_v8 tt = v / sq;
    rs_store8(tq + q, tt);
    rs_store8(r + q, half * v * tt);
    rs_store8(isq + q, one / sq);
  }
  for (; q < n; ++q) {
    const float v = wK[q] - yK[q], sq = s[q] > tiny ? s[q] : tiny;
    const float tt = v / sq;
    tq[q] = tt;
    r[q] = 0.5f * v * tt;
    isq[q] = 1.f / sq;
  }
}

// lane j = v[idx[j]]
inline rs_v8 rs_perm8(rs_v8 v, rs_v8i idx) {
#ifdef PP_RS_X86_FMA
  return (rs_v8)_mm256_permutevar8x32_ps((__m256)v, (__m256i)idx);
#else
  rs_v8 o;
  for (int l = 0; l < 8; ++l) o[l] = v[idx[l]];
  return o;
#endif
}

// The vectors of pruned-slot values (lam, Ainv_pp, ...) that rs_row_finish's grouped loops pair with kept slots
// q .. q + 7 of row a of Ug's order (x = a K + q, pruned slot p = pg[x] = (q / kg) nn + a): a gather through pg,
// or, when nn == kg and kg divides 8 (2:4, 4:8, 8:16: then c == K and the eight p lie in q .. q + 7), a permutation
// of the eight values at q (lane j takes (j / kg) kg + a), which needs no gather.
struct RsGroupLanes {
  bool perm;
  int kg;
  PP_HD RsGroupLanes(int nn, int kg_) : perm(nn == kg_ && 8 % kg_ == 0), kg(kg_) {}
  rs_v8i ctrl(int a) const {
    rs_v8i c;
    for (int j = 0; j < 8; ++j) c[j] = (j / kg) * kg + a;
    return c;
  }
  // the values src[p] for x = a K + q .. + 7 (ctl = ctrl(a), pgx = pg + x)
  rs_v8 get(const float* src, int q, const int* pgx, rs_v8i ctl) const {
    return perm ? rs_perm8(rs_load8(src + q), ctl) : rs_gather8(src, rs_load8i(pgx));
  }
};

// The non-grouped rounds of rs_row_finish, every pair at once: the smallest score r_q - (lam_p - u t_q)^2 / 2 /
// (Ainv_pp + u^2 / s_q), u = U[p][q] (row p of U at U + p K), over pruned slots p < c and kept slots q < K, and its
// position p K + q (of equal ones the first), kept per vector lane as (value, position): no store and no reduction
// per pruned slot (those cost more than the scores: 6% of the 50% engine). With m > 0 only the pairs of one group
// count (gq[q] == gp[p]). Returns +inf (position unchanged) when no pair scores below +inf (NaN never wins).
inline float rs_pair_scores_host(int* __restrict__ pos, const float* __restrict__ U, const float* __restrict__ lam,
                                 const float* __restrict__ Ai, size_t cs, const int* __restrict__ gp,
                                 const int* __restrict__ gq, const float* __restrict__ tq,
                                 const float* __restrict__ isq, const float* __restrict__ r, int c, int K) {
  const float inf = pp_inf();
  const rs_v8 half = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f};
  const rs_v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  rs_v8 vbest = {inf, inf, inf, inf, inf, inf, inf, inf};
  rs_v8i vpos = {0, 0, 0, 0, 0, 0, 0, 0};
  float tbest = inf;  // the pairs past the last whole vector of a row
  int tpos = 0;
  const int K8 = K & ~7;
  for (int p = 0; p < c; ++p) {
    const float lp = lam[p], ap = Ai[(size_t)p * cs + p];
    const rs_v8 lpv = {lp, lp, lp, lp, lp, lp, lp, lp}, apv = {ap, ap, ap, ap, ap, ap, ap, ap};
    const int g = gp ? gp[p] : 0;
    const rs_v8i gv = {g, g, g, g, g, g, g, g};
    const float* Up = U + (size_t)p * K;
    for (int q = 0; q < K8; q += 8) {
      const rs_v8 u = rs_load8(Up + q), rv = rs_load8(r + q);
      const rs_v8 num = lpv - u * rs_load8(tq + q);
      rs_v8 sc = rv - half * num * num / (apv + u * u * rs_load8(isq + q));
      if (gq) {
        const rs_v8 infv = {inf, inf, inf, inf, inf, inf, inf, inf};
        sc = rs_load8i(gq + q) == gv ? sc : infv;
      }
      const rs_v8i lt = sc < vbest;
      const int at = p * K + q;
      const rs_v8i atv = {at, at, at, at, at, at, at, at};
      vbest = lt ? sc : vbest;
      vpos = lt ? atv + lane : vpos;
    }
    for (int q = K8; q < K; ++q) {
      if (gq && gq[q] != g) continue;
      const float u = Up[q];
      const float num = lp - u * tq[q];
      const float sc = r[q] - 0.5f * num * num / (ap + u * u * isq[q]);
      if (sc < tbest) {
        tbest = sc;
        tpos = p * K + q;
      }
    }
  }
  float best = tbest;
  int bp = tpos;
  for (int l = 0; l < 8; ++l)
    if (vbest[l] < best || (vbest[l] == best && vbest[l] < inf && vpos[l] < bp)) {
      best = vbest[l];
      bp = vpos[l];
    }
  if (best < inf) *pos = bp;
  return best;
}

// Ug's order, whole vectors then the rest: vec(x, q, at) for x = a K + q, q a multiple of 8 with q + 8 <= K, where
// at(src) gives the pruned-slot values src[pg[x .. x + 7]]; tail(x, q, p) for the entries past the last vector.
template <class Vec, class Tail>
inline void rs_group_each(const int* pg, int nn, int kg, int K, Vec&& vec, Tail&& tail) {
  const RsGroupLanes gl(nn, kg);
  for (int a = 0; a < nn; ++a) {
    const rs_v8i ctl = gl.ctrl(a);
    int q = 0;
    for (; q + 8 <= K; q += 8) {
      const int x = a * K + q;
      vec(x, q, [&](const float* src) { return gl.get(src, q, pg + x, ctl); });
    }
    for (; q < K; ++q) tail(a * K + q, q, pg[a * K + q]);
  }
}

// The grouped scores of rs_row_finish over whole vectors: sc[x] = r[q] - (lam_p - u t_q)^2 / 2 / (Ainv_pp + u^2 / s_q)
// for x = a K + q (a < nn, q < K), u = Ug[x], p = pg[x], Ainv_pp = ad[p]; tq, isq, r per kept slot.
inline void rs_group_scores_host(float* __restrict__ sc, const float* __restrict__ Ug, const int* __restrict__ pg,
                                 const float* __restrict__ lam, const float* __restrict__ ad,
                                 const float* __restrict__ tq, const float* __restrict__ isq,
                                 const float* __restrict__ r, int nn, int kg, int K) {
  const rs_v8 half = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f};
  rs_group_each(
      pg, nn, kg, K,
      [&](int x, int q, auto at) {
        const rs_v8 u = rs_load8(Ug + x);
        const rs_v8 num = at(lam) - u * rs_load8(tq + q), den = at(ad) + u * u * rs_load8(isq + q);
        rs_store8(sc + x, rs_load8(r + q) - half * num * num / den);
      },
      [&](int x, int q, int p) {
        const float u = Ug[x];
        const float num = lam[p] - u * tq[q];
        sc[x] = r[q] - 0.5f * num * num / (ad[p] + u * u * isq[q]);
      });
}

// Ug[x] += -av_p ia urow[q] + vv_p is vg[q] for x = a K + q, p = pg[x]: the in-group entries of U after an exchange
// (rs_row_finish then sets the exchanged kept slot's own entries)
inline void rs_group_update_host(float* __restrict__ Ug, const int* __restrict__ pg, const float* __restrict__ av,
                                 const float* __restrict__ vv, float ia, float is, const float* __restrict__ urow,
                                 const float* __restrict__ vg, int nn, int kg, int K) {
  const rs_v8 iav = {ia, ia, ia, ia, ia, ia, ia, ia}, isv = {is, is, is, is, is, is, is, is};
  rs_group_each(
      pg, nn, kg, K,
      [&](int x, int q, auto at) {
        const rs_v8 ca = at(av) * iav, cv = at(vv) * isv;
        rs_store8(Ug + x, rs_load8(Ug + x) - ca * rs_load8(urow + q) + cv * rs_load8(vg + q));
      },
      [&](int x, int q, int p) { Ug[x] = Ug[x] - av[p] * ia * urow[q] + vv[p] * is * vg[q]; });
}

// a x + y in one rounding per lane where the target has FMA (the CPU op), else a x + y
inline rs_v8 rs_fma8(rs_v8 a, rs_v8 x, rs_v8 y) {
#ifdef PP_RS_X86_FMA
  return (rs_v8)_mm256_fmadd_ps((__m256)a, (__m256)x, (__m256)y);
#else
  return a * x + y;
#endif
}

inline float rs_dot_host(const float* __restrict__ a, const float* __restrict__ b, int n) {
  rs_v8 acc0 = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, acc1 = acc0;
  int j = 0;
  for (; j + 16 <= n; j += 16) {
    acc0 = rs_fma8(rs_load8(a + j), rs_load8(b + j), acc0);
    acc1 = rs_fma8(rs_load8(a + j + 8), rs_load8(b + j + 8), acc1);
  }
  if (j + 8 <= n) {
    acc0 = rs_fma8(rs_load8(a + j), rs_load8(b + j), acc0);
    j += 8;
  }
  acc0 += acc1;
  float tail = 0.f;
  for (; j < n; ++j) tail = rs_fma(a[j], b[j], tail);
  return ((acc0[0] + acc0[4]) + (acc0[1] + acc0[5])) + ((acc0[2] + acc0[6]) + (acc0[3] + acc0[7])) + tail;
}

// y[0..n) += a x[0..n) + b w[0..n)
inline void rs_axpy2_host(float* __restrict__ y, float a, const float* __restrict__ x, float b,
                          const float* __restrict__ w, int n) {
  const rs_v8 av = {a, a, a, a, a, a, a, a}, bv = {b, b, b, b, b, b, b, b};
  int j = 0;
  for (; j + 8 <= n; j += 8)
    rs_store8(y + j, rs_fma8(av, rs_load8(x + j), rs_fma8(bv, rs_load8(w + j), rs_load8(y + j))));
  for (; j < n; ++j) y[j] = rs_fma(a, x[j], rs_fma(b, w[j], y[j]));
}

// y[0..ceil8(n)) += a x[0..ceil8(n)): whole vectors only (the caller guarantees the room and harmless extras)
inline void rs_axpy_host_r8(float* __restrict__ y, float a, const float* __restrict__ x, int n) {
  const rs_v8 av = {a, a, a, a, a, a, a, a};
  for (int j = 0; j < n; j += 8) rs_store8(y + j, rs_fma8(av, rs_load8(x + j), rs_load8(y + j)));
}

// y[0..len) = sum over i < n of coef[i] row_i[0..len), row_i = base + (idx ? idx[i] : i) * ld: 64 outputs at a
// time held in eight vector registers across every row (one load per 8 multiply-adds, no store until the end), so
// y may be one of the rows (each chunk is read before it is written).
inline void rs_gemv_host(float* y, const float* base, size_t ld, const int* idx, const float* coef, int n, int len) {
  int j0 = 0;
  for (; j0 + 64 <= len; j0 += 64) {
    rs_v8 acc[8];
    for (int v = 0; v < 8; ++v) acc[v] = rs_v8{0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < n; ++i) {
      const float* x = base + (size_t)(idx ? idx[i] : i) * ld + j0;
      const float c = coef[i];
      const rs_v8 cv = {c, c, c, c, c, c, c, c};
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) acc[v] = rs_fma8(cv, rs_load8(x + 8 * v), acc[v]);
    }
    for (int v = 0; v < 8; ++v) rs_store8(y + j0 + 8 * v, acc[v]);
  }
  for (; j0 + 8 <= len; j0 += 8) {
    rs_v8 acc = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < n; ++i) {
      const float c = coef[i];
      acc = rs_fma8(rs_v8{c, c, c, c, c, c, c, c}, rs_load8(base + (size_t)(idx ? idx[i] : i) * ld + j0), acc);
    }
    rs_store8(y + j0, acc);
  }
  for (; j0 < len; ++j0) {
    float acc = 0.f;
    for (int i = 0; i < n; ++i) acc = rs_fma(coef[i], base[(size_t)(idx ? idx[i] : i) * ld + j0], acc);
    y[j0] = acc;
  }
}

// y[0..len) = sum over i < n of coef[i] row_i[0..len) in fp64, row_i = base + (idx ? idx[i] : i) * ld (fp32 rows;
// i ascending from zero; 16 outputs at a time in four 4-wide fp64 accumulators)
inline void rs_gemv64_host(double* __restrict__ y, const float* base, size_t ld, const int* idx,
                           const double* __restrict__ coef, int n, int len) {
  typedef double rs_v4d __attribute__((vector_size(32)));
  typedef float rs_v4f __attribute__((vector_size(16)));
  auto row = [&](int i) { return base + (size_t)(idx ? idx[i] : i) * ld; };
  int j0 = 0;
  for (; j0 + 16 <= len; j0 += 16) {
    rs_v4d acc[4] = {};
    for (int i = 0; i < n; ++i) {
      const double cf = coef[i];
      const rs_v4d cv = {cf, cf, cf, cf};
      const float* x = row(i) + j0;
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        rs_v4f f;
        __builtin_memcpy(&f, x + 4 * v, sizeof f);
        acc[v] += cv * __builtin_convertvector(f, rs_v4d);
      }
    }
    __builtin_memcpy(y + j0, acc, sizeof acc);
  }
  for (; j0 < len; ++j0) {
    double acc = 0.0;
    for (int i = 0; i < n; ++i) acc += coef[i] * (double)row(i)[j0];
    y[j0] = acc;
  }
}

// sum over j < n of a[j] b[j] in fp64 (fp32 inputs; four fp64 lanes, two accumulators)
inline double rs_dot_ff64_host(const float* __restrict__ a, const float* __restrict__ b, int n) {
  typedef double rs_v4d __attribute__((vector_size(32)));
  typedef float rs_v4f __attribute__((vector_size(16)));
  rs_v4d acc0 = {0.0, 0.0, 0.0, 0.0}, acc1 = acc0;
  auto ld = [&](int j) {
    rs_v4f x, y;
    __builtin_memcpy(&x, a + j, sizeof x);
    __builtin_memcpy(&y, b + j, sizeof y);
    return __builtin_convertvector(x, rs_v4d) * __builtin_convertvector(y, rs_v4d);
  };
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    acc0 += ld(j);
    acc1 += ld(j + 4);
  }
  if (j + 4 <= n) {
    acc0 += ld(j);
    j += 4;
  }
  acc0 += acc1;
  double out = (acc0[0] + acc0[2]) + (acc0[1] + acc0[3]);
  for (; j < n; ++j) out += (double)a[j] * (double)b[j];
  return out;
}

// rows i < nrows of A (row stride ld): A_i[0..n) += ca_i a[0..n) + cv_i v[0..n) with ca_i = -a[i] ia, cv_i = v[i] is
// (a rank-two update; the same arithmetic as rs_axpy2_host row by row), a and v held in registers 32 columns at a
// time
inline void rs_rank2_host(float* A, size_t ld, int nrows, const float* __restrict__ ca, float ia,
                          const float* __restrict__ cv, float is, const float* __restrict__ a,
                          const float* __restrict__ v, int n) {
  int j0 = 0;
  for (; j0 + 32 <= n; j0 += 32) {
    rs_v8 av[4], vv[4];
    for (int x = 0; x < 4; ++x) {
      av[x] = rs_load8(a + j0 + 8 * x);
      vv[x] = rs_load8(v + j0 + 8 * x);
    }
    for (int i = 0; i < nrows; ++i) {
      const float c1 = -ca[i] * ia, c2 = cv[i] * is;
      const rs_v8 c1v = {c1, c1, c1, c1, c1, c1, c1, c1}, c2v = {c2, c2, c2, c2, c2, c2, c2, c2};
      float* y = A + (size_t)i * ld + j0;
#pragma GCC unroll 4
      for (int x = 0; x < 4; ++x) rs_store8(y + 8 * x, rs_fma8(c1v, av[x], rs_fma8(c2v, vv[x], rs_load8(y + 8 * x))));
    }
  }
  if (j0 < n)
    for (int i = 0; i < nrows; ++i)
      rs_axpy2_host(A + (size_t)i * ld + j0, -ca[i] * ia, a + j0, cv[i] * is, v + j0, n - j0);
}

// y1 = sum over i < n of c1[i] row_i, y2 = sum of c2[i] row'_i (len columns; i ascending from zero, as
// rs_gemv_host), row_i = row'_i = base + idx[i] * ld except row_p = base + r1 * ld, row'_p = base + r2 * ld: two
// products of one matrix's rows that differ in one row, each row read once
inline void rs_gemv2_host(float* __restrict__ y1, const float* __restrict__ c1, float* __restrict__ y2,
                          const float* __restrict__ c2, const float* base, size_t ld, const int* idx, int n, int len,
                          int p, int r1, int r2) {
  int j0 = 0;
  for (; j0 + 32 <= len; j0 += 32) {
    rs_v8 a1[4], a2[4];
    for (int x = 0; x < 4; ++x) a1[x] = a2[x] = rs_v8{0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < n; ++i) {
      const float u1 = c1[i], u2 = c2[i];
      const rs_v8 u1v = {u1, u1, u1, u1, u1, u1, u1, u1}, u2v = {u2, u2, u2, u2, u2, u2, u2, u2};
      if (i != p) {
        const float* x0 = base + (size_t)idx[i] * ld + j0;
#pragma GCC unroll 4
        for (int x = 0; x < 4; ++x) {
          const rs_v8 g = rs_load8(x0 + 8 * x);
          a1[x] = rs_fma8(u1v, g, a1[x]);
          a2[x] = rs_fma8(u2v, g, a2[x]);
        }
      } else {
        const float* x1 = base + (size_t)r1 * ld + j0;
        const float* x2 = base + (size_t)r2 * ld + j0;
        for (int x = 0; x < 4; ++x) {
          a1[x] = rs_fma8(u1v, rs_load8(x1 + 8 * x), a1[x]);
          a2[x] = rs_fma8(u2v, rs_load8(x2 + 8 * x), a2[x]);
        }
      }
    }
    for (int x = 0; x < 4; ++x) {
      rs_store8(y1 + j0 + 8 * x, a1[x]);
      rs_store8(y2 + j0 + 8 * x, a2[x]);
    }
  }
  for (; j0 < len; ++j0) {
    float s1 = 0.f, s2 = 0.f;
    for (int i = 0; i < n; ++i) {
      s1 = rs_fma(c1[i], base[(size_t)(i == p ? r1 : idx[i]) * ld + j0], s1);
      s2 = rs_fma(c2[i], base[(size_t)(i == p ? r2 : idx[i]) * ld + j0], s2);
    }
    y1[j0] = s1;
    y2[j0] = s2;
  }
}

// min over x[0..n) (NaN entries never win; +inf when every entry is NaN or n == 0)
inline float rs_min_host(const float* x, int n) {
  const float inf = pp_inf();
  rs_v8 mn = {inf, inf, inf, inf, inf, inf, inf, inf};
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    const rs_v8 v = rs_load8(x + j);
    mn = v < mn ? v : mn;
  }
  float out = inf;
  for (int l = 0; l < 8; ++l) out = mn[l] < out ? mn[l] : out;
  for (; j < n; ++j) out = x[j] < out ? x[j] : out;
  return out;
}
#endif

// sum_j a[j] b[j] over j < n by the lanes of one warp (every lane gets it).
template <class Team>
PP_HD float rs_dot(Team& t, const float* __restrict__ a, const float* __restrict__ b, int n) {
  if constexpr (Team::kSerial) {
#if !defined(__CUDACC__)
    return rs_dot_host(a, b, n);
#else
    float acc = 0.f;
    for (int j = 0; j < n; ++j) acc = rs_fma(a[j], b[j], acc);
    return acc;
#endif
  } else {
    const int ln = t.lane(), W = t.warp_size();
    float acc = 0.f;
    for (int j = ln; j < n; j += W) acc = rs_fma(a[j], b[j], acc);
    return (float)t.warp_sum((double)acc);
  }
}

// y[lo..hi) += a x[lo..hi): by the lanes of one warp (lanes; one-thread teams: rounded up to whole vectors,
// rs_axpy_host_r8), by the whole team (team), by one thread (one). One-thread teams take the register-blocked
// rs_gemv_host wherever team and one are used, so those two are the generic (CUDA and emulation) loops.
template <class Team>
PP_HD void rs_axpy_lanes(Team& t, float* y, float a, const float* x, int lo, int hi) {
  if constexpr (Team::kSerial) {
#if !defined(__CUDACC__)
    if (hi > lo) rs_axpy_host_r8(y + lo, a, x + lo, hi - lo);
    return;
#endif
  }
  const int ln = t.lane(), W = t.warp_size();
  for (int l = lo + ln; l < hi; l += W) y[l] = rs_fma(a, x[l], y[l]);
}

template <class Team>
PP_HD void rs_axpy_team(Team& t, float* y, float a, const float* x, int lo, int hi) {
  const int R = t.rank(), S = t.size();
  for (int l = lo + R; l < hi; l += S) y[l] = rs_fma(a, x[l], y[l]);
}

PP_HD void rs_axpy_one(float* y, float a, const float* x, int n) {
  for (int l = 0; l < n; ++l) y[l] = rs_fma(a, x[l], y[l]);
}

// y[j] = sum over i < n of coef[i] rows_i[j], j < len, with rows_i = base + (idx ? idx[i] : i) * ld: a symmetric
// matrix times a vector written as a sum of its rows (no horizontal sums; the team splits j). Ends with a barrier.
template <class Team>
PP_HD void rs_combine(Team& t, float* y, const float* base, size_t ld, const int* idx, const float* coef, int n,
                      int len) {
  if constexpr (Team::kSerial) {
#if !defined(__CUDACC__)
    rs_gemv_host(y, base, ld, idx, coef, n, len);
    return;
#endif
  }
  const int R = t.rank(), S = t.size();
  for (int j = R; j < len; j += S) {
    float acc = 0.f;
    for (int i = 0; i < n; ++i) acc = rs_fma(coef[i], base[(size_t)(idx ? idx[i] : i) * ld + j], acc);
    y[j] = acc;
  }
  t.sync();
}

// One row's workspace (refine_solve_row's layout of ws) and what its first step found: the pruned (iM, c) and kept
// (iK, K) positions, the row stride cs of Ai and X, and the N:M grouping (nn pruned and kg kept per group).
struct RsRow {
  double *lam64, *res64;
  int *iM, *iK;
  float *wM, *wK, *lam, *r, *tq, *s, *av, *bv, *vv, *urow, *vg, *z, *tmp, *yK, *Ai, *X, *Y, *Ug;
  int c, K, cs, nn, kg;
  bool grouped;
};

// The three steps of refine_solve_row share these names (every step unpacks the row).
#define RS_ROW_UNPACK(rw)                                                                                           \
  double* const lam64 = rw.lam64;                                                                                   \
  double* const res64 = rw.res64;                                                                                   \
  int* const iM = rw.iM;                                                                                            \
  int* const iK = rw.iK;                                                                                            \
  float *const wM = rw.wM, *const wK = rw.wK, *const lam = rw.lam, *const r = rw.r, *const tq = rw.tq;              \
  float *const s = rw.s, *const av = rw.av, *const bv = rw.bv, *const vv = rw.vv, *const urow = rw.urow;            \
  float *const vg = rw.vg, *const z = rw.z, *const tmp = rw.tmp, *const yK = rw.yK, *const Ai = rw.Ai;              \
  float *const X = rw.X, *const Y = rw.Y, *const Ug = rw.Ug;                                                        \
  const int c = rw.c, K = rw.K, cs = rw.cs, nn = rw.nn, kg = rw.kg;                                                 \
  const bool grouped = rw.grouped;                                                                                  \
  (void)lam64, (void)res64, (void)iM, (void)iK, (void)wM, (void)wK, (void)lam, (void)r, (void)tq, (void)s, (void)av, \
      (void)bv, (void)vv, (void)urow, (void)vg, (void)z, (void)tmp, (void)yK, (void)Ai, (void)X, (void)Y, (void)Ug,  \
      (void)c, (void)K, (void)cs, (void)nn, (void)kg, (void)grouped

// Step 1 of a row: M and K, its weights, the N:M grouping; the row's outputs when it prunes nothing. Returns -1 when
// the row goes on to rs_row_setup, else MS_SKIPPED (count outside [kmin, kmax]) or MS_DONE (c = 0).
template <class Team, class T>
PP_HD int rs_row_begin(Team& t, const T* __restrict__ w, const uint8_t* __restrict__ msk, int B, int m, int kmin,
                       int kmax, float* ws, float* __restrict__ e, float* __restrict__ loss,
                       int32_t* __restrict__ status, uint8_t* __restrict__ mout, int32_t* __restrict__ nswaps,
                       RsRow& rw) {
  const int R = t.rank(), S = t.size();
  double* lam64 = reinterpret_cast<double*>(ws);
  double* res64 = lam64 + B;
  int* iM = reinterpret_cast<int*>(res64 + B);
  int* iK = iM + B;
  float* wM = reinterpret_cast<float*>(iK + B);
  float* wK = wM + B;
  rw.lam64 = lam64;
  rw.res64 = res64;
  rw.iM = iM;
  rw.iK = iK;
  rw.wM = wM;
  rw.wK = wK;
  rw.lam = wK + B;
  rw.r = rw.lam + B;
  rw.tq = rw.r + B;
  rw.s = rw.tq + B;
  rw.av = rw.s + B;
  rw.bv = rw.av + B;
  rw.vv = rw.bv + B;
  rw.urow = rw.vv + B;
  rw.vg = rw.urow + B;
  rw.z = rw.vg + B;
  rw.tmp = rw.z + B;
  rw.yK = rw.tmp + B;  // (G[:, M] lam)[K], kept up to date through the exchanges
  rw.Ai = rw.yK + B;
  float* const Ai = rw.Ai;

  t.sync();  // the previous row of this team may still read the workspace

  // 1. M and K, ascending (team-wide exclusive scans per chunk of S columns).
  int c = 0, K = 0;
  for (int c0 = 0; c0 < B; c0 += S) {
    const int col = c0 + R;
    const int f = (col < B && msk[col]) ? 1 : 0;
    const int g = (col < B && !msk[col]) ? 1 : 0;
    int tf, tg;
    const int pf = t.excl_scan(f, &tf);
    const int pg = t.excl_scan(g, &tg);
    if (f) iM[c + pf] = col;
    if (g) iK[K + pg] = col;
    c += tf;
    K += tg;
  }
  t.sync();
  if (c < kmin || c > kmax) return MS_SKIPPED;
  // X and Ainv rows: stride cs; one-thread teams pad it (a multiple of 8, plus 8) so that the triangular loops run
  // whole vectors: the entries past a row's end are scratch (X's are kept zero where they are read).
  const int cs = Team::kSerial ? ((c + 7) / 8) * 8 + 8 : c;
  float* X = Ai + (size_t)cs * c;
  float* Y = X + (size_t)cs * c;     // c x K: G[M, K], then Y, then U (every pair)
  float* Ug = Y + (size_t)c * K;     // U's in-group entries (grouped N:M): U[p][q] at (p % nn) K + q
  rw.c = c;
  rw.K = K;
  rw.cs = cs;
  rw.X = X;
  rw.Y = Y;
  rw.Ug = Ug;
  if (c == 0) {
    for (int j = R; j < B; j += S) {
      e[j] = 0.f;
      mout[j] = 0;
    }
    if (R == 0) {
      *loss = 0.f;
      *status = 0;
      *nswaps = 0;
    }
    return MS_DONE;
  }
  // N:M from a grouped start (every group of m holds nn pruned weights): the slots of M and K come group by group,
  // and exchanges keep every slot in its group, so pruned slot p and kept slot q share group p / nn == q / kg.
  int nn = 0, kg = 0;
  bool grouped = false;
  if (m > 0 && B % m == 0 && c % (B / m) == 0) {
    nn = c / (B / m);
    kg = m - nn;
    if (nn > 0 && nn < m) {
      double badg = 0.0;
      for (int g = R; g < B / m; g += S) {
        int cnt = 0;
        for (int x = 0; x < m; ++x) cnt += msk[g * m + x] ? 1 : 0;
        badg += cnt != nn ? 1.0 : 0.0;
      }
      grouped = t.sum(badg) == 0.0;
    }
  }
  rw.nn = nn;
  rw.kg = kg;
  rw.grouped = grouped;
  for (int i = R; i < c; i += S) wM[i] = to_f32(w[iM[i]]);
  for (int q = R; q < K; q += S) wK[q] = to_f32(w[iK[q]]);
  return -1;
}

// Step 2 of a row: factor G[M, M], Ainv, Y, s and U (or U's in-group entries). Returns -1 when the row goes on to
// rs_row_finish, else MS_NOT_SPD (its outputs written: NaN, status, the starting mask).
template <class Team>
PP_HD int rs_row_setup(Team& t, const float* __restrict__ G, const uint8_t* __restrict__ msk, int B, RsRow& rw,
                       float* __restrict__ e, float* __restrict__ loss, int32_t* __restrict__ status,
                       uint8_t* __restrict__ mout, int32_t* __restrict__ nswaps) {
  const int R = t.rank(), S = t.size();
  const int ln = t.lane(), W = t.warp_size(), wp = t.warp(), NW = t.nwarps();
  (void)ln, (void)W;
  RS_ROW_UNPACK(rw);
  // 2. A = G[M, M] (lower triangle) into X, G[M, K] into Y.
  for (int i = wp; i < c; i += NW) {
    const float* Gi = G + (size_t)iM[i] * B;
    float* Xi = X + (size_t)i * cs;
    for (int j = ln; j <= i; j += W) Xi[j] = Gi[iM[j]];
    float* Yi = Y + (size_t)i * K;
    for (int q = ln; q < K; q += W) Yi[q] = Gi[iK[q]];
  }
  t.sync();

  // Cholesky A = L L^T in X (strictly lower part; 1 / the diagonal in rdiag). Column j is copied to tmp for the
  // trailing update, which runs warp per row, lane per column.
  float* rdiag = vv;
  int bad = -1;
  for (int j = 0; j < c; ++j) {
    const float d = X[(size_t)j * cs + j];
    if (!(d > 0.f)) {  // every thread read the same value: a uniform exit (NaN included)
      bad = j;
      break;
    }
    const float inv = 1.f / pp_sqrtf(d);
    if (R == 0) rdiag[j] = inv;
    for (int i = j + 1 + R; i < c; i += S) {
      float* p = X + (size_t)i * cs + j;
      const float v = *p * inv;
      *p = v;
      tmp[i] = v;
    }
    t.sync();
    for (int i = j + 1 + wp; i < c; i += NW) {
      const float a = tmp[i];
      float* Xi = X + (size_t)i * cs;
      rs_axpy_lanes(t, Xi, -a, tmp, j + 1, i + 1);
    }
    t.sync();
  }
  if (bad >= 0) {
    for (int j = R; j < B; j += S) {
      e[j] = pp_nan();
      mout[j] = msk[j] ? 1 : 0;
    }
    if (R == 0) {
      *loss = pp_nan();
      *status = iM[bad] + 1;
      *nswaps = 0;
    }
    return MS_NOT_SPD;
  }

  // X = L^-1 in place, row by row: row i of L is read only to make row i of L^-1.
  for (int i = 0; i < c; ++i) {
    float* Xi = X + (size_t)i * cs;
#if !defined(__CUDACC__)
    if constexpr (Team::kSerial) {  // tmp = sum over q < i of L[i][q] X[q] (X rows are zero past their end)
      rs_gemv_host(tmp, X, cs, nullptr, Xi, i, ((i + 7) / 8) * 8);
    } else
#endif
    {
      for (int l = R; l < i; l += S) tmp[l] = 0.f;
      for (int q = 0; q < i; ++q) rs_axpy_team(t, tmp, Xi[q], X + (size_t)q * cs, 0, q + 1);
    }
    t.sync();
    const float di = rdiag[i];
    for (int l = R; l < i; l += S) Xi[l] = -di * tmp[l];
    if (R == 0) Xi[i] = di;
    for (int l = i + 1 + R; l < cs; l += S) Xi[l] = 0.f;
    t.sync();
  }

  // Ainv = X^T X: row i (lower part) = sum over q >= i of X[q][i] X[q][0..i]; then mirrored.
  for (int i = R; i < c; i += S) {
    float* Ar = Ai + (size_t)i * cs;
#if !defined(__CUDACC__)
    if constexpr (Team::kSerial) {  // past i: scratch, overwritten by the mirror
      for (int q = i; q < c; ++q) tmp[q] = X[(size_t)q * cs + i];
      rs_gemv_host(Ar, X + (size_t)i * cs, cs, nullptr, tmp + i, c - i, ((i + 8) / 8) * 8);
      continue;
    }
#endif
    for (int l = 0; l <= i; ++l) Ar[l] = 0.f;
    for (int q = i; q < c; ++q) rs_axpy_one(Ar, X[(size_t)q * cs + i], X + (size_t)q * cs, i + 1);
  }
  t.sync();
  for (int i = R; i < c; i += S)
    for (int l = 0; l < i; ++l) Ai[(size_t)l * cs + i] = Ai[(size_t)i * cs + l];

  // Y = X G[M, K] in place, bottom-up (row i needs rows <= i of G[M, K]); each thread owns columns of Y.
  for (int i = c - 1; i >= 0; --i) {
    const float* Xi = X + (size_t)i * cs;
    float* Yi = Y + (size_t)i * K;
#if !defined(__CUDACC__)
    if constexpr (Team::kSerial) {  // row i = sum over l <= i of X[i][l] G[M_l, K] (rows <= i still G's)
      rs_gemv_host(Yi, Y, K, nullptr, Xi, i + 1, K);
      continue;
    }
#endif
    const float xii = Xi[i];
    for (int q = R; q < K; q += S) Yi[q] *= xii;
    for (int l = 0; l < i; ++l) rs_axpy_team(t, Yi, Xi[l], Y + (size_t)l * K, 0, K);
  }
  // s_k = G_kk - |Y[:, k]|^2
  for (int q = R; q < K; q += S) s[q] = G[(size_t)iK[q] * B + iK[q]];
  for (int i = 0; i < c; ++i) {
    const float* Yi = Y + (size_t)i * K;
    for (int q = R; q < K; q += S) s[q] = rs_fma(-Yi[q], Yi[q], s[q]);
  }
  if (grouped) {
    t.sync();
    // U[p][col] = sum over q >= p of X[q][p] Y[q][col], col = (p / nn) * kg + b, at Ug[(p % nn) K + col]
    for (int x = R; x < c * kg; x += S) {
      const int p = x / kg, col = (p / nn) * kg + x % kg;
      float acc = 0.f;
      for (int q = p; q < c; ++q) acc = rs_fma(X[(size_t)q * cs + p], Y[(size_t)q * K + col], acc);
      Ug[(p % nn) * K + col] = acc;
    }
  } else {
    // U = X^T Y in place, top-down (row i needs rows >= i of Y); each thread owns columns.
    for (int i = 0; i < c; ++i) {
      float* Yi = Y + (size_t)i * K;
#if !defined(__CUDACC__)
      if constexpr (Team::kSerial) {  // row i = sum over l >= i of X[l][i] Y[l] (rows >= i still Y's)
        for (int l = i; l < c; ++l) tmp[l] = X[(size_t)l * cs + i];
        rs_gemv_host(Yi, Yi, K, nullptr, tmp + i, c - i, K);
        continue;
      }
#endif
      const float xii = X[(size_t)i * cs + i];
      for (int q = R; q < K; q += S) Yi[q] *= xii;
      for (int l = i + 1; l < c; ++l) rs_axpy_team(t, Yi, X[(size_t)l * cs + i], Y + (size_t)l * K, 0, K);
    }
  }
  t.sync();
  return -1;
}

// Steps 3 and 4 of a row: the exchanges and the final solve (Ainv, s and U or Ug as rs_row_setup leaves them).
// UbT: U_B^T with zeros above its diagonal (one-thread teams: e as a sum of its rows), or nullptr.
template <class Team>
PP_HD int rs_row_finish(Team& t, const float* __restrict__ G, const float* __restrict__ Ub, int B, int m, int rounds,
                        float tol, RsRow& rw, float* __restrict__ e, float* __restrict__ loss,
                        int32_t* __restrict__ status, uint8_t* __restrict__ mout, int32_t* __restrict__ nswaps,
                        const float* __restrict__ UbT = nullptr) {
  const int R = t.rank(), S = t.size();
  const int ln = t.lane(), W = t.warp_size(), wp = t.warp(), NW = t.nwarps();
  RS_ROW_UNPACK(rw);

  // 3. Exchanges.
  // One-thread teams, grouped: pg[a K + q] = the pruned slot (q / kg) nn + a that shares kept slot q's group (the
  // room past the scores)
  int* const pg = Team::kSerial ? reinterpret_cast<int*>(Ug + 2 * c * kg) : nullptr;
  if (grouped && Team::kSerial)
    for (int a = 0; a < nn; ++a)
      for (int q = 0; q < K; ++q) pg[a * K + q] = (q / kg) * nn + a;
  float* const isq = bv;  // 1 / s while scoring (bv is free until the exchange)
  const float tiny = 1.17549435e-38f;
  const float inf = pp_inf();
  int done = 0;
  if (rounds > 0 && K > 0) {
    rs_combine(t, lam, Ai, cs, nullptr, wM, c, c);  // lam = Ainv w_M
    rs_combine(t, z, G, B, iM, lam, c, B);           // z = G[:, M] lam
    for (int q = R; q < K; q += S) yK[q] = z[iK[q]];
  }
  PP_RS_PHASE(9);
  for (int round = 0; round < rounds && K > 0; ++round) {
#if !defined(__CUDACC__)
    if constexpr (Team::kSerial)
      rs_kept_terms_host(tq, r, isq, wK, yK, s, tiny, K);
    else
#endif
      for (int q = R; q < K; q += S) {  // per kept slot: t, the score's first term r t / 2, and 1 / s
        const float v = wK[q] - yK[q], sq = rs_max(s[q], tiny);
        const float tt = v / sq;
        tq[q] = tt;
        r[q] = 0.5f * v * tt;
        isq[q] = 1.f / sq;
      }
    double part = 0.0;
#if !defined(__CUDACC__)
    if constexpr (Team::kSerial)
      part = rs_dot_ff64_host(lam, wM, c);
    else
#endif
      for (int i = R; i < c; i += S) part += (double)lam[i] * (double)wM[i];
    const double L0 = 0.5 * t.sum(part);  // also the barrier after r, tq and isq
    float best = inf;
    int bidx = 0x7fffffff;
    if (grouped && Team::kSerial) {
      // the same scores over whole vectors in Ug's order (x = a K + q: kept slot q against pruned slot pg[x]), into
      // the room past Ug; then the smallest, and of the pairs that have it the first in the order p K + q
      float* const sc = Ug + c * kg;
#if !defined(__CUDACC__)
      float* const ad = tmp;  // Ainv's diagonal, contiguous (tmp is free until the exchange)
      for (int p = 0; p < c; ++p) ad[p] = Ai[(size_t)p * cs + p];
      rs_group_scores_host(sc, Ug, pg, lam, ad, tq, isq, r, nn, kg, K);
      const float pm = rs_min_host(sc, c * kg);
#else
      const float pm = inf;  // (never runs: CUDA teams are not serial)
#endif
      if (pm < best) {
        best = pm;
        for (int a = 0; a < nn; ++a)
          for (int q = 0; q < K; ++q)
            if (sc[a * K + q] == pm) {
              const int key = pg[a * K + q] * K + q;
              bidx = key < bidx ? key : bidx;
              break;
            }
      }
    } else if (grouped) {
      for (int x = R; x < c * kg; x += S) {
        const int p = x / kg, q = (p / nn) * kg + x % kg;
        const float u = Ug[(p % nn) * K + q];
        const float num = lam[p] - u * tq[q];
        const float d = r[q] - 0.5f * num * num / (Ai[(size_t)p * cs + p] + u * u * isq[q]);
        if (pp_before(d, p * K + q, best, bidx)) {
          best = d;
          bidx = p * K + q;
        }
      }
    } else {
#if !defined(__CUDACC__)
      if constexpr (Team::kSerial) {
        // every pair over whole vectors (N:M rows not grouped: the group of each slot, in Ug's unused room)
        int *const gpa = reinterpret_cast<int*>(Ug), *const gqa = gpa + c;
        if (m > 0) {
          for (int pp = 0; pp < c; ++pp) gpa[pp] = iM[pp] / m;
          for (int qq = 0; qq < K; ++qq) gqa[qq] = iK[qq] / m;
        }
        int pos = bidx;
        const float sb = rs_pair_scores_host(&pos, Y, lam, Ai, cs, m > 0 ? gpa : nullptr, m > 0 ? gqa : nullptr, tq,
                                             isq, r, c, K);
        if (sb < best) {
          best = sb;
          bidx = pos;
        }
      } else
#endif
      for (int p = wp; p < c; p += NW) {
        const float lp = lam[p], ap = Ai[(size_t)p * cs + p];
        const float* Up = Y + (size_t)p * K;
        const int gp = m > 0 ? iM[p] / m : 0;
        for (int q = ln; q < K; q += W) {
          if (m > 0 && iK[q] / m != gp) continue;
          const float u = Up[q];
          const float num = lp - u * tq[q];
          const float d = r[q] - 0.5f * num * num / (ap + u * u * isq[q]);
          if (pp_before(d, p * K + q, best, bidx)) {
            best = d;
            bidx = p * K + q;
          }
        }
      }
    }
    best = t.argmin(best, bidx, &bidx);
    if (!(best < -tol * (float)(L0 < 0 ? -L0 : L0))) break;  // uniform: every thread has the same best and L0

    // Exchange pruned slot p (position j) and kept slot q (position k).
    const int p = bidx / K, q = bidx % K;
    const int j = iM[p], k = iK[q];
    const float app = Ai[(size_t)p * cs + p];
    for (int i = R; i < c; i += S) av[i] = Ai[(size_t)p * cs + i];  // Ainv's row p (= column p)
    if (grouped && Team::kSerial) {
      // U's row p below, with v^T G[M', K']
    } else if (grouped) {  // U's row p, every kept slot: a^T G[M, K] = (G[:, M] a)[K]
      t.sync();
      rs_combine(t, z, G, B, iM, av, c, B);
      for (int qq = R; qq < K; qq += S) urow[qq] = z[iK[qq]];
    } else {
      for (int qq = R; qq < K; qq += S) urow[qq] = Y[(size_t)p * K + qq];
    }
    t.sync();
    if (R == 0) {
      iM[p] = k;
      iK[q] = j;
      const float tw = wM[p];
      wM[p] = wK[q];
      wK[q] = tw;
    }
    t.sync();
    for (int i = R; i < c; i += S) bv[i] = G[(size_t)k * B + iM[i]];  // G[M', k]
    t.sync();
    double abp = 0.0;
#if !defined(__CUDACC__)
    if constexpr (Team::kSerial)
      abp = rs_dot_ff64_host(av, bv, c);
    else
#endif
      for (int i = R; i < c; i += S) abp += (double)av[i] * (double)bv[i];
    const float ab_app = (float)t.sum(abp) / app;
    rs_combine(t, vv, Ai, cs, nullptr, bv, c, c);  // u = D b = Ainv b - a (a . b) / a_p  (u_p = 0)
    for (int i = R; i < c; i += S) vv[i] = i == p ? 0.f : vv[i] - av[i] * ab_app;
    t.sync();
    double ubp = 0.0;
#if !defined(__CUDACC__)
    if constexpr (Team::kSerial)
      ubp = rs_dot_ff64_host(vv, bv, c);
    else
#endif
      for (int i = R; i < c; i += S) ubp += (double)vv[i] * (double)bv[i];
    const float sk = rs_max(G[(size_t)k * B + k] - (float)t.sum(ubp), tiny);
    if (R == 0) vv[p] = -1.f;  // v = u - e_p
    t.sync();
#if !defined(__CUDACC__)
    if (grouped && Team::kSerial) {  // a^T G[M, K] (U's row p) and v^T G[M', K'] in one pass over G's rows
      rs_gemv2_host(z, av, tmp, vv, G, B, iM, c, B, p, j, k);
      for (int qq = 0; qq < K; ++qq) {
        urow[qq] = z[qq == q ? k : iK[qq]];
        vg[qq] = tmp[iK[qq]];
      }
    } else
#endif
    {
      rs_combine(t, z, G, B, iM, vv, c, B);  // v^T G[M', K'] = (G[:, M'] v)[K']
      for (int qq = R; qq < K; qq += S) vg[qq] = z[iK[qq]];
    }
    t.sync();
    const float ia = 1.f / app, is = 1.f / sk;
    // lam' = lam + alpha a + beta v and y'[K'] from the vectors at hand (alpha = -lam_p / a_p: the weight leaving
    // M; beta = v . w_M' / s_k: the one entering), instead of a product with Ainv and one with G per exchange
    double vwp = 0.0;
#if !defined(__CUDACC__)
    if constexpr (Team::kSerial)
      vwp = rs_dot_ff64_host(vv, wM, c);
    else
#endif
      for (int i = R; i < c; i += S) vwp += (double)vv[i] * (double)wM[i];
    const float alpha = -lam[p] * ia, beta = (float)t.sum(vwp) * is;  // also the barrier before lam changes
    for (int qq = R; qq < K; qq += S)
      yK[qq] = qq == q ? wK[q] + alpha + beta * vg[q] : rs_fma(alpha, urow[qq], rs_fma(beta, vg[qq], yK[qq]));
    for (int i = R; i < c; i += S) lam[i] = rs_fma(alpha, av[i], rs_fma(beta, vv[i], lam[i]));
#if !defined(__CUDACC__)
    if constexpr (Team::kSerial) {  // Ainv' = D + v v^T / s_k
      rs_rank2_host(Ai, cs, c, av, ia, vv, is, av, vv, c);
    } else
#endif
      for (int i = wp; i < c; i += NW) {  // Ainv' = D + v v^T / s_k
        const float ca = -av[i] * ia, cv = vv[i] * is;
        float* Ar = Ai + (size_t)i * cs;
        for (int l = ln; l < c; l += W) Ar[l] = rs_fma(ca, av[l], rs_fma(cv, vv[l], Ar[l]));
      }
    const float vgq_is = vg[q] * is;
    for (int qq = R; qq < K; qq += S)
      s[qq] = qq == q ? ia - vg[q] * vgq_is : s[qq] + urow[qq] * urow[qq] * ia - vg[qq] * vg[qq] * is;
    if (grouped && Team::kSerial) {  // the same updates as below in Ug's order (pruned slot pg[x] of x = a K + qq)
#if !defined(__CUDACC__)
      rs_group_update_host(Ug, pg, av, vv, ia, is, urow, vg, nn, kg, K);
#endif
      for (int a = 0; a < nn; ++a) {
        const int pp = pg[a * K + q];
        Ug[a * K + q] = vv[pp] * vgq_is - av[pp] * ia + (pp == p ? 1.f : 0.f);
      }
    } else if (grouped) {
      for (int x = R; x < c * kg; x += S) {
        const int pp = x / kg, qq = (pp / nn) * kg + x % kg;
        const float colq = vv[pp] * vgq_is - av[pp] * ia + (pp == p ? 1.f : 0.f);
        float& u = Ug[(pp % nn) * K + qq];
        u = qq == q ? colq : u - av[pp] * ia * urow[qq] + vv[pp] * is * vg[qq];
      }
    } else {
#if !defined(__CUDACC__)
      if constexpr (Team::kSerial) {
        rs_rank2_host(Y, K, c, av, ia, vv, is, urow, vg, K);
        for (int i = 0; i < c; ++i) Y[(size_t)i * K + q] = vv[i] * vgq_is - av[i] * ia + (i == p ? 1.f : 0.f);
      }
#endif
      for (int i = wp; i < c && !Team::kSerial; i += NW) {
        const float ca = -av[i] * ia, cv = vv[i] * is;
        const float colq = vv[i] * vgq_is - av[i] * ia + (i == p ? 1.f : 0.f);
        float* Ur = Y + (size_t)i * K;
        for (int qq = ln; qq < K; qq += W) {
          const float upd = rs_fma(ca, urow[qq], rs_fma(cv, vg[qq], Ur[qq]));
          Ur[qq] = qq == q ? colq : upd;
        }
      }
    }
    ++done;
    t.sync();
  }

  PP_RS_PHASE(10);
  // 4. The solve for the final set: lambda = Ainv w_M, one refinement step against G[M, M] (fp64 accumulation).
#if !defined(__CUDACC__)
  if constexpr (Team::kSerial) {
    // Ainv w_M and Ainv res as sums of Ainv's rows (symmetric), G[M, M] lambda as (sum over i of lambda_i G[M_i, :])
    // at M: whole rows of G (symmetric), no gathers; fp64 sums in 4-wide vectors (X's room holds c doubles)
    double* const xd = reinterpret_cast<double*>(X);
    rs_gemv_host(tmp, Ai, cs, nullptr, wM, c, c);
    for (int i = 0; i < c; ++i) lam64[i] = (double)tmp[i];
    rs_gemv64_host(res64, G, B, iM, lam64, c, B);
    for (int i = 0; i < c; ++i) xd[i] = (double)wM[i] - res64[iM[i]];
    for (int i = 0; i < c; ++i) res64[i] = xd[i];
    rs_gemv64_host(xd, Ai, cs, nullptr, res64, c, c);
    for (int i = 0; i < c; ++i) lam64[i] += xd[i];
  } else
#endif
  {
    for (int i = wp; i < c; i += NW) {
      const float v = rs_dot(t, Ai + (size_t)i * cs, wM, c);
      if (ln == 0) lam64[i] = (double)v;
    }
    t.sync();
    for (int i = wp; i < c; i += NW) {
      const float* Gi = G + (size_t)iM[i] * B;
      double acc = 0.0;
      for (int jb = 0; jb < c; jb += W) {
        const int jj = jb + ln;
        if (jj < c) acc += (double)Gi[iM[jj]] * lam64[jj];
      }
      acc = t.warp_sum(acc);
      if (ln == 0) res64[i] = (double)wM[i] - acc;
    }
    t.sync();
    for (int i = wp; i < c; i += NW) {
      const float* Ar = Ai + (size_t)i * cs;
      double acc = 0.0;
      for (int jb = 0; jb < c; jb += W) {
        const int jj = jb + ln;
        if (jj < c) acc += (double)Ar[jj] * res64[jj];
      }
      acc = t.warp_sum(acc);
      if (ln == 0) lam64[i] += acc;
    }
  }
  PP_RS_PHASE(11);
  for (int jj = R; jj < B; jj += S) {
    z[jj] = 0.f;
    tmp[jj] = 0.f;
  }
  t.sync();
  double part = 0.0;
  for (int i = R; i < c; i += S) {
    z[iM[i]] = (float)lam64[i];
    tmp[iM[i]] = 1.f;
    part += lam64[i] * (double)wM[i];
  }
  const double tot = t.sum(part);  // also the barrier after z
  if (R == 0) {
    *loss = (float)(0.5 * tot);
    *status = 0;
    *nswaps = done;
  }
  for (int jj = R; jj < B; jj += S) mout[jj] = tmp[jj] != 0.f ? 1 : 0;
#if !defined(__CUDACC__)
  if constexpr (Team::kSerial) {
    if (UbT) {  // e = sum over i of z[M_i] U_B[:, M_i], rows of U_B^T (zero below the diagonal of U_B)
      for (int i = 0; i < c; ++i) tmp[i] = z[iM[i]];
      rs_gemv_host(e, UbT, B, iM, tmp, c, B);
      PP_RS_PHASE(12);
      return MS_DONE;
    }
  }
#endif
  for (int rr = wp; rr < B; rr += NW) {  // e_r = sum over columns >= r of U_B[r, col] z[col] (U_B upper)
    const float v = rs_dot(t, Ub + (size_t)rr * B + rr, z + rr, B - rr);
    if (ln == 0) e[rr] = v;
  }
  return MS_DONE;
}

// One row. G, Ub: (B, B) fp32 row-major (G = U_B^T U_B, the block's inverse-Hessian submatrix); w: the row's B
// weights; msk: its starting mask (B bytes, nonzero = pruned); m > 0: exchanges stay inside groups of m consecutive
// columns (N:M); rounds: at most this many exchanges; tol: the relative improvement an exchange must make. Rows
// whose count of pruned weights lies outside [kmin, kmax] are skipped (MS_SKIPPED, nothing written). ws:
// rs_smem_words(kmax, B, m) words (rs_host_words(B) for one-thread teams), 8-byte aligned. Writes e (B), loss,
// status, mout (B bytes) and nswaps. UbT: as rs_row_finish's.
template <class Team, class T>
PP_HD int refine_solve_row(Team& t, const float* __restrict__ G, const float* __restrict__ Ub,
                           const T* __restrict__ w, const uint8_t* __restrict__ msk, int B, int m, int rounds,
                           float tol, int kmin, int kmax, float* ws, float* __restrict__ e, float* __restrict__ loss,
                           int32_t* __restrict__ status, uint8_t* __restrict__ mout, int32_t* __restrict__ nswaps,
                           const float* __restrict__ UbT = nullptr) {
  RsRow rw;
  int st = rs_row_begin(t, w, msk, B, m, kmin, kmax, ws, e, loss, status, mout, nswaps, rw);
  if (st >= 0) return st;
  st = rs_row_setup(t, G, msk, B, rw, e, loss, status, mout, nswaps);
  if (st >= 0) return st;
  return rs_row_finish(t, G, Ub, B, m, rounds, tol, rw, e, loss, status, mout, nswaps, UbT);
}

#if !defined(__CUDACC__)
// ---------------------------------------------------------------------------------------------------------------
// The CPU op's multi-row setup: step 2 of refine_solve_row for eight rows at once. Rows of a block that prune the
// same count c (every row at N:M, every row of a per-row unstructured mask) have matrices of the same shapes, so
// the eight rows go in the eight lanes of a vector: element (i, j) of lane r's matrix at [(i * ld + j) * 8 + r]
// ("structure of arrays"). Every scalar operation of the one-thread row code becomes one vector operation over the
// lanes, in the same order per entry (the same fused multiply-adds, from the same starting value, in the same
// sequence), so each row's Ainv, U (or Ug) and s are those of rs_row_setup bit for bit; what changes is that the
// short triangular loops of one row (Cholesky, L^-1, Ainv: lengths below c) become full-width vector work with
// independent accumulators. The results go into each row's own workspace, and the exchanges and the final solve
// run per row (rs_row_finish), as do rows left over when a count has fewer than eight.

constexpr int kRsLanes = 8;

// SoA workspace (4-byte words) for rs8_setup at block size B: X (c x c), Ainv (c x c) and then G[M, K] / Y / U
// (c x K) in one B x B region, the reciprocal pivots and the gather offsets, eight lanes each.
inline size_t rs8_soa_words(int B) { return (size_t)kRsLanes * ((size_t)2 * B * (B + 2) + 4 * (size_t)B) + 16; }

inline rs_v8 rs_fnma8(rs_v8 a, rs_v8 x, rs_v8 y) {  // y - a x, one rounding (as rs_fma(-a, x, y))
#ifdef PP_RS_X86_FMA
  return (rs_v8)_mm256_fnmadd_ps((__m256)a, (__m256)x, (__m256)y);
#else
  return y - a * x;
#endif
}

// acc[a][b] = acc[a][b] + (or -, NEG) ca[a][t * cst] * rb[t * rst + b * bst] over t < nt, t ascending: NR rows
// of coefficients against NB elements bst apart that advance by rst (strides in floats, 8 lanes an element).
template <int NR, int NB, bool NEG>
inline void rs8_mac(rs_v8 (&acc)[NR][NB], const float* const (&ca)[NR], size_t cst, const float* rb, size_t rst,
                    size_t bst, int nt) {
  rs_v8 r[NR][NB];  // in registers for the whole loop (acc may alias the operands as far as the compiler knows)
#pragma GCC unroll 8
  for (int a = 0; a < NR; ++a)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) r[a][j] = acc[a][j];
  const float* p[NR];
#pragma GCC unroll 8
  for (int a = 0; a < NR; ++a) p[a] = ca[a];
  for (int t = 0; t < nt; ++t) {
    rs_v8 b[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) b[j] = rs_load8(rb + bst * j);
    rb += rst;
#pragma GCC unroll 8
    for (int a = 0; a < NR; ++a) {
      const rs_v8 x = rs_load8(p[a]);
      p[a] += cst;
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) r[a][j] = NEG ? rs_fnma8(x, b[j], r[a][j]) : rs_fma8(x, b[j], r[a][j]);
    }
  }
#pragma GCC unroll 8
  for (int a = 0; a < NR; ++a)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[a][j] = r[a][j];
}

template <int N>
struct RsInt {
  static constexpr int value = N;
};

// f(RsInt<n>()) for a run-time n in [1, 8]
template <class F>
inline void rs8_const(int n, F&& f) {
  switch (n) {
    case 1: f(RsInt<1>()); break;
    case 2: f(RsInt<2>()); break;
    case 3: f(RsInt<3>()); break;
    case 4: f(RsInt<4>()); break;
    case 5: f(RsInt<5>()); break;
    case 6: f(RsInt<6>()); break;
    case 7: f(RsInt<7>()); break;
    default: f(RsInt<8>()); break;
  }
}

// lane r of v into dst[r][off]
inline void rs8_scatter(rs_v8 v, float* const* dst, size_t off) {
  for (int l = 0; l < kRsLanes; ++l) dst[l][off] = v[l];
}

// Element j of lane l (src[8 j + l], j < n) into dst[l][j]: eight elements at a time through an 8 x 8 transpose.
inline void rs8_to_rows(const float* __restrict__ src, int n, float* const* dst) {
  int j = 0;
#ifdef PP_RS_X86_FMA
  for (; j + 8 <= n; j += 8) {
    const float* p = src + (size_t)8 * j;
    const __m256 r0 = _mm256_loadu_ps(p), r1 = _mm256_loadu_ps(p + 8), r2 = _mm256_loadu_ps(p + 16),
                 r3 = _mm256_loadu_ps(p + 24), r4 = _mm256_loadu_ps(p + 32), r5 = _mm256_loadu_ps(p + 40),
                 r6 = _mm256_loadu_ps(p + 48), r7 = _mm256_loadu_ps(p + 56);
    const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
                 t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst[0] + j, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(dst[1] + j, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(dst[2] + j, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(dst[3] + j, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(dst[4] + j, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(dst[5] + j, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(dst[6] + j, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(dst[7] + j, _mm256_permute2f128_ps(u3, u7, 0x31));
  }
#endif
  for (; j < n; ++j)
    for (int l = 0; l < kRsLanes; ++l) dst[l][j] = src[(size_t)8 * j + l];
}

// acc[a][b] = sum over l = i0 + a .. n - 1 (ascending, from zero) of X(l, i0 + a) R(l, b): rows i0 .. i0 + NR - 1
// of X^T R, each from its own first term (row a's terms before the shared ones, then all rows together). xi:
// &X(i0, i0); r: &R(i0, b0); xs, rs: the row strides; n: the terms of row i0 (n >= NR).
template <int NR, int NB>
inline void rs8_xt(rs_v8 (&acc)[NR][NB], const float* xi, size_t xs, const float* r, size_t rs, int n) {
  const rs_v8 zero = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int a = 0; a < NR; ++a)
    for (int b = 0; b < NB; ++b) acc[a][b] = zero;
  for (int a = 0; a + 1 < NR; ++a) {
    auto& one = *reinterpret_cast<rs_v8(*)[1][NB]>(&acc[a]);
    const float* ca[1] = {xi + (size_t)a * xs + (size_t)kRsLanes * a};
    rs8_mac<1, NB, false>(one, ca, xs, r + (size_t)a * rs, rs, kRsLanes, NR - 1 - a);
  }
  const float* ca[NR];
  for (int a = 0; a < NR; ++a) ca[a] = xi + (size_t)(NR - 1) * xs + (size_t)kRsLanes * a;
  rs8_mac<NR, NB, false>(acc, ca, xs, r + (size_t)(NR - 1) * rs, rs, kRsLanes, n - (NR - 1));
}

// acc[a][b] = sum over l = 0 .. i0 + a (ascending, from zero) of X(i0 + a, l) R(l, b): rows i0 .. i0 + NR - 1 of
// X R for lower-triangular X (the shared terms, then row a's last ones). xi: &X(i0, 0); r: &R(0, b0).
template <int NR, int NB>
inline void rs8_xl(rs_v8 (&acc)[NR][NB], const float* xi, size_t xs, const float* r, size_t rs, int i0) {
  const rs_v8 zero = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int a = 0; a < NR; ++a)
    for (int b = 0; b < NB; ++b) acc[a][b] = zero;
  const float* ca[NR];
  for (int a = 0; a < NR; ++a) ca[a] = xi + (size_t)a * xs;
  rs8_mac<NR, NB, false>(acc, ca, kRsLanes, r, rs, kRsLanes, i0 + 1);
  for (int a = 1; a < NR; ++a) {
    auto& one = *reinterpret_cast<rs_v8(*)[1][NB]>(&acc[a]);
    const float* c1[1] = {xi + (size_t)a * xs + (size_t)kRsLanes * (i0 + 1)};
    rs8_mac<1, NB, false>(one, c1, kRsLanes, r + (size_t)(i0 + 1) * rs, rs, kRsLanes, a);
  }
}

// Step 2 of rs_row_setup for eight rows whose rs_row_begin gave the same c (>= 1), K and grouping; soa:
// rs8_soa_words(B) words, 32-byte aligned. Returns false, having written nothing to the rows, when some lane meets
// a non-positive pivot (the caller then runs those rows one at a time, which reports it). Loops are blocked for the
// cache (stripes of a few columns, outer) and for the registers (a few rows by a few columns of accumulators).
inline bool rs8_setup(const float* __restrict__ G, int B, RsRow* rw, float* __restrict__ soa) {
  constexpr int V = kRsLanes;
  const int c = rw[0].c, K = rw[0].K, nn = rw[0].nn, kg = rw[0].kg;
  const bool grouped = rw[0].grouped;
  const size_t cs = (size_t)rw[0].cs;
  // Row strides in floats, padded by a cache line: with a power-of-two stride the columns read by the stripes
  // would map to two sets of the L1 cache.
  const size_t xs = (size_t)V * (c + 2), ys = (size_t)V * (K + 2);
  float* const X = soa;                                  // c x c: A, then L (lower), then L^-1 (zero above)
  float* const Z = X + (size_t)V * B * (B + 2);          // c x c Ainv, then c x K: G[M, K], Y, U
  float* const rdiag = Z + (size_t)V * B * (B + 2);      // c
  int* const oM = reinterpret_cast<int*>(rdiag + (size_t)V * c);  // c: the row offsets iM[i] * B
  int* const cM = oM + (size_t)V * c;                    // c: iM[i]
  int* const cK = cM + (size_t)V * c;                    // K: iK[q]
  auto Xp = [&](int i, int j) { return X + (size_t)i * xs + (size_t)V * j; };
  auto Ap = [&](int i, int j) { return Z + (size_t)i * xs + (size_t)V * j; };
  auto Yp = [&](int i, int q) { return Z + (size_t)i * ys + (size_t)V * q; };
  const rs_v8 zero = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  const rs_v8 one = {1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f};
  for (int i = 0; i < c; ++i)
    for (int l = 0; l < V; ++l) {
      cM[i * V + l] = rw[l].iM[i];
      oM[i * V + l] = rw[l].iM[i] * B;
    }
  for (int q = 0; q < K; ++q)
    for (int l = 0; l < V; ++l) cK[q * V + l] = rw[l].iK[q];
  PP_RS_PHASE(0);
  // A = G[M, M], lower triangle
  for (int i = 0; i < c; ++i) {
    const rs_v8i oi = rs_load8i(oM + i * V);
    for (int j = 0; j <= i; ++j) rs_store8(Xp(i, j), rs_gather8(G, oi + rs_load8i(cM + j * V)));
  }

  PP_RS_PHASE(1);
  // Cholesky, left-looking in panels of four columns: entry (i, l) takes its updates t = 0..l-1 in the order of
  // the row code's right-looking loop (the columns left of the panel together, then the panel's own columns one
  // by one), then 1 / the pivot goes to rdiag and the column is scaled.
  auto pivot = [&](rs_v8 d, int l, rs_v8* inv) {
    for (int x = 0; x < V; ++x)
      if (!(d[x] > 0.f)) return false;
#ifdef PP_RS_X86_FMA
    const rs_v8 sq = (rs_v8)_mm256_sqrt_ps((__m256)d);
#else
    rs_v8 sq;
    for (int x = 0; x < V; ++x) sq[x] = pp_sqrtf(d[x]);
#endif
    *inv = one / sq;
    rs_store8(rdiag + (size_t)V * l, *inv);
    return true;
  };
  bool spd = true;
  for (int l = 0; l < c && spd; l += 4) {
    rs8_const(c - l < 4 ? c - l : 4, [&](auto nbc) {
      constexpr int NB = decltype(nbc)::value;
      rs_v8 inv[NB];
      {  // the panel's diagonal block
        rs_v8 d[NB][NB];
        const float* ca[NB];
        for (int a = 0; a < NB; ++a) {
          ca[a] = Xp(l + a, 0);
          for (int b = 0; b < NB; ++b) d[a][b] = b <= a ? rs_load8(Xp(l + a, l + b)) : zero;
        }
        rs8_mac<NB, NB, true>(d, ca, V, Xp(l, 0), V, xs, l);
        for (int b = 0; b < NB; ++b) {
          if (!pivot(d[b][b], l + b, &inv[b])) {
            spd = false;
            return;
          }
          for (int a = b + 1; a < NB; ++a) {
            d[a][b] = d[a][b] * inv[b];
            rs_store8(Xp(l + a, l + b), d[a][b]);
          }
          for (int b2 = b + 1; b2 < NB; ++b2)
            for (int a = b2; a < NB; ++a) d[a][b2] = rs_fnma8(d[a][b], d[b2][b], d[a][b2]);
        }
      }
      for (int i0 = l + NB; i0 < c; i0 += 3) {
        rs8_const(c - i0 < 3 ? c - i0 : 3, [&](auto nr) {
          constexpr int NR = decltype(nr)::value;
          rs_v8 acc[NR][NB];
          const float* ca[NR];
          for (int a = 0; a < NR; ++a) {
            ca[a] = Xp(i0 + a, 0);
            for (int b = 0; b < NB; ++b) acc[a][b] = rs_load8(Xp(i0 + a, l + b));
          }
          rs8_mac<NR, NB, true>(acc, ca, V, Xp(l, 0), V, xs, l);
          for (int b = 0; b < NB; ++b)
            for (int a = 0; a < NR; ++a) {
              const rs_v8 li = acc[a][b] * inv[b];
              rs_store8(Xp(i0 + a, l + b), li);
              for (int b2 = b + 1; b2 < NB; ++b2) acc[a][b2] = rs_fnma8(li, rs_load8(Xp(l + b2, l + b)), acc[a][b2]);
            }
        });
      }
    });
  }
  if (!spd) return false;

  PP_RS_PHASE(2);
  // X = L^-1 in place, in stripes of four columns (outer) and pairs of rows (top-down): entry (i, l) = -d_i sum
  // over q = l0 .. i - 1 of L[i][q] X[q][l] (q ascending; the row code's terms q < l vanish), X[i][i] = d_i, zero
  // above the diagonal. Row i + 1 takes its last term (q = i) from the finished row i.
  for (int l0 = 0; l0 < c; l0 += 4) {
    const int nbl = c - l0 < 4 ? c - l0 : 4;
    for (int i = 0; i < l0; ++i)
      for (int j = 0; j < nbl; ++j) rs_store8(Xp(i, l0 + j), zero);
    auto finish_row = [&](int i, const rs_v8* acc) {
      const rs_v8 di = rs_load8(rdiag + (size_t)V * i), mdi = zero - di;
      for (int j = 0; j < nbl; ++j) {
        const int l = l0 + j;
        rs_store8(Xp(i, l), l < i ? mdi * acc[j] : (l == i ? di : zero));
      }
    };
    rs8_const(nbl, [&](auto nb) {
      constexpr int NB = decltype(nb)::value;
      int i = l0;
      for (; i + 1 < c; i += 2) {
        rs_v8 acc[2][NB];
        for (int a = 0; a < 2; ++a)
          for (int j = 0; j < NB; ++j) acc[a][j] = zero;
        const float* ca[2] = {Xp(i, l0), Xp(i + 1, l0)};
        rs8_mac<2, NB, false>(acc, ca, V, Xp(l0, l0), xs, V, i - l0);
        finish_row(i, acc[0]);
        auto& last = *reinterpret_cast<rs_v8(*)[1][NB]>(&acc[1]);
        const float* cl[1] = {Xp(i + 1, i)};
        rs8_mac<1, NB, false>(last, cl, V, Xp(i, l0), xs, V, 1);
        finish_row(i + 1, acc[1]);
      }
      if (i < c) {
        rs_v8 acc[1][NB];
        for (int j = 0; j < NB; ++j) acc[0][j] = zero;
        const float* ca[1] = {Xp(i, l0)};
        rs8_mac<1, NB, false>(acc, ca, V, Xp(l0, l0), xs, V, i - l0);
        finish_row(i, acc[0]);
      }
    });
  }

  PP_RS_PHASE(3);
  // Ainv = X^T X: entry (i, l) = sum over q = i .. c - 1 of X[q][i] X[q][l] (q ascending), for the blocks that
  // meet the lower triangle (an entry above the diagonal computed so equals its mirror bit for bit: its extra
  // terms are exact zeros), the rest mirrored; then every row's Ai, row by row.
  for (int l0 = 0; l0 < c; l0 += 3) {
    rs8_const(c - l0 < 3 ? c - l0 : 3, [&](auto nb) {
      constexpr int NB = decltype(nb)::value;
      for (int i0 = (l0 / 4) * 4; i0 < c; i0 += 4) {
        rs8_const(c - i0 < 4 ? c - i0 : 4, [&](auto nr) {
          constexpr int NR = decltype(nr)::value;
          rs_v8 acc[NR][NB];
          rs8_xt<NR, NB>(acc, Xp(i0, i0), xs, Xp(i0, l0), xs, c - i0);
          for (int a = 0; a < NR; ++a)
            for (int j = 0; j < NB; ++j) rs_store8(Ap(i0 + a, l0 + j), acc[a][j]);
        });
      }
    });
  }
  float* dst[V];
  for (int i = 0; i < c; ++i) {
    for (int l = i + 1; l < c; ++l) rs_store8(Ap(i, l), rs_load8(Ap(l, i)));
    for (int x = 0; x < V; ++x) dst[x] = rw[x].Ai + (size_t)i * cs;
    rs8_to_rows(Ap(i, 0), c, dst);
  }

  PP_RS_PHASE(4);
  // G[M, K]
  for (int i = 0; i < c; ++i) {
    const rs_v8i oi = rs_load8i(oM + i * V);
    for (int q = 0; q < K; ++q) rs_store8(Yp(i, q), rs_gather8(G, oi + rs_load8i(cK + q * V)));
  }
  PP_RS_PHASE(5);
  // Y = X G[M, K] in place, in stripes of six columns (outer), blocks of four rows (bottom-up) and three columns:
  // row i = sum over l = 0 .. i of X[i][l] G[M_l, K] (l ascending; rows <= i are still G's).
  for (int q1 = 0; q1 < K; q1 += 6) {
    const int qe = q1 + 6 < K ? q1 + 6 : K;
    for (int i1 = c; i1 > 0; i1 -= 4) {
      const int i0 = i1 - 4 < 0 ? 0 : i1 - 4;
      for (int q0 = q1; q0 < qe; q0 += 3) {
        rs8_const(qe - q0 < 3 ? qe - q0 : 3, [&](auto nb) {
          constexpr int NB = decltype(nb)::value;
          rs8_const(i1 - i0, [&](auto nr) {
            constexpr int NR = decltype(nr)::value;
            rs_v8 acc[NR][NB];
            rs8_xl<NR, NB>(acc, Xp(i0, 0), xs, Yp(0, q0), ys, i0);
            for (int a = 0; a < NR; ++a)
              for (int j = 0; j < NB; ++j) rs_store8(Yp(i0 + a, q0 + j), acc[a][j]);
          });
        });
      }
    }
  }

  PP_RS_PHASE(6);
  // s_k = G_kk - |Y[:, k]|^2 (i ascending)
  for (int q0 = 0; q0 < K; q0 += 8) {
    const int nq = K - q0 < 8 ? K - q0 : 8;
    rs_v8 acc[8];
    for (int j = 0; j < nq; ++j) acc[j] = rs_gather8(G, rs_load8i(cK + (q0 + j) * V) * (B + 1));
    for (int i = 0; i < c; ++i)
      for (int j = 0; j < nq; ++j) {
        const rs_v8 y = rs_load8(Yp(i, q0 + j));
        acc[j] = rs_fnma8(y, y, acc[j]);
      }
    for (int x = 0; x < V; ++x) dst[x] = rw[x].s;
    for (int j = 0; j < nq; ++j) rs8_scatter(acc[j], dst, q0 + j);
  }

  PP_RS_PHASE(7);
  if (grouped) {
    // U[p][col] = sum over q = p .. c - 1 of X[q][p] Y[q][col] (q ascending), col = (p / nn) kg + b, at
    // Ug[(p % nn) K + col] (rs_row_begin's layout), the nn rows of a group together
    for (int x = 0; x < V; ++x) dst[x] = rw[x].Ug;
    for (int g0 = 0; g0 < c; g0 += nn)
      for (int p0 = g0; p0 < g0 + nn; p0 += 4)
        for (int b0 = 0; b0 < kg; b0 += 3) {
          const int col0 = (g0 / nn) * kg + b0;
          rs8_const(kg - b0 < 3 ? kg - b0 : 3, [&](auto nb) {
            constexpr int NB = decltype(nb)::value;
            rs8_const(g0 + nn - p0 < 4 ? g0 + nn - p0 : 4, [&](auto nr) {
              constexpr int NR = decltype(nr)::value;
              rs_v8 acc[NR][NB];
              rs8_xt<NR, NB>(acc, Xp(p0, p0), xs, Yp(p0, col0), ys, c - p0);
              for (int a = 0; a < NR; ++a)
                for (int j = 0; j < NB; ++j)
                  rs8_scatter(acc[a][j], dst, (size_t)((p0 + a) % nn) * K + col0 + j);
            });
          });
        }
  } else {
    // U = X^T Y in place, in stripes of six columns, blocks of four rows (top-down) and three columns: row i =
    // sum over l = i .. c - 1 of X[l][i] Y[l] (l ascending; rows >= i are still Y's); then every row's U
    for (int q1 = 0; q1 < K; q1 += 6) {
      const int qe = q1 + 6 < K ? q1 + 6 : K;
      for (int i0 = 0; i0 < c; i0 += 4) {
        for (int q0 = q1; q0 < qe; q0 += 3) {
          rs8_const(qe - q0 < 3 ? qe - q0 : 3, [&](auto nb) {
            constexpr int NB = decltype(nb)::value;
            rs8_const(c - i0 < 4 ? c - i0 : 4, [&](auto nr) {
              constexpr int NR = decltype(nr)::value;
              rs_v8 acc[NR][NB];
              rs8_xt<NR, NB>(acc, Xp(i0, i0), xs, Yp(i0, q0), ys, c - i0);
              for (int a = 0; a < NR; ++a)
                for (int j = 0; j < NB; ++j) rs_store8(Yp(i0 + a, q0 + j), acc[a][j]);
            });
          });
        }
      }
    }
    for (int i = 0; i < c; ++i) {
      for (int x = 0; x < V; ++x) dst[x] = rw[x].Y + (size_t)i * K;
      rs8_to_rows(Yp(i, 0), K, dst);
    }
  }
  PP_RS_PHASE(8);
  return true;
}

// Eight rows of one block (row indices rows[0..8), their workspaces ws[0..8), rs_host_words(B) words each) through
// refine_solve_row: one rs8_setup for the eight when they share the count and grouping and every pivot is positive,
// else rs_row_setup row by row; the exchanges and the final solve row by row. Results as refine_solve_row's, bit
// for bit.
template <class T>
inline void refine_solve_rows8(const float* G, const float* Ub, const T* w, const uint8_t* msk, const int64_t* rows,
                               int B, int m, int rounds, float tol, float* const* ws, float* soa, float* e,
                               float* loss, int32_t* status, uint8_t* mout, int32_t* nswaps,
                               const float* UbT = nullptr) {
  SerialTeam t;
  RsRow rw[kRsLanes];
  bool go[kRsLanes];
  PP_RS_PHASE(-1);
  bool same = true;
  for (int l = 0; l < kRsLanes; ++l) {
    const int64_t r = rows[l];
    go[l] = rs_row_begin(t, w + r * B, msk + r * B, B, m, 0, B, ws[l], e + r * B, loss + r, status + r,
                         mout + r * B, nswaps + r, rw[l]) < 0;
    same = same && go[l] && rw[l].c == rw[0].c && rw[l].grouped == rw[0].grouped;
  }
  PP_RS_PHASE(13);
  if (!(same && rs8_setup(G, B, rw, soa))) {
    for (int l = 0; l < kRsLanes; ++l) {
      const int64_t r = rows[l];
      if (go[l])
        go[l] = rs_row_setup(t, G, msk + r * B, B, rw[l], e + r * B, loss + r, status + r, mout + r * B,
                             nswaps + r) < 0;
    }
  }
  for (int l = 0; l < kRsLanes; ++l) {
    const int64_t r = rows[l];
    if (go[l])
      rs_row_finish(t, G, Ub, B, m, rounds, tol, rw[l], e + r * B, loss + r, status + r, mout + r * B, nswaps + r,
                    UbT);
  }
}
#endif

}  // namespace pyprune
