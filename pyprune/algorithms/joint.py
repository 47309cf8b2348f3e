"""The joint multi-weight OBS block method of Zhao et al. (docs/ALGORITHM.md section 3).

Columns are processed left to right in blocks of B. In each block every row removes its whole pruned set at once
with the optimal joint update (a small SPD solve per row, batched: ``ops.masked_solve``), and the error is
propagated to the columns right of the block with one GEMM, as in SparseGPT's lazy update.
"""
from __future__ import annotations

import time

import torch

from .. import ops
from ..config import PruneConfig
from .greedy import greedy_mask
from .common import HessianSetup, PruneResult, nm_smallest_mask, obs_setup, smallest_mask, zero_masked_


def select_block_mask(W1: torch.Tensor, U_B: torch.Tensor, G: torch.Tensor, config: PruneConfig,
                      h_diag: torch.Tensor | None = None) -> torch.Tensor:
    """The pruned set of one block (section 4), chosen before the joint solve. ``h_diag``: the block's slice of
    diag(H) (undamped), needed by mask="wanda" only: Wanda's score |w_ij| * sqrt(H_jj) (= |w_ij| * ||x_j|| up to a
    constant) on the block's current weights, the smallest per row (mask_scope="row") or per block, or the N
    smallest of every N:M group."""
    sp = config.sparsity
    if config.mask == "wanda":
        if h_diag is None:
            raise ValueError("mask='wanda' needs the block's diag(H) (h_diag)")
        score = W1.abs() * torch.sqrt(h_diag.to(W1.dtype)).clamp_min(0)[None, :]
        if sp.structured:
            return nm_smallest_mask(score, sp.n, sp.m)
        return smallest_mask(score, sp.fraction, config.mask_scope)
    d = torch.diagonal(U_B) ** 2 if config.mask == "sparsegpt" else torch.diagonal(G)
    if config.mask == "greedy":
        if sp.structured:
            return greedy_mask(W1, G, n=sp.n, m=sp.m)
        counts = smallest_mask(W1 * W1 / d, sp.fraction, config.mask_scope).sum(1)
        return greedy_mask(W1, G, counts)
    if sp.structured:
        if config.mask == "exact":
            return ops.nm_select(W1, G, sp.n, sp.m, exact=True, backend=config.backend, check_values=False)
        return ops.nm_select(W1, torch.diag(d), sp.n, sp.m, exact=False, backend=config.backend,
                             check_values=False)
    return smallest_mask(W1 * W1 / d, sp.fraction, config.mask_scope)


def prune_joint(W: torch.Tensor, H: torch.Tensor, config: PruneConfig = PruneConfig(), *,
                mask: torch.Tensor | None = None, setup: HessianSetup | None = None) -> PruneResult:
    """Prune ``W`` (rows, cols) given its Hessian ``H`` (cols, cols). ``mask`` (bool, True = prune) fixes the
    pruned set instead of selecting it; the sparsity setting is then ignored."""
    Wc, U, pruned, row_loss = obs_setup(W, H, config, mask, setup)
    # The ops below skip their value checks (check_values=False): W and H were checked once for the layer, and each
    # block's W1 and G = U_B^T U_B are finite and symmetric by construction.
    cols = Wc.shape[1]
    B = config.block_size
    h_diag = torch.diagonal(H) if config.mask == "wanda" and mask is None else None
    exchanges, exchange_s = 0, 0.0
    for b0 in range(0, cols, B):
        b1 = min(b0 + B, cols)
        W1 = Wc[:, b0:b1]
        W1c = W1.contiguous()  # one copy of the strided block for the mask and the solve (each would make its own)
        U_B = U[b0:b1, b0:b1]
        G = U_B.T @ U_B
        M1 = mask[:, b0:b1] if mask is not None else select_block_mask(
            W1c, U_B, G, config, None if h_diag is None else h_diag[b0:b1])
        if mask is None and config.swaps:  # exchanges, then the solve of the final set, from one factor per row
            t0 = time.perf_counter()
            E, loss, M1, made = ops.refine_solve(G, U_B, W1c, M1, config.swaps, m=config.sparsity.m,
                                                 backend=config.backend, check_values=False)
            exchanges += int(made.sum())  # a host sync, as the op's status check already is
            exchange_s += time.perf_counter() - t0
        else:
            E, loss = ops.masked_solve(G, U_B, W1c, M1, backend=config.backend, check_values=False)
        W1 -= E @ U_B
        zero_masked_(W1, M1)
        Wc[:, b1:].addmm_(E, U[b0:b1, b1:], alpha=-1.0)  # in place: no rows x cols temporary
        pruned[:, b0:b1] = M1
        row_loss += loss
    return PruneResult(Wc.to(W.dtype), pruned, float(row_loss.sum()), row_loss, exchanges=exchanges,
                       exchange_s=exchange_s)
