// extern "C" launchers of the CUDA kernels: raw pointers and a stream, no torch types (the .cu files include only
// CUDA headers, which keeps nvcc at seconds per file). The torch glue is ops_cuda.cpp.
// Weight dtype codes: 0 = float32, 1 = float16, 2 = bfloat16.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Largest B that masked_solve supports on `device` (rows with every weight pruned need a packed B x B triangle
// in shared memory).
int pyprune_masked_solve_cuda_max_b(int device);

// E (rows, B), loss (rows,) and status (rows,) for W (rows, B) of dtype wdtype and mask (rows, B) bytes. status:
// 0 = solved, else 1 + the block column of the first non-positive pivot (that row's E and loss are NaN).
cudaError_t pyprune_masked_solve_cuda(const float* G, const float* U, const void* W, int wdtype,
                                      const uint8_t* mask, float* E, float* loss, int32_t* status, int rows, int B,
                                      cudaStream_t stream);

// Largest B that refine_solve supports on `device` (a fully pruned row keeps Ainv, L^-1 and U in shared memory).
int pyprune_refine_solve_cuda_max_b(int device);

// masked_solve after up to `rounds` exchanges per row (inside groups of m columns when m > 0): E, loss, status as
// masked_solve's, the final mask mout (rows, B) bytes and the exchanges made per row.
cudaError_t pyprune_refine_solve_cuda(const float* G, const float* U, const void* W, int wdtype, const uint8_t* mask,
                                      int rounds, int m, float tol, float* E, float* loss, int32_t* status,
                                      uint8_t* mout, int32_t* nswaps, int rows, int B, cudaStream_t stream);

// Mask (rows, B) bytes. exact: `tab` holds groups_per_chunk * C(m, n) * (1 + n(n+1)/2) floats and `sub`
// C(m, n) * n bytes of scratch; both are unused when !exact.
cudaError_t pyprune_nm_select_cuda(const void* W, int wdtype, const float* G, uint8_t* out, int rows, int B, int n,
                                   int m, int exact, int groups_per_chunk, float* tab, uint8_t* sub,
                                   cudaStream_t stream);

// In place H <- beta H + alpha X^T X for X (k, cols) of dtype xdtype; H (cols, cols) fp32 row-major. Reads the
// upper triangle of H only and writes the full symmetric result; beta == 0 does not read H.
cudaError_t pyprune_hessian_update_cuda(float* H, const void* X, int xdtype, int k, int cols, float alpha,
                                        float beta, int allow_tf32, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
