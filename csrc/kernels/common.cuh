// Shared helpers for the per-row math in csrc/kernels/*.cuh. No torch headers: this file is included by the CPU
// ops (g++) and by the CUDA kernels (nvcc), so both run exactly the same arithmetic.
#pragma once

#include <stdint.h>

#include <cmath>
#include <limits>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define PP_HD __host__ __device__ __forceinline__
#define PP_DEV __device__ __forceinline__
#else
#define PP_HD inline
#endif

namespace pyprune {

// Value conversion to fp32. The CPU side passes c10::Half / c10::BFloat16, which convert with static_cast; the
// CUDA side passes __half / __nv_bfloat16 (torch builds with __CUDA_NO_HALF_CONVERSIONS__, so use intrinsics).
template <class T>
struct ToF32 {
  PP_HD static float f(T x) { return static_cast<float>(x); }
};
#ifdef __CUDACC__
template <>
struct ToF32<__half> {
  PP_HD static float f(__half x) { return __half2float(x); }
};
template <>
struct ToF32<__nv_bfloat16> {
  PP_HD static float f(__nv_bfloat16 x) { return __bfloat162float(x); }
};
#endif
template <class T>
PP_HD float to_f32(T x) { return ToF32<T>::f(x); }

// Packed row-major lower triangle: element (i, j), j <= i, lives at tri(i) + j.
PP_HD int tri(int i) { return i * (i + 1) / 2; }

PP_HD float pp_sqrtf(float x) {
#ifdef __CUDA_ARCH__
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}
PP_HD double pp_sqrt(double x) {
#ifdef __CUDA_ARCH__
  return sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// Fused multiply-add a * b + c with one rounding (the hardware instruction on CUDA and on CPUs built for it).
PP_HD float pp_fmaf(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#elif defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;  // no FMA instruction in this build: a library fmaf call would be far slower
#endif
}

PP_HD float pp_inf() {
#ifdef __CUDA_ARCH__
  return __int_as_float(0x7f800000);
#else
  return std::numeric_limits<float>::infinity();
#endif
}
PP_HD float pp_nan() {
#ifdef __CUDA_ARCH__
  return __int_as_float(0x7fffffff);
#else
  return std::numeric_limits<float>::quiet_NaN();
#endif
}

}  // namespace pyprune
