"""Swap refinement of a block's mask (issue 13's lever; a mask choice in the sense of ALGORITHM.md section 4).

Given a block's pruned set ``M`` of a row (from any one-shot rule), try every exchange of one pruned weight ``j`` and
one kept weight ``k`` of the same row (N:M: of the same group, so the pattern holds) and apply the one that lowers the
row's exact block loss ``L(M) = 1/2 w_M^T (G[M, M])^{-1} w_M`` the most; repeat until no exchange lowers it or
``rounds`` exchanges were made. The count per row (per group) never changes, so the sparsity is that of the start.

Every exchange of a row is scored at once from one solve with ``A = G[M, M]``: with ``lam = A^{-1} w_M``,
``u_k = A^{-1} G[M, k]``, ``s_k = G_kk - G[k, M] u_k`` (the Schur complement of adding k) and
``r_k = w_k - G[k, M] lam``,

    L(M + k)     = L(M) + r_k^2 / (2 s_k)
    L(M + k - j) = L(M + k) - 1/2 (lam_j - u_jk r_k / s_k)^2 / ((A^{-1})_jj + u_jk^2 / s_k)

(adding one weight to the set, then the OBS removal of one weight under the bordered inverse). The joint solve then
applies the update of the final set, so the loss it reports is exact whatever this chose.
"""
from __future__ import annotations

import torch

# An exchange is taken only when it lowers the row's loss by more than this fraction of it (float64): exchanges
# inside the compute dtype's rounding would let a row cycle between two sets of the same loss.
REL_TOL = 1e-9
REL_TOL_LOW = 1e-5  # float32 and below: the updated inverses carry rounding of this order


def swap_refine(W1: torch.Tensor, G: torch.Tensor, M1: torch.Tensor, rounds: int, *, m: int = 0,
                chunk_rows: int = 1024) -> torch.Tensor:
    """The refined mask (rows, B), bool, True = prune. ``W1`` (rows, B): the block's current weights; ``G`` (B, B): the
    block's inverse-Hessian submatrix (ALGORITHM.md section 3); ``M1``: the starting mask; ``rounds``: at most this many
    exchanges per row; ``m`` > 0: exchanges stay inside groups of ``m`` consecutive columns (N:M)."""
    if rounds <= 0 or M1.numel() == 0:
        return M1
    out = M1.clone()
    counts = M1.sum(1)
    B = M1.shape[1]
    for c in torch.unique(counts).tolist():
        if c == 0 or c == B:
            continue  # nothing to exchange
        rows = torch.nonzero(counts == c).flatten()
        for r0 in range(0, rows.numel(), chunk_rows):
            idx = rows[r0:r0 + chunk_rows]
            out[idx] = _refine_rows(W1[idx].to(G.dtype), G, M1[idx], int(c), rounds, m)
    return out


def _refine_rows(w: torch.Tensor, G: torch.Tensor, mask: torch.Tensor, c: int, rounds: int, m: int) -> torch.Tensor:
    n, B = w.shape
    # positions: iM the row's pruned columns, iK its kept ones (an exchange swaps one entry of each in place)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    iM, iK = order[:, :c].contiguous(), order[:, c:].contiguous()
    Ainv = torch.cholesky_inverse(torch.linalg.cholesky(G[iM[:, :, None], iM[:, None, :]]))  # (n, c, c)
    live = torch.arange(n, device=w.device)  # rows whose last exchange lowered their loss
    tol = REL_TOL if w.dtype == torch.float64 else REL_TOL_LOW
    inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
    g_diag = torch.diagonal(G)
    for _ in range(rounds):
        jM, jK, Ai, wl = iM[live], iK[live], Ainv[live], w[live]
        GMK = G[jM[:, :, None], jK[:, None, :]]                    # (l, c, B - c)
        wM, wK = wl.gather(1, jM), wl.gather(1, jK)
        lam = (Ai @ wM[:, :, None])[:, :, 0]
        U = Ai @ GMK
        loss = 0.5 * (lam * wM).sum(1)
        s = (g_diag[jK] - (GMK * U).sum(1)).clamp_min(torch.finfo(w.dtype).tiny)  # (l, B - c)
        r = wK - (GMK * lam[:, :, None]).sum(1)
        t = r / s
        num = lam[:, :, None] - U * t[:, None, :]                  # (l, c, B - c)
        den = torch.diagonal(Ai, dim1=1, dim2=2)[:, :, None] + U * U / s[:, None, :]
        delta = (0.5 * r * t)[:, None, :] - 0.5 * num * num / den
        if m:
            delta = torch.where((jM // m)[:, :, None] == (jK // m)[:, None, :], delta, inf)
        best, flat = delta.reshape(live.numel(), -1).min(1)
        take = best < -tol * loss.abs()
        if not bool(take.any()):
            break
        live, p, q = live[take], (flat // (B - c))[take], (flat % (B - c))[take]
        j, k = iM[live, p], iK[live, q]
        iM[live, p], iK[live, q] = k, j
        # Ainv of the new set: remove position p (rank-1 downdate), then border it with k at the same position
        Ai = Ainv[live]
        a = Ai.gather(2, p[:, None, None].expand(-1, c, 1))[:, :, 0]  # column p
        app = a.gather(1, p[:, None])
        D = Ai - a[:, :, None] * a[:, None, :] / app[:, :, None]
        b = G[iM[live], k[:, None]]                                # (l, c): G[new set, k]
        u = (D @ b[:, :, None])[:, :, 0]
        sk = g_diag[k] - (u * b).sum(1)
        v = u.scatter(1, p[:, None], -1.0)                         # u - e_p (u_p = 0: D's row p is zero)
        Ainv[live] = D + v[:, :, None] * v[:, None, :] / sk[:, None, None]
    out = torch.zeros_like(mask)
    return out.scatter_(1, iM, True)
