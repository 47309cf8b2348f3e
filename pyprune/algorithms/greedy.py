"""Greedy OBS mask selection inside one block (docs/ALGORITHM.md section 4, "greedy refinement").

Per row, repeatedly remove the weight of least saliency ``w_j^2 / P_jj`` under the current conditional inverse
Hessian P of the block (starting from G), apply the OBS update to the row and downdate P (Schur complement),
until the row's count is reached. This is the exact OBS order; the joint solve then applies the same final update
(removing a set one at a time with exact downdates ends where removing it at once does).
"""
from __future__ import annotations

import torch


def greedy_mask(W1: torch.Tensor, G: torch.Tensor, counts: torch.Tensor | None = None, *, n: int = 0, m: int = 0,
                chunk_rows: int = 2048) -> torch.Tensor:
    """Bool mask (rows, B), True = prune. Either ``counts`` (rows,) weights per row (unstructured), or ``n``/``m``:
    exactly n per group of m consecutive columns (a group that is full stops being eligible)."""
    rows, B = W1.shape
    out = torch.zeros(rows, B, dtype=torch.bool, device=W1.device)
    for r0 in range(0, rows, chunk_rows):
        r1 = min(rows, r0 + chunk_rows)
        c = None if counts is None else counts[r0:r1]
        out[r0:r1] = _greedy_rows(W1[r0:r1].to(G.dtype), G, c, n, m)
    return out


def _greedy_rows(w: torch.Tensor, G: torch.Tensor, counts, n: int, m: int) -> torch.Tensor:
    rows, B = w.shape
    w = w.clone()
    P = G.expand(rows, B, B).clone()
    removed = torch.zeros(rows, B, dtype=torch.bool, device=w.device)
    steps = (B // m) * n if m else int(counts.max()) if rows else 0
    ar = torch.arange(rows, device=w.device)
    inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
    for t in range(steps):
        diag = torch.diagonal(P, dim1=1, dim2=2)
        sal = torch.where(removed, inf, w * w / diag.clamp_min(torch.finfo(w.dtype).tiny))
        if m:
            full = removed.reshape(rows, B // m, m).sum(-1, keepdim=True) >= n
            sal = torch.where(full.expand(rows, B // m, m).reshape(rows, B), inf, sal)
            active = torch.ones(rows, dtype=torch.bool, device=w.device)
        else:
            active = counts > t
        j = torch.argmin(sal, dim=1)
        Pj = P[ar, :, j]                                    # (rows, B): column j of each row's P
        pjj = Pj[ar, j]
        coef = torch.where(active, w[ar, j] / pjj, torch.zeros_like(pjj))
        w -= coef[:, None] * Pj
        scale = torch.where(active, 1.0 / pjj, torch.zeros_like(pjj))
        P -= scale[:, None, None] * Pj[:, :, None] * Pj[:, None, :]
        removed[ar[active], j[active]] = True
        # a removed column is frozen at zero: keep its P entries out of later steps' saliencies
        P[ar[active], j[active], j[active]] = 1.0
    return removed
