"""Batched inverse-Hessian submatrix solve: every row removes its own set of weights of the block at once."""
from __future__ import annotations

import torch

from .. import reference
from ._backend import resolve
from ._checks import check_matrix, check_same_device, check_symmetric


def masked_solve(G: torch.Tensor, U_B: torch.Tensor, W1: torch.Tensor, mask: torch.Tensor, *,
                 backend: str = "auto", check_values: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row i: ``G[M_i, M_i] lambda_i = w_i[M_i]``, ``e_i = U_B[:, M_i] lambda_i``, ``loss_i = 1/2 lambda_i^T w_i[M_i]``.

    G, U_B: (B, B) float32/float64 (U_B upper triangular, G = U_B^T U_B, symmetric within rounding: checked);
    W1: (rows, B); mask: (rows, B) bool, True = pruned. Returns E (rows, B) and loss (rows,) in G's dtype.

    Every backend's op also returns a per-row status (0 = solved, else 1 + the block column of the first
    non-positive pivot); a ValueError naming the first failing row and column is raised here if any row failed, so
    nothing with NaN is returned. Costs one host sync on CUDA tensors. ``check_values=False`` skips the checks that
    read every value (finite entries, G's symmetry), not those of types and shapes: for callers whose inputs are
    finite and symmetric by construction (the pruning drivers, which checked W and H once per layer).
    """
    check_masked_solve_args(G, U_B, W1, mask, values=check_values)
    which = resolve(backend, "masked_solve", G.device,
                    float64=G.dtype == torch.float64 or W1.dtype == torch.float64)
    if which == "native":
        E, loss, status = torch.ops.pyprune.masked_solve(G.contiguous(), U_B.contiguous(), W1.contiguous(),
                                                         mask.contiguous())
    elif which == "triton":
        from ..triton_kernels.masked_solve import masked_solve_triton
        E, loss, status = masked_solve_triton(G.contiguous(), U_B.contiguous(), W1.contiguous(), mask.contiguous())
    else:
        E, loss, status = reference.masked_solve(G, U_B, W1, mask)
    check_status(status, mask)
    return E, loss


def check_masked_solve_args(G: torch.Tensor, U_B: torch.Tensor, W1: torch.Tensor, mask: torch.Tensor, *,
                            values: bool = True) -> None:
    """The argument checks of masked_solve and refine_solve (ValueError / TypeError naming the argument);
    ``values=False``: types, shapes and devices only (no pass over the values)."""
    B = G.shape[0] if isinstance(G, torch.Tensor) and G.dim() == 2 else -1
    check_matrix("G", G, dtypes=(torch.float32, torch.float64), shape=(B, B), finite=values)
    if values:
        check_symmetric("G", G)
    check_matrix("U_B", U_B, dtypes=(G.dtype,), shape=(B, B), finite=values)
    check_matrix("W1", W1, finite=values)
    if W1.shape[1] != B:
        raise ValueError(f"W1 has {W1.shape[1]} columns but G is {B} x {B}")
    check_matrix("mask", mask, dtypes=(torch.bool,), shape=W1.shape, finite=False)
    check_same_device(G=G, U_B=U_B, W1=W1, mask=mask)


def check_status(status: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise the masked solve's failure (the same message for every backend) if any row's status is not 0."""
    bad = status != 0
    if not bool(bad.any()):
        return
    rows = torch.nonzero(bad).flatten()
    r = int(rows[0])
    col = int(status[r]) - 1
    raise ValueError(f"masked_solve: G[M, M] is not positive definite for {rows.numel()} of {status.numel()} rows "
                     f"(first: row {r}, which prunes {int(mask[r].sum())} weights of the block; non-positive pivot at "
                     f"block column {col}): the damped Hessian block is not positive definite; increase damp (or "
                     "check that H is a symmetric positive semi-definite Hessian of finite activations)")
