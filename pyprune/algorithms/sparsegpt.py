"""SparseGPT (Frantar & Alistarh, 2023): one column at a time, with lazy block updates. The baseline."""
from __future__ import annotations

import torch

from .. import ops
from ..config import PruneConfig
from .common import HessianSetup, PruneResult, obs_setup, smallest_mask


def prune_sparsegpt(W: torch.Tensor, H: torch.Tensor, config: PruneConfig = PruneConfig(method="sparsegpt"), *,
                    mask: torch.Tensor | None = None, setup: HessianSetup | None = None) -> PruneResult:
    """SparseGPT's algorithm. Unstructured masks are chosen per block of ``block_size`` columns by ``w^2/U_jj^2``
    (the fraction of the block, or of each row of it with mask_scope="row"); N:M masks per group when the group's
    first column is reached. With a fixed ``mask`` the result does not depend on ``block_size``."""
    sp = config.sparsity
    Wc, U, pruned, row_loss = obs_setup(W, H, config, mask, setup)
    cols = Wc.shape[1]
    B = config.block_size
    for b0 in range(0, cols, B):
        b1 = min(b0 + B, cols)
        W1 = Wc[:, b0:b1]
        U_B = U[b0:b1, b0:b1]
        d = torch.diagonal(U_B)
        Err1 = torch.zeros_like(W1)
        if mask is not None:
            M1 = mask[:, b0:b1].clone()
        elif sp.structured:
            M1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            M1 = smallest_mask(W1 * W1 / d ** 2, sp.fraction, config.mask_scope)
        for i in range(b1 - b0):
            if mask is None and sp.structured and i % sp.m == 0:  # the n smallest w^2 / d^2 of the group
                g = slice(i, i + sp.m)
                M1[:, g] = ops.nm_select(W1[:, g], torch.diag(d[g] ** 2), sp.n, sp.m, exact=False,
                                         backend=config.backend, check_values=False)
            w = W1[:, i]
            err = torch.where(M1[:, i], w, torch.zeros_like(w)) / d[i]
            row_loss += 0.5 * err ** 2
            W1[:, i:] -= err[:, None] * U_B[i, i:][None, :]
            W1[:, i].masked_fill_(M1[:, i], 0.0)
            Err1[:, i] = err
        Wc[:, b1:].addmm_(Err1, U[b0:b1, b1:], alpha=-1.0)
        pruned[:, b0:b1] = M1
    return PruneResult(Wc.to(W.dtype), pruned, float(row_loss.sum()), row_loss)
