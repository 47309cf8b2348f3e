"""Wanda (Sun et al., 2023): prune by |w| * ||x_j||, per output row, no weight update."""
from __future__ import annotations

import torch

from ..config import PruneConfig
from .common import (PruneResult, check_fixed_mask, check_layer, damped_hessian, layer_objective, nm_smallest_mask,
                     smallest_mask)
from .magnitude import magnitude_fallback


def prune_wanda(W: torch.Tensor, H: torch.Tensor, config: PruneConfig = PruneConfig(method="wanda"), *,
                mask: torch.Tensor | None = None) -> PruneResult:
    """The input norm ||x_j|| is sqrt(n/2 * H_jj); the constant factor does not change the ranking. Dead inputs
    (||x_j|| = 0) score 0, so their weights are pruned first, up to the row's count; any beyond it are kept (they
    cost nothing either way). The reported loss is the layer objective with the damped Hessian over the live
    inputs, comparable with the other methods'. Every input dead: ``magnitude_fallback`` per row."""
    check_layer(W, H, config.sparsity)
    check_fixed_mask(mask, W)
    sp = config.sparsity
    Wc, H_d, dead = damped_hessian(W, H, config.damp)
    if bool(dead.all()):
        return magnitude_fallback(W, config, mask, scope="row")
    if mask is None:
        score = Wc.abs() * torch.sqrt(torch.diagonal(H).to(Wc.dtype)).clamp_min(0)[None, :]
        mask = nm_smallest_mask(score, sp.n, sp.m) if sp.structured else smallest_mask(score, sp.fraction, "row")
    W_hat = W.to(Wc.dtype).masked_fill(mask, 0.0)
    row_loss = layer_objective(Wc, W_hat.masked_fill(dead, 0.0), H_d)
    return PruneResult(W_hat.to(W.dtype), mask, float(row_loss.sum()), row_loss, damp=config.damp)
