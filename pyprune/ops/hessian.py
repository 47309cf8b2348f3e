"""Hessian accumulation op: ``H <- beta H + alpha X^T X`` in place, X in its own dtype, fp32 accumulation."""
from __future__ import annotations

import torch

from ._backend import resolve
from ._checks import (SYMMETRY_RTOL, all_finite, check_count, check_matrix, check_same_device, check_tensor_device,
                      symmetry_error, symmetry_stats)

# Rows of H compared with its columns by accumulate_hessian when it reads an existing H (n > 0): a spot check that
# catches a one-triangle H at the cost of reading 16 rows and 16 columns, not a pass over H per batch.
_SPOT_ROWS = 16


def _check_update_args(H: torch.Tensor, X: torch.Tensor) -> None:
    check_matrix("H", H, dtypes=(torch.float32, torch.float64), finite=False)
    cols = H.shape[0]
    check_matrix("H", H, shape=(cols, cols), dtypes=None, finite=False)
    check_matrix("X", X, finite=False)
    if X.shape[1] != cols:
        raise ValueError(f"X has {X.shape[1]} columns but H is {cols} x {cols}")
    check_same_device(H=H, X=X)


# The backend "auto" takes, from measurements (k = 32768 bf16 tokens per call):
# - CUDA tensors: the library call (backend "torch", ``_library_update_``). On an H200 (benchmarks/results/gpu/
#   bench_hessian.md) torch.addmm(H, X.T, X, out_dtype=float32) took 84.4 ms at 28672 columns against 89.1 ms for the
#   Triton kernel and 155 ms for the CUDA (WMMA) kernel; 6.0 / 7.6 / 12.9 ms at 8192 columns. Both kernels compute
#   only the upper triangle, half the library's flops, and still lose, so they stay as explicit backends
#   (backend="triton" / "cuda") for benchmarks/bench_hessian.py, which times all of them against the library call.
# - CPU tensors: the C++ op (csrc/cpu/hessian.cpp): the upper triangle only, by library GEMMs on strips of 128-256
#   rows of H (X up-cast to fp32 once), about half the flops of the whole X^T X, then a blocked mirror. Against the
#   bare library call (the whole product) it is 1.3-1.8x faster at 512-1024 columns and 2048 tokens, 1 thread
#   (benchmarks/results/cpu_ops.md, hessian_update).
AUTO_CUDA = "torch"
# Tile of the torch mirror (``_mirror_upper_``): cache-sized on the CPU; on a GPU few, large launches.
_MIRROR_TILE = {"cpu": 128}
_MIRROR_TILE_DEFAULT = 4096


def hessian_backend(H: torch.Tensor, X: torch.Tensor, backend: str = "auto") -> str:
    """What ``hessian_update_(H, X, ..., backend=backend)`` runs: "torch" (the library call), "native" or
    "triton"."""
    return resolve(backend, "hessian_update", H.device, float64=H.dtype == torch.float64, auto_cuda=AUTO_CUDA)


def _mirror_upper_(H: torch.Tensor) -> None:
    """Copy H's upper triangle onto its lower one in place, tile by tile (no n x n temporary): H becomes exactly
    symmetric, the contract of every backend. A GEMM computes the two mirror entries of X^T X separately: with MKL here
    (512 columns, 2048 tokens) 78% of the pairs differed, by up to 2.2e-8 of max |H|."""
    n = H.shape[0]
    T = _MIRROR_TILE.get(H.device.type, _MIRROR_TILE_DEFAULT)
    for i0 in range(0, n, T):
        i1 = min(n, i0 + T)
        for j0 in range(0, i0, T):
            H[i0:i1, j0:j0 + T].copy_(H[j0:j0 + T, i0:i1].T)
        d = H[i0:i1, i0:i1]
        lower = torch.ones(i1 - i0, i1 - i0, dtype=torch.bool, device=H.device).tril_(-1)
        d.copy_(torch.where(lower, d.T, d))


def _library_update_(H: torch.Tensor, X: torch.Tensor, alpha: float, beta: float) -> None:
    """Backend "torch": ``H <- beta H + alpha X^T X`` by one library GEMM in place, then ``_mirror_upper_``.

    16-bit X with an fp32 H on CUDA: ``torch.addmm(..., out_dtype=float32)`` (cuBLAS reads X in its own dtype: exact
    products, fp32 sums and output, no up-cast copy of X). Elsewhere X is converted to H's dtype first (torch 2.13's
    CPU build has no out_dtype addmm). ``beta = 0`` does not read H (BLAS semantics), and only H's upper triangle
    reaches the result. TF32 is never used here (``allow_tf32`` is a permission the kernels may take)."""
    if H.device.type == "cuda" and H.dtype == torch.float32 and X.dtype in (torch.float16, torch.bfloat16):
        torch.addmm(H, X.T, X, beta=beta, alpha=alpha, out_dtype=torch.float32, out=H)
    else:
        Xc = X.to(H.dtype)
        H.addmm_(Xc.T, Xc, beta=beta, alpha=alpha)
    _mirror_upper_(H)


