"""The batched inverse-Hessian submatrix solve of one block (ALGORITHM.md section 3)."""
from __future__ import annotations

import torch


def masked_solve(G: torch.Tensor, U_B: torch.Tensor, W1: torch.Tensor, mask: torch.Tensor,
                 chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row i with pruned set M_i (``mask[i]`` True):

        G[M_i, M_i] lambda_i = w_i[M_i],   e_i = U_B[:, M_i] lambda_i,   loss_i = 1/2 lambda_i^T w_i[M_i].

    Written as the padded ``rows x B x B`` batch (the obvious torch implementation): the system
    ``diag(m) G diag(m) + diag(1 - m)`` has solution lambda on M_i and 0 elsewhere. Computes in the dtype of ``G``.
    Returns ``E`` (rows x B) and ``loss`` (rows,).
    """
    dtype = G.dtype
    rows, B = W1.shape
    E = torch.empty(rows, B, dtype=dtype, device=W1.device)
    loss = torch.empty(rows, dtype=dtype, device=W1.device)
    eye = torch.eye(B, dtype=dtype, device=W1.device)
    for r0 in range(0, rows, chunk_rows):
        m = mask[r0:r0 + chunk_rows].to(dtype)
        rhs = W1[r0:r0 + chunk_rows].to(dtype) * m
        A = G * m[:, :, None] * m[:, None, :] + eye * (1 - m)[:, None, :]
        lam = torch.cholesky_solve(rhs[..., None], torch.linalg.cholesky(A))[..., 0]
        E[r0:r0 + chunk_rows] = lam @ U_B.to(dtype).T
        loss[r0:r0 + chunk_rows] = 0.5 * (lam * rhs).sum(1)
    return E, loss
