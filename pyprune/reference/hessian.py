"""Hessian accumulation (docs/ALGORITHM.md section 1)."""
from __future__ import annotations

import torch


def hessian_update(H: torch.Tensor, X: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Return ``beta * H + alpha * X^T X`` in H's dtype, for ``X`` of shape ``(k, cols)`` in any float dtype.
    ``beta = 0`` does not read H (as the kernels: an uninitialised H may hold NaN)."""
    Xf = X.to(H.dtype)
    if beta == 0:
        return alpha * (Xf.T @ Xf)
    return beta * H + alpha * (Xf.T @ Xf)


def accumulate_hessian(H: torch.Tensor, n: int, X: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running mean ``H <- H n/(n+k) + 2/(n+k) X^T X`` over the ``k`` rows of ``X`` (leading dims are flattened).

    Returns the new Hessian and the new token count. ``n`` must be a non-negative int.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    X = X.reshape(-1, X.shape[-1])
    k = X.shape[0]
    if n + k == 0:
        return H.clone(), 0
    return hessian_update(H, X, 2.0 / (n + k), n / (n + k)), n + k
