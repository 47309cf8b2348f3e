"""Pieces every layer algorithm shares: argument checks, the damped Hessian and its inverse Cholesky factor,
unstructured mask selection, the result type and the layer objective."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Sparsity
from ..ops._checks import check_matrix, check_same_device


@dataclass
class PruneResult:
    """weight: the pruned weight in the input's dtype (exact zeros where pruned); mask: bool, True = pruned;
    loss: the layer loss sum_i 1/2 (w_i - w_hat_i) H_d (w_i - w_hat_i)^T (as a float); row_loss: per row."""

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float
    row_loss: torch.Tensor

    @property
    def sparsity(self) -> float:
        return float(self.mask.float().mean()) if self.mask.numel() else 0.0


def compute_dtype(W: torch.Tensor) -> torch.dtype:
    """float64 stays float64; fp16/bf16/fp32 weights are processed in float32 (as SparseGPT does)."""
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def check_layer(W: torch.Tensor, H: torch.Tensor | None, sparsity: Sparsity) -> None:
    check_matrix("weight", W)
    rows, cols = W.shape
    if H is not None:
        check_matrix("H", H, dtypes=(torch.float32, torch.float64), shape=(cols, cols))
        check_same_device(weight=W, H=H)
    if sparsity.structured and cols % sparsity.m:
        raise ValueError(f"{sparsity} sparsity needs the number of input columns ({cols}) to be a multiple of "
                         f"M={sparsity.m}")


def damped_hessian(W: torch.Tensor, H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (W', H_d, dead): a compute-dtype copy of W with dead columns zeroed, the damped Hessian with
    ``H[j, j] = 1`` on dead columns (zero diagonal), and the dead-column mask (ALGORITHM.md section 1)."""
    dt = compute_dtype(W)
    W = W.to(dt).clone()
    H = H.to(dt).clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    diag.add_(damp * torch.mean(diag))
    return W, H, dead


def inverse_cholesky_upper(H_d: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor:
    """Upper Cholesky factor U of H_d^{-1} (H_d^{-1} = U^T U), as SparseGPT computes it.

    ``overwrite=True`` lets the factorisation run in H_d's own storage and returns U in it, so that at most three
    cols x cols buffers are alive (H_d, the identity and L^{-1}) instead of six (3 GiB each for a 70B down_proj's
    28672 columns: the first GPU run held 19 GiB above W and H here)."""
    if not overwrite:
        H_d = H_d.clone()
    info = torch.empty((), dtype=torch.int32, device=H_d.device)
    torch.linalg.cholesky_ex(H_d, out=(H_d, info))  # L, in place
    if int(info) != 0:
        raise ValueError("the damped Hessian is not positive definite (Cholesky failed at column "
                         f"{int(info) - 1}); increase damp or check the calibration activations")
    # L^{-T} L^{-1} through a triangular solve: torch.cholesky_inverse is pathologically slow on the CPU (23 s
    # against 0.3 s for 1536 x 1536, measured here)
    L_inv = torch.linalg.solve_triangular(H_d, torch.eye(H_d.shape[0], dtype=H_d.dtype, device=H_d.device),
                                          upper=False)
    torch.matmul(L_inv.T, L_inv, out=H_d)  # H_d^{-1}, over L (no longer needed)
    del L_inv
    torch.linalg.cholesky_ex(H_d, upper=True, out=(H_d, info))
    if int(info) != 0:
        raise ValueError("the inverse Hessian is not positive definite in this precision; increase damp")
    return H_d


def obs_setup(W: torch.Tensor, H: torch.Tensor, config, mask: torch.Tensor | None):
    """What the OBS-family methods (joint, SparseGPT) start from: checked arguments, the compute-dtype copy of W
    (dead columns zeroed), U = upper Cholesky factor of H_d^{-1}, an empty mask and zero per-row losses."""
    check_layer(W, H, config.sparsity)
    check_fixed_mask(mask, W)
    Wc, H_d, _ = damped_hessian(W, H, config.damp)
    U = inverse_cholesky_upper(H_d, overwrite=True)  # H_d is our own copy
    del H_d
    rows, cols = Wc.shape
    return (Wc, U, torch.zeros(rows, cols, dtype=torch.bool, device=W.device),
            torch.zeros(rows, dtype=Wc.dtype, device=W.device))


def smallest_mask(score: torch.Tensor, fraction: float, scope: str) -> torch.Tensor:
    """True on the ``round(fraction * count)`` smallest scores, counted over each row (scope="row") or over the
    whole matrix (scope="block"). Ties are broken by position (stable sort)."""
    rows, cols = score.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=score.device)
    if scope == "row":
        k = int(round(fraction * cols))
        if k:
            idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
            mask.scatter_(1, idx, True)
        return mask
    k = int(round(fraction * rows * cols))
    if k:
        idx = torch.sort(score.reshape(-1), stable=True).indices[:k]
        mask.view(-1)[idx] = True
    return mask


def nm_smallest_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True on the ``n`` smallest scores of every group of ``m`` consecutive columns (ties: lowest index)."""
    rows, cols = score.shape
    idx = torch.sort(score.reshape(rows, cols // m, m), dim=2, stable=True).indices[:, :, :n]
    return torch.zeros(rows, cols // m, m, dtype=torch.bool, device=score.device).scatter_(2, idx, True).reshape(
        rows, cols)


def layer_objective(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row ``1/2 (w - w_hat) H (w - w_hat)^T`` (ALGORITHM.md section 1), in H's dtype."""
    D = W.to(H.dtype) - W_hat.to(H.dtype)
    return 0.5 * ((D @ H) * D).sum(1)


def check_fixed_mask(mask: torch.Tensor | None, W: torch.Tensor) -> None:
    if mask is not None:
        check_matrix("mask", mask, dtypes=(torch.bool,), shape=W.shape, finite=False)
        check_same_device(weight=W, mask=mask)
