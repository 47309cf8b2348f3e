"""Magnitude pruning: the smallest |w| of the whole layer (N:M: of each group), no weight update. Also the
fallback of the other methods when H carries no information (every input dead)."""
from __future__ import annotations

import torch

from ..config import PruneConfig, Sparsity
from .common import (FALLBACK_ALL_DEAD, PruneResult, check_fixed_mask, check_layer, compute_dtype, damped_hessian,
                     layer_objective, nm_smallest_mask, smallest_mask)


def prune_magnitude(W: torch.Tensor, H: torch.Tensor | None = None,
                    config: PruneConfig = PruneConfig(method="magnitude"), *,
                    mask: torch.Tensor | None = None) -> PruneResult:
    """``H`` is optional: without it the loss is reported as NaN. Dead inputs (diag(H) = 0) cost nothing in the
    reported loss, whether their weights are kept or not."""
    check_layer(W, H, config.sparsity)
    check_fixed_mask(mask, W)
    Wc = W.to(compute_dtype(W))
    if mask is None:
        mask = magnitude_mask(Wc, config.sparsity, "block")
    W_hat = Wc.masked_fill(mask, 0.0)
    if H is None:
        row_loss = torch.full((W.shape[0],), float("nan"), dtype=Wc.dtype, device=W.device)
    else:
        W_ref, H_d, dead = damped_hessian(W, H, config.damp)
        row_loss = layer_objective(W_ref, W_hat.masked_fill(dead, 0.0), H_d)
    return PruneResult(W_hat.to(W.dtype), mask, float(row_loss.sum()), row_loss, damp=config.damp)


def magnitude_mask(Wc: torch.Tensor, sparsity: Sparsity, scope: str, block: int | None = None) -> torch.Tensor:
    """True on the smallest |w|: N:M per group; unstructured the fraction of every ``block`` columns (None: all of
    them) counted over the block (scope="block") or each row of it (scope="row"), so that a method's fallback
    prunes as many weights as the method would have."""
    score = Wc.abs()
    if sparsity.structured:
        return nm_smallest_mask(score, sparsity.n, sparsity.m)
    cols = Wc.shape[1]
    if block is None or block >= cols:
        return smallest_mask(score, sparsity.fraction, scope)
    return torch.cat([smallest_mask(score[:, b0:b0 + block], sparsity.fraction, scope)
                      for b0 in range(0, cols, block)], dim=1)


def magnitude_fallback(W: torch.Tensor, config: PruneConfig, mask: torch.Tensor | None, *, scope: str,
                       block: int | None = None) -> PruneResult:
    """What the Hessian-based methods do when every input is dead (zero Hessian, from a block whose inputs are all
    zero): H says nothing about which weights matter, and the OBS update would zero the whole layer, so prune the
    smallest |w| (``magnitude_mask``, or the fixed ``mask``) with no update. The loss is zero: with no live input,
    no weight changes the layer's output on the calibration data."""
    Wc = W.to(compute_dtype(W))
    if mask is None:
        mask = magnitude_mask(Wc, config.sparsity, scope, block)
    row_loss = torch.zeros(W.shape[0], dtype=Wc.dtype, device=W.device)
    return PruneResult(Wc.masked_fill(mask, 0.0).to(W.dtype), mask, 0.0, row_loss, damp=config.damp,
                       fallback=FALLBACK_ALL_DEAD)
