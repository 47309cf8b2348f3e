"""Magnitude pruning: the smallest |w| of the whole layer (N:M: of each group), no weight update."""
from __future__ import annotations

import torch

from ..config import PruneConfig
from .common import (PruneResult, check_fixed_mask, check_layer, compute_dtype, damped_hessian, layer_objective,
                     nm_smallest_mask, smallest_mask)


def prune_magnitude(W: torch.Tensor, H: torch.Tensor | None = None,
                    config: PruneConfig = PruneConfig(method="magnitude"), *,
                    mask: torch.Tensor | None = None) -> PruneResult:
    """``H`` is optional: without it the loss is reported as NaN."""
    check_layer(W, H, config.sparsity)
    check_fixed_mask(mask, W)
    sp = config.sparsity
    Wc = W.to(compute_dtype(W))
    if mask is None:
        score = Wc.abs()
        mask = nm_smallest_mask(score, sp.n, sp.m) if sp.structured else smallest_mask(score, sp.fraction, "block")
    W_hat = Wc.masked_fill(mask, 0.0)
    if H is None:
        row_loss = torch.full((W.shape[0],), float("nan"), dtype=Wc.dtype, device=W.device)
    else:
        W_ref, H_d, _ = damped_hessian(W, H, config.damp)
        row_loss = layer_objective(W_ref, W_hat, H_d)
    return PruneResult(W_hat.to(W.dtype), mask, float(row_loss.sum()), row_loss)
