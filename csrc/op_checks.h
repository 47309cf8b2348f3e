// Argument checks shared by the CPU and CUDA registrations of the pyprune ops (torch glue only).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <type_traits>

#include "kernels/nm_select.cuh"

namespace pyprune {

// Every TORCH_CHECK message of pyprune._C is built here as one std::string (numbers through std::to_string) and
// handed to TORCH_CHECK as its only message argument, which c10 passes through without a std::ostringstream.
// Letting c10::str stream a number instead (an int, a shape, a device) segfaulted the process on the H200 machine:
// the error path of every bad-input check crashed instead of raising (measured 2026-11-29; strings and dtypes
// streamed fine). The likely cause, not confirmed: extensions there are compiled by /opt/gcc, whose libstdc++
// headers differ from the libstdc++ the Python process loads.
namespace msg {
inline std::string part(const char* s) { return s; }
inline std::string part(const std::string& s) { return s; }
inline std::string part(char c) { return std::string(1, c); }
inline std::string part(bool b) { return b ? "true" : "false"; }
template <class T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> && !std::is_same_v<T, char>,
                                    int> = 0>
inline std::string part(T v) { return std::to_string(v); }
inline std::string part(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}
inline std::string part(const c10::Device& d) { return d.str(); }
inline std::string part(c10::ScalarType t) { return c10::toString(t); }
}  // namespace msg

template <class... Args>
std::string pp_msg(const Args&... args) {
  std::string s;
  ((s += msg::part(args)), ...);
  return s;
}

inline bool is_weight_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_matrix(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 2, pp_msg(op, ": ", name, " must be a 2-D tensor, got shape ", t.sizes()));
  TORCH_CHECK_VALUE(t.is_contiguous(), pp_msg(op, ": ", name, " must be contiguous (call .contiguous())"));
}

inline void check_device(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                         const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), pp_msg(op, ": ", name, " is on ", t.device(), " but ", ref_name,
                                                       " is on ", ref.device(), "; all tensors must be on the same "
                                                       "device"));
}

inline void check_nm_select(const at::Tensor& W1, const at::Tensor& G, int64_t n, int64_t m) {
  const char* op = "pyprune.nm_select";
  check_matrix(op, "W1", W1);
  check_matrix(op, "G", G);
  TORCH_CHECK_TYPE(is_weight_dtype(W1.scalar_type()), pp_msg(op, ": W1 must be float32, float16 or bfloat16, got ",
                   W1.scalar_type()));
  TORCH_CHECK_TYPE(G.scalar_type() == at::kFloat, pp_msg(op, ": G must be float32, got ", G.scalar_type()));
  const int64_t B = W1.size(1);
  TORCH_CHECK_VALUE(G.size(0) == B && G.size(1) == B, pp_msg(op, ": G must be (B, B) = (", B, ", ", B,
                    ") to match W1's ", B, " columns, got ", G.sizes()));
  check_device(op, W1, "W1", G, "G");
  TORCH_CHECK_VALUE(0 < n && n < m, pp_msg(op, ": N:M needs 0 < N < M, got ", n, ":", m));
  TORCH_CHECK_VALUE(m <= NM_MAX_M, pp_msg(op, ": M must be at most ", NM_MAX_M, ", got ", m));
  TORCH_CHECK_VALUE(B % m == 0, pp_msg(op, ": the number of columns (", B, ") is not a multiple of M=", m));
  TORCH_CHECK_VALUE(W1.size(0) <= INT32_MAX && B * B <= INT32_MAX, pp_msg(op, ": W1 is too large"));
}

