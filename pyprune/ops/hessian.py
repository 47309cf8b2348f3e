"""Hessian accumulation op: ``H <- beta H + alpha X^T X`` in place, X in its own dtype, fp32 accumulation."""
from __future__ import annotations

import torch

from .. import reference
from ._backend import resolve
from ._checks import check_matrix, check_same_device


def hessian_update_(H: torch.Tensor, X: torch.Tensor, alpha: float, beta: float, *, allow_tf32: bool = False,
                    backend: str = "auto") -> torch.Tensor:
    """In place ``H <- beta * H + alpha * X^T X``; ``H`` is (cols, cols) float32/float64, ``X`` is (k, cols)."""
    check_matrix("H", H, dtypes=(torch.float32, torch.float64), finite=False)
    cols = H.shape[0]
    check_matrix("H", H, shape=(cols, cols), dtypes=None, finite=False)
    check_matrix("X", X, finite=False)
    if X.shape[1] != cols:
        raise ValueError(f"X has {X.shape[1]} columns but H is {cols} x {cols}")
    check_same_device(H=H, X=X)
    # bf16/fp16 X on an H200 (benchmarks/results/gpu/bench_hessian.md): the Triton kernel ran 1.7-1.8x faster than
    # the CUDA (WMMA) kernel and within 6% of cuBLAS's full bf16 product, so "auto" takes it there
    which = resolve(backend, "hessian_update", H.device, float64=H.dtype == torch.float64,
                    prefer_triton=X.dtype in (torch.float16, torch.bfloat16))
    if which == "native":
        torch.ops.pyprune.hessian_update(H, X.contiguous(), float(alpha), float(beta), bool(allow_tf32))
    elif which == "triton":
        from ..triton_kernels.hessian import hessian_update_triton
        hessian_update_triton(H, X.contiguous(), float(alpha), float(beta), allow_tf32=bool(allow_tf32))
    else:
        H.copy_(reference.hessian_update(H, X, alpha, beta))
    return H


def accumulate_hessian(H: torch.Tensor, n: int, X: torch.Tensor, **kwargs) -> int:
    """Running mean of ALGORITHM.md section 1, in place on ``H``: ``H <- H n/(n+k) + 2/(n+k) X^T X``.

    ``X`` may have leading batch dimensions (they are flattened into the k tokens). Returns the new count n + k.
    """
    X = X.reshape(-1, X.shape[-1])
    k = X.shape[0]
    if k == 0:
        return n
    hessian_update_(H, X, 2.0 / (n + k), n / (n + k), **kwargs)
    # NaN/Inf in X reach diag(H) (sums of squares): checking cols values instead of a pass over all of X
    if not bool(torch.isfinite(torch.diagonal(H)).all()):
        raise ValueError("the Hessian became non-finite: the calibration activations X contain NaN or Inf values "
                         "(or overflow float32)")
    return n + k
