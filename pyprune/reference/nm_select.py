"""N:M mask selection inside one block (docs/ALGORITHM.md section 4)."""
from __future__ import annotations

import itertools

import torch


def nm_subsets(n: int, m: int) -> list[tuple[int, ...]]:
    """All n-subsets of range(m) in lexicographic order: the order in which ties are broken (first wins)."""
    return list(itertools.combinations(range(m), n))


def nm_select(W1: torch.Tensor, G: torch.Tensor, n: int, m: int, exact: bool = True) -> torch.Tensor:
    """Mask (True = prune) with exactly ``n`` pruned weights in every group of ``m`` consecutive columns of each row.

    exact=True:  the subset S minimising the group loss ``1/2 w_S^T (G[S, S])^{-1} w_S``, with G[S, S] taken from
                 the group's diagonal ``m x m`` block of G (all C(m, n) subsets enumerated; ties: first subset).
    exact=False: the n smallest saliencies ``w_j^2 / G_jj`` (ties: lowest column index).
    With a diagonal G both choices agree. Computes in float64.
    """
    rows, B = W1.shape
    W = W1.to(torch.float64)
    Gd = G.to(torch.float64)
    mask = torch.zeros(rows, B, dtype=torch.bool, device=W1.device)
    if not exact:
        score = (W * W / torch.diagonal(Gd)).reshape(rows, B // m, m)
        # stable sort: equal scores keep column order, so the lowest index is pruned first
        idx = torch.sort(score, dim=2, stable=True).indices[:, :, :n]
        return mask.reshape(rows, B // m, m).scatter_(2, idx, True).reshape(rows, B)
    subsets = nm_subsets(n, m)
    for g0 in range(0, B, m):
        w = W[:, g0:g0 + m]
        Gg = Gd[g0:g0 + m, g0:g0 + m]
        costs = torch.stack([
            0.5 * torch.einsum("ri,ij,rj->r", w[:, list(S)], torch.linalg.inv(Gg[list(S)][:, list(S)]), w[:, list(S)])
            for S in subsets], dim=1)
        best = torch.argmin(costs, dim=1)  # first minimum on ties
        chosen = torch.zeros(len(subsets), m, dtype=torch.bool, device=W1.device)
        for s, S in enumerate(subsets):
            chosen[s, list(S)] = True
        mask[:, g0:g0 + m] = chosen[best]
    return mask
