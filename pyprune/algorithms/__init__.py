"""Layer-level pruning as pure functions on tensors: (W, H, config) -> PruneResult(weight, mask, loss)."""
from __future__ import annotations

import torch

from ..config import PruneConfig
from .common import PruneResult, layer_objective
from .joint import prune_joint
from .magnitude import prune_magnitude
from .sparsegpt import prune_sparsegpt
from .wanda import prune_wanda

ALGORITHMS = {"joint": prune_joint, "sparsegpt": prune_sparsegpt, "wanda": prune_wanda,
              "magnitude": prune_magnitude}


def prune_layer(W: torch.Tensor, H: torch.Tensor | None, config: PruneConfig = PruneConfig(), *,
                mask: torch.Tensor | None = None) -> PruneResult:
    """Prune one linear layer's weight ``W`` (out_features, in_features) with Hessian ``H`` (in, in) as
    ``config.method`` says. Does not modify its arguments."""
    if H is None and config.method != "magnitude":
        raise ValueError(f"method {config.method!r} needs the layer's Hessian H")
    return ALGORITHMS[config.method](W, H, config, mask=mask)


__all__ = ["ALGORITHMS", "PruneResult", "layer_objective", "prune_joint", "prune_layer", "prune_magnitude",
           "prune_sparsegpt", "prune_wanda"]
