"""The batched inverse-Hessian submatrix solve of one block (docs/ALGORITHM.md section 3)."""
from __future__ import annotations

import torch


def masked_solve(G: torch.Tensor, U_B: torch.Tensor, W1: torch.Tensor, mask: torch.Tensor,
                 chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every row i with pruned set M_i (``mask[i]`` True):

        G[M_i, M_i] lambda_i = w_i[M_i],   e_i = U_B[:, M_i] lambda_i,   loss_i = 1/2 lambda_i^T w_i[M_i].

    Written as the padded ``rows x B x B`` batch (the obvious torch implementation): the system
    ``diag(m) G diag(m) + diag(1 - m)`` has solution lambda on M_i and 0 elsewhere. Computes in the dtype of ``G``.
    Returns ``E`` (rows x B), ``loss`` (rows,) and ``status`` (rows,) int32: 0 where solved, else 1 + the block
    column of the first non-positive Cholesky pivot of ``G[M_i, M_i]`` (cholesky_ex's info of the padded system: its
    identity padding never fails), with NaN in that row's ``E`` and ``loss``. Nothing raises for such rows.
    """
    dtype = G.dtype
    rows, B = W1.shape
    E = torch.empty(rows, B, dtype=dtype, device=W1.device)
    loss = torch.empty(rows, dtype=dtype, device=W1.device)
    status = torch.zeros(rows, dtype=torch.int32, device=W1.device)
    eye = torch.eye(B, dtype=dtype, device=W1.device)
    for r0 in range(0, rows, chunk_rows):
        r1 = min(rows, r0 + chunk_rows)
        m = mask[r0:r1].to(dtype)
        rhs = W1[r0:r1].to(dtype) * m
        A = G * m[:, :, None] * m[:, None, :] + eye * (1 - m)[:, None, :]
        L, info = torch.linalg.cholesky_ex(A)
        lam = torch.cholesky_solve(rhs[..., None], L)[..., 0]
        bad = info != 0
        E[r0:r1] = torch.where(bad[:, None], float("nan"), lam @ U_B.to(dtype).T)
        loss[r0:r1] = torch.where(bad, float("nan"), 0.5 * (lam * rhs).sum(1))
        status[r0:r1] = info.to(torch.int32)
    return E, loss, status
