"""Layer-level pruning as pure functions on tensors: (W, H, config) -> PruneResult(weight, mask, loss).

``prune_layer`` and ``prune_group`` are the entry points; the per-method functions in ``ALGORITHMS`` are their
cores (called directly, the OBS methods neither count dead inputs in the mask nor fall back on a zero Hessian, and
their loss is on the shrunk Hessian they solve with: ``PruneConfig.shrink``)."""
from __future__ import annotations

from typing import Sequence

import torch

from ..config import PruneConfig
from ..ops._checks import check_same_device
from .common import (FALLBACK_ALL_DEAD, MAX_DAMP, PruneResult, calibration_row_loss, check_fixed_mask, check_layer,
                     compute_dtype, hessian_setup, layer_objective)
from .joint import prune_joint
from .magnitude import magnitude_fallback, prune_magnitude
from .sparsegpt import prune_sparsegpt
from .wanda import prune_wanda

ALGORITHMS = {"joint": prune_joint, "sparsegpt": prune_sparsegpt, "wanda": prune_wanda,
              "magnitude": prune_magnitude}
OBS_METHODS = ("joint", "sparsegpt")  # the methods that factor H (hessian_setup)


def prune_layer(W: torch.Tensor, H: torch.Tensor | None, config: PruneConfig = PruneConfig(), *,
                mask: torch.Tensor | None = None) -> PruneResult:
    """Prune one linear layer's weight ``W`` (out_features, in_features) with Hessian ``H`` (in, in) as
    ``config.method`` says: ``prune_group([W], H, config)``. Does not modify its arguments."""
    return prune_group([W], H, config, masks=[mask])[0]


def prune_group(weights: Sequence[torch.Tensor], H: torch.Tensor | None, config: PruneConfig = PruneConfig(), *,
                masks: Sequence[torch.Tensor | None] | None = None) -> list[PruneResult]:
    """Prune the weights of modules that read the same input (q/k/v, gate/up), all with that input's Hessian ``H``:
    the per-Hessian setup (dead inputs, damped H, its factor U, the damping retry) runs once per compute dtype
    instead of once per weight, and each result is bit-identical to ``prune_layer`` of that weight alone.
    ``masks``: one fixed mask (or None) per weight. Does not modify its arguments.

    Dead inputs (diag(H) == 0) never affect the output on the calibration data. The OBS methods (joint, SparseGPT)
    zero their weights, which the selection then counts first, and ``result.mask`` includes all of them: a block
    (N:M: a group) with more dead columns than its pruning count ends sparser than asked, by exactly what the dead
    columns force, and nowhere else. Every input dead (zero H): no information, so magnitude pruning at the method's
    own counts, no update, loss 0, ``result.fallback`` says so (``FALLBACK_ALL_DEAD``). A Cholesky failure is
    retried with 10x the damping up to ``MAX_DAMP`` (common.py); ``result.damp`` is the damping used. The loss is
    always on the calibration H (damped), also when the method solved with a shrunk one (``PruneConfig.shrink``)."""
    weights = list(weights)
    masks = [None] * len(weights) if masks is None else list(masks)
    if len(masks) != len(weights):
        raise ValueError(f"prune_group got {len(weights)} weights but {len(masks)} masks; pass one mask (or None) "
                         "per weight")
    if H is None and config.method != "magnitude":
        raise ValueError(f"method {config.method!r} needs the layer's Hessian H")
    if config.method not in OBS_METHODS:
        return [ALGORITHMS[config.method](W, H, config, mask=m) for W, m in zip(weights, masks)]
    for i, (W, m) in enumerate(zip(weights, masks)):
        check_layer(W, H if i == 0 else None, config.sparsity)  # H's values are checked once
        if i:
            if W.shape[1] != H.shape[0]:
                raise ValueError(f"weight {i} of the group has {W.shape[1]} input columns but H is "
                                 f"{H.shape[0]}x{H.shape[1]}: a group's weights must all read H's input")
            check_same_device(weight=W, H=H)
        check_fixed_mask(m, W)
    setups = {}
    results = []
    for W, m in zip(weights, masks):
        dtype = compute_dtype(W)
        if dtype not in setups:
            setups[dtype] = hessian_setup(H, config.damp, dtype, config.shrink)
        setup = setups[dtype]
        if setup.all_dead:
            results.append(magnitude_fallback(W, config, m, scope=config.mask_scope, block=config.block_size))
            continue
        result = ALGORITHMS[config.method](W, H, config, mask=m, setup=setup)
        if setup.shrink:  # the loss on the calibration H, not on the shrunk one the method solved with
            result.row_loss = calibration_row_loss(W, result.weight, H, setup, result.row_loss)
            result.loss = float(result.row_loss.sum())
        if setup.has_dead:
            result.mask[:, setup.dead] = True  # zeroed by obs_setup
        result.damp = setup.damp
        results.append(result)
    return results


__all__ = ["ALGORITHMS", "FALLBACK_ALL_DEAD", "MAX_DAMP", "PruneResult", "layer_objective", "prune_group",
           "prune_joint", "prune_layer", "prune_magnitude", "prune_sparsegpt", "prune_wanda"]
