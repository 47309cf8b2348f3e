"""Swap refinement of a block's mask (a mask choice in the sense of docs/ALGORITHM.md section 4), in plain torch:
the reference of the fused engine ``pyprune.ops.refine_solve`` (csrc/kernels/refine_solve.cuh), which runs the same
exchanges and the joint solve of the final set from one factorisation per row.

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
    block's inverse-Hessian submatrix (docs/ALGORITHM.md section 3); ``M1``: the starting mask; ``rounds``: at most
    this many exchanges per row; ``m`` > 0: exchanges stay inside groups of ``m`` consecutive columns (N:M)."""
    return swap_refine_counted(W1, G, M1, rounds, m=m, chunk_rows=chunk_rows)[0]


def swap_refine_counted(W1: torch.Tensor, G: torch.Tensor, M1: torch.Tensor, rounds: int, *, m: int = 0,
                        chunk_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``swap_refine``'s mask and the number of exchanges made in each row (int32)."""
    swaps = torch.zeros(M1.shape[0], dtype=torch.int32, device=M1.device)
    if rounds <= 0 or M1.numel() == 0:
        return M1, swaps
    out = M1.clone()
    counts = M1.sum(1)
    B = M1.shape[1]
    for c in torch.unique(counts).tolist():
        if c == 0 or c == B:
            continue  # nothing to exchange
        rows = torch.nonzero(counts == c).flatten()
        for r0 in range(0, rows.numel(), chunk_rows):
            idx = rows[r0:r0 + chunk_rows]
            out[idx], swaps[idx] = _refine_rows(W1[idx].to(G.dtype), G, M1[idx], int(c), rounds, m)
    return out, swaps


def _exchange_delta(lam, U, t, r, s, ainv_diag):
    """L(M + k - j) - L(M) for the pairs U spans: lam (.., c), U (.., c, K), t = r / s, r, s (.., 1, K) or (.., K)
    broadcast over the pruned axis, ainv_diag (.., c, 1)."""
    if t.dim() == U.dim() - 1:
        t, r, s = t.unsqueeze(-2), r.unsqueeze(-2), s.unsqueeze(-2)
    num = lam.unsqueeze(-1) - U * t
    return 0.5 * r * t - 0.5 * num * num / (ainv_diag + U * U / s)


def _times_G(x: torch.Tensor, iM: torch.Tensor, iK: torch.Tensor, G: torch.Tensor, B: int) -> torch.Tensor:
    """x^T G[M, K] per row: ``x`` (l, c) placed at the positions ``iM`` of a length-B row, times G (one small GEMM
    instead of gathering G[M, K]), read at the positions ``iK``."""
    return (x.new_zeros(x.shape[0], B).scatter_(1, iM, x) @ G).gather(1, iK)


def _refine_rows(w: torch.Tensor, G: torch.Tensor, mask: torch.Tensor, c: int, rounds: int,
                 m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of rows with ``c`` pruned weights each. State per row: the positions ``iM`` (pruned) and ``iK``
    (kept), ``Ainv = G[M, M]^{-1}``, the Schur complements ``s`` and ``U = Ainv @ G[M, K]`` (N:M from a grouped start:
    only the entries of ``U`` whose pruned and kept positions share a group, the only ones an exchange is scored with).
    After the exchange of pruned ``j`` (position p) and kept ``k`` (position q), with ``a = Ainv[:, p]``, the
    new set's ``u = D G[M', k]`` (``D = Ainv - a a^T / a_p``, ``Ainv`` without p), ``s_k = G_kk - u . G[M', k]`` and
    ``v = u - e_p``:

        Ainv' = D + v v^T / s_k
        U'    = U - a U[p, :] / a_p + v (v^T G[M', K']) / s_k,   column q: e_p - a / a_p + v (v^T G[M', j]) / s_k
        s'    = s + U[p, :]^2 / a_p - (v^T G[M', K'])^2 / s_k,  at q: 1 / a_p - (v^T G[M', j])^2 / s_k

    (``D`` has a zero row and column p, so a change of row p of ``G[M, K]`` does not reach it; ``Ainv G[M, j] =
    e_p``). ``U[p, :]`` and ``v^T G[M', K']`` are rows of a product with the whole ``G`` (one small GEMM per round),
    so ``G[M, K]`` is never stored: a round costs a few passes over ``Ainv`` plus O(B) per row, and O(c (B - c)) per
    row only where every pair is scored (no N:M groups). Rows leave the batch when their best exchange no longer lowers
    their loss."""
    n, B = w.shape
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # pruned first, each side in column order
    iM, iK = order[:, :c].contiguous(), order[:, c:].contiguous()
    K = B - c
    out_iM = iM.clone()
    swaps = torch.zeros(n, dtype=torch.int32, device=w.device)
    GM = G[iM]                                            # (n, c, B): rows, then gathers (2-4x faster than G[i, j])
    Ainv = torch.cholesky_inverse(torch.linalg.cholesky(GM.gather(2, iM[:, None, :].expand(n, c, c))))  # (n, c, c)
    GMK = GM.gather(2, iK[:, None, :].expand(n, c, K))                                                 # (n, c, K)
    del GM
    U = Ainv @ GMK
    g_diag = torch.diagonal(G)
    s = g_diag[iK] - (GMK * U).sum(1)                                                         # (n, K): adding k
    del GMK
    rows, wl = torch.arange(n, device=w.device), w
    tol = REL_TOL if w.dtype == torch.float64 else REL_TOL_LOW
    inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
    tiny = torch.finfo(w.dtype).tiny
    # N:M start (every group holds n_nm pruned weights): the sorted positions come group by group, and exchanges keep
    # every position in its group, so pruned position g * n_nm + x and kept position g * (m - n_nm) + y share group g
    n_nm = c // (B // m) if m and B % m == 0 and c % (B // m) == 0 else 0
    grouped = 0 < n_nm < m and bool((mask.view(n, B // m, m).sum(-1) == n_nm).all())
    if grouped:
        g = K // (m - n_nm)
        U = torch.diagonal(U.view(n, g, n_nm, g, m - n_nm), dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()
    for _ in range(rounds):                                                        # U: (l, g, n_nm, m - n_nm)
        l = rows.numel()
        wM, wK = wl.gather(1, iM), wl.gather(1, iK)
        lam = (Ainv @ wM[:, :, None])[:, :, 0]
        loss = 0.5 * (lam * wM).sum(1)
        r = wK - _times_G(lam, iM, iK, G, B)                                       # w_k - G[k, M] lam
        sc = s.clamp_min(tiny)
        t = r / sc
        if not grouped:  # every pruned / kept pair of the row (inside a group when m is given)
            delta = _exchange_delta(lam, U, t, r, sc, torch.diagonal(Ainv, dim1=1, dim2=2)[:, :, None])
            if m:
                delta = torch.where((iM // m)[:, :, None] == (iK // m)[:, None, :], delta, inf)
            best, flat = delta.reshape(l, -1).min(1)
        else:  # N:M: position p of iM pairs with the kept positions of its group only
            tg, rg, sg = (x.view(-1, g, 1, m - n_nm) for x in (t, r, sc))
            ainv = torch.diagonal(Ainv, dim1=1, dim2=2).view(-1, g, n_nm, 1)
            delta = _exchange_delta(lam.view(-1, g, n_nm), U, tg, rg, sg, ainv)    # (l, g, n, m - n)
            best, f = delta.reshape(l, -1).min(1)
            gi, rest = f // (n_nm * (m - n_nm)), f % (n_nm * (m - n_nm))
            flat = (gi * n_nm + rest // (m - n_nm)) * K + gi * (m - n_nm) + rest % (m - n_nm)
        take = best < -tol * loss.abs()
        if not bool(take.any()):
            break
        if not bool(take.all()):  # rows without an improving exchange are done: drop them from the batch
            rows, wl, iM, iK, Ainv, U, s, flat = (x[take] for x in (rows, wl, iM, iK, Ainv, U, s, flat))
            l = rows.numel()
        ar = torch.arange(l, device=w.device)
        p, q = flat // K, flat % K
        a = Ainv[ar, p, :]                                   # (l, c): Ainv's row p (= column p; rows are contiguous)
        app = a[ar, p]
        Urow = _times_G(a, iM, iK, G, B)                                           # U[p, :] = a^T G[M, K]
        j, k = iM[ar, p], iK[ar, q]
        iM[ar, p], iK[ar, q] = k, j
        out_iM[rows] = iM
        swaps[rows] += 1
        b = G[k].gather(1, iM)                                                     # (l, c): G[M', k] (G symmetric)
        u = (Ainv @ b[:, :, None])[:, :, 0] - a * ((a * b).sum(1) / app)[:, None]  # D b (u_p = 0)
        sk = (g_diag[k] - (u * b).sum(1)).clamp_min(tiny)
        v = u.scatter(1, p[:, None], -1.0)                                         # u - e_p
        vG = _times_G(v, iM, iK, G, B)                                             # v^T G[M', K']
        left = torch.stack((-a / app[:, None], v / sk[:, None]), 2)                # (l, c, 2)
        Ainv.baddbmm_(left, torch.stack((a, v), 1))                                # D + v v^T / s_k
        s = s + Urow * Urow / app[:, None] - vG * vG / sk[:, None]
        s[ar, q] = 1.0 / app - vG[ar, q] ** 2 / sk
        colq = (v * (vG[ar, q] / sk)[:, None] - a / app[:, None]).scatter_add(
            1, p[:, None], torch.ones_like(app)[:, None])                          # U'[:, q]
        if not grouped:
            U.baddbmm_(left, torch.stack((Urow, vG), 1))
            U[ar, :, q] = colq
        else:
            Ug = lambda x: x.view(l, g, n_nm, 1)                                   # noqa: E731
            Kg = lambda x: x.view(l, g, 1, m - n_nm)                               # noqa: E731
            U = U + Ug(left[:, :, 0]) * Kg(Urow) + Ug(left[:, :, 1]) * Kg(vG)
            gq = q // (m - n_nm)
            U[ar, gq, :, q % (m - n_nm)] = colq.view(l, g, n_nm)[ar, gq]
    return torch.zeros_like(mask).scatter_(1, out_iM, True), swaps