def hessian_update_(H: torch.Tensor, X: torch.Tensor, alpha: float, beta: float, *, allow_tf32: bool = False,
                    backend: str = "auto") -> torch.Tensor:
    """In place ``H <- beta * H + alpha * X^T X``; ``H`` is (cols, cols) float32/float64, ``X`` is (k, cols).

    H must be symmetric: every backend reads only its upper triangle (``beta = 0`` reads nothing) and leaves H
    exactly symmetric. Backends: "torch" is the library GEMM (``_library_update_``, what "auto" takes on CUDA
    tensors), "cpp"/"cuda" the compiled ops, "triton" the Triton kernel. No value checks here (NaN in X gives NaN in
    H); ``accumulate_hessian`` checks before it writes."""
    _check_update_args(H, X)
    which = hessian_backend(H, X, backend)
    if which == "native":
        torch.ops.pyprune.hessian_update(H, X.contiguous(), float(alpha), float(beta), bool(allow_tf32))
    elif which == "triton":
        from ..triton_kernels.hessian import hessian_update_triton
        hessian_update_triton(H, X.contiguous(), float(alpha), float(beta), allow_tf32=bool(allow_tf32))
    else:
        _library_update_(H, X, float(alpha), float(beta))
    return H


def _check_update_values(H: torch.Tensor, X: torch.Tensor, alpha: float, beta: float) -> None:
    """Raise before ``H <- beta H + alpha X^T X`` writes anything non-finite: X must be finite and its sums of
    squares must fit H's dtype (every backend accumulates in it), and when H is read (beta != 0) H's diagonal must be
    finite and a spot check must find H symmetric. One host sync.

    X is judged by one norm: ||X||_F^2 is the trace of X^T X, NaN/Inf propagate into it, and every |(X^T X)_ij| and
    every partial sum of the accumulation is at most it. Cost measured here on one CPU thread, X of 2048 x 1024 and
    2048 x 2048, the whole check (norm, trace, spot check): 0.5-4.9 ms against 72-423 ms for the update, 0.6-3.5%
    (isfinite(X).all() alone took 7-21 ms). fp16 X is normed in fp32 (an fp16 norm overflows at 65504)."""
    dt = torch.float64 if H.dtype == torch.float64 else torch.float32 if X.dtype == torch.float16 else None
    stats = [torch.linalg.vector_norm(X, dtype=dt).double()]
    if beta != 0:
        stats.append(torch.diagonal(H).double().sum())
        stats.extend(symmetry_stats(H, rows=_SPOT_ROWS))
    vals = torch.stack(stats).tolist()
    fmax = torch.finfo(H.dtype).max
    sq = vals[0] ** 2
    if not sq <= fmax / 2:  # NaN, Inf or too large
        if all_finite(X):
            raise ValueError(f"X^T X overflows {H.dtype}: the calibration activations X have a sum of squares of "
                             f"{sq:.3g}; scale them down (H is unchanged)")
        raise ValueError(f"X contains NaN or Inf values (found {'NaN' if bool(torch.isnan(X).any()) else 'Inf'}): "
                         "the calibration activations are not finite (H is unchanged)")
    if beta != 0:
        trace, worst, scale = vals[1:]
        if not abs(trace) < float("inf"):
            raise ValueError("H has NaN or Inf on its diagonal: the running Hessian is not finite (H is unchanged)")
        if worst > SYMMETRY_RTOL * scale:
            raise symmetry_error("H", worst, scale, SYMMETRY_RTOL, H.shape[0])
        if beta * abs(trace) + alpha * sq > fmax / 2:
            raise ValueError(f"the Hessian would overflow {H.dtype}: trace(H) = {trace:.3g}, ||X||_F^2 = {sq:.3g} "
                             "(H is unchanged)")


def accumulate_hessian(H: torch.Tensor, n: int, X: torch.Tensor, **kwargs) -> int:
    """Running mean of docs/ALGORITHM.md section 1, in place on ``H``: ``H <- H n/(n+k) + 2/(n+k) X^T X``.

    ``n`` (a non-negative int) is the number of tokens already in ``H``; ``X`` may have leading batch dimensions (they
    are flattened into the k tokens). Returns the new count n + k. Every argument and value is checked before ``H``
    is written: on any error ``H`` is unchanged (NaN/Inf in X, an overflow, a non-finite diagonal or an asymmetric H
    when n > 0). Keyword arguments go to ``hessian_update_`` (``backend``, ``allow_tf32``).
    """
    n = check_count("n", n)
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"X must be a torch.Tensor, got {type(X).__name__}")
    check_tensor_device("X", X)
    if X.dim() == 0:
        raise ValueError("X must have shape (..., cols), got a 0-d tensor")
    X = X.reshape(-1, X.shape[-1])
    _check_update_args(H, X)
    k = X.shape[0]
    if k == 0:
        return n
    alpha, beta = 2.0 / (n + k), n / (n + k)
    _check_update_values(H, X, alpha, beta)
    hessian_update_(H, X, alpha, beta, **kwargs)
    return n + k