inline void check_masked_solve(const at::Tensor& G, const at::Tensor& U, const at::Tensor& W1,
                               const at::Tensor& mask, const char* op = "pyprune.masked_solve") {
  check_matrix(op, "G", G);
  check_matrix(op, "U_B", U);
  check_matrix(op, "W1", W1);
  check_matrix(op, "mask", mask);
  TORCH_CHECK_TYPE(G.scalar_type() == at::kFloat, pp_msg(op, ": G must be float32, got ", G.scalar_type()));
  TORCH_CHECK_TYPE(U.scalar_type() == at::kFloat, pp_msg(op, ": U_B must be float32, got ", U.scalar_type()));
  TORCH_CHECK_TYPE(is_weight_dtype(W1.scalar_type()), pp_msg(op, ": W1 must be float32, float16 or bfloat16, got ",
                   W1.scalar_type()));
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, pp_msg(op, ": mask must be bool, got ", mask.scalar_type()));
  const int64_t B = G.size(0);
  TORCH_CHECK_VALUE(G.size(1) == B, pp_msg(op, ": G must be square, got ", G.sizes()));
  TORCH_CHECK_VALUE(U.size(0) == B && U.size(1) == B, pp_msg(op, ": U_B must be (", B, ", ", B, ") like G, got ",
                    U.sizes()));
  TORCH_CHECK_VALUE(W1.size(1) == B, pp_msg(op, ": W1 has ", W1.size(1), " columns but G is ", B, " x ", B));
  TORCH_CHECK_VALUE(mask.sizes() == W1.sizes(), pp_msg(op, ": mask must have W1's shape ", W1.sizes(), ", got ",
                    mask.sizes()));
  check_device(op, G, "G", U, "U_B");
  check_device(op, G, "G", W1, "W1");
  check_device(op, G, "G", mask, "mask");
  TORCH_CHECK_VALUE(W1.size(0) <= INT32_MAX && B * B <= INT32_MAX, pp_msg(op, ": the inputs are too large"));
}

// refine_solve: masked_solve's tensors plus the exchange options.
inline void check_refine_solve(const at::Tensor& G, const at::Tensor& U, const at::Tensor& W1, const at::Tensor& mask,
                               int64_t rounds, int64_t m, double tol) {
  const char* op = "pyprune.refine_solve";
  check_masked_solve(G, U, W1, mask, op);
  TORCH_CHECK_VALUE(rounds >= 0 && rounds <= INT32_MAX, pp_msg(op, ": rounds must be >= 0, got ", rounds));
  TORCH_CHECK_VALUE(m >= 0 && m <= G.size(0), pp_msg(op, ": m (the N:M group size, 0 for none) must be in [0, B], "
                                                     "got ", m));
  TORCH_CHECK_VALUE(tol >= 0.0, pp_msg(op, ": tol must be >= 0"));
}

inline void check_hessian_update(const at::Tensor& H, const at::Tensor& X) {
  const char* op = "pyprune.hessian_update";
  check_matrix(op, "H", H);
  check_matrix(op, "X", X);
  TORCH_CHECK_TYPE(H.scalar_type() == at::kFloat, pp_msg(op, ": H must be float32, got ", H.scalar_type()));
  TORCH_CHECK_TYPE(is_weight_dtype(X.scalar_type()) || X.scalar_type() == at::kDouble, pp_msg(op,
                   ": X must be a float32, float16, bfloat16 or float64 tensor, got ", X.scalar_type()));
  const int64_t cols = H.size(0);
  TORCH_CHECK_VALUE(H.size(1) == cols, pp_msg(op, ": H must be square, got ", H.sizes()));
  TORCH_CHECK_VALUE(X.size(1) == cols, pp_msg(op, ": X has ", X.size(1), " columns but H is ", cols, " x ", cols));
  check_device(op, H, "H", X, "X");
}

// Groups per chunk for the exact N:M tables, so that the (group, subset) tables stay under ~64 MB.
inline int64_t nm_groups_per_chunk(int64_t n, int64_t m, int64_t ngroups) {
  const int64_t per_group = (int64_t)nm_binom((int)m, (int)n) * nm_entry_floats((int)n);
  const int64_t budget = int64_t(16) << 20;  // floats
  return std::max<int64_t>(1, std::min<int64_t>(ngroups, budget / std::max<int64_t>(per_group, 1)));
}

}  // namespace pyprune

namespace pyprune {

// Calls f(T{}) with T = float, c10::Half or c10::BFloat16 according to a weight tensor's dtype.
template <class F>
void dispatch_weight_cpu(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK_TYPE(false, pp_msg("unsupported weight dtype ", t));
  }
}

}  // namespace pyprune
