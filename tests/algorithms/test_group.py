"""prune_group (issue 12 part 3): modules that read one input share one setup, with results bit-identical to
separate prune_layer calls."""
import pytest
import torch

import pyprune
from pyprune import PruneConfig, prune_group, prune_layer
from pyprune.algorithms import common
from tests.helpers import random_layer, random_mask


def count_setups(monkeypatch) -> list:
    calls = []
    real = common.inverse_cholesky_upper

    def counted(H_d, **kw):
        calls.append(H_d.dtype)
        return real(H_d, **kw)
    monkeypatch.setattr(common, "inverse_cholesky_upper", counted)
    return calls


def same(a, b):
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)
    assert a.loss == b.loss and torch.equal(a.row_loss, b.row_loss)
    assert a.damp == b.damp and a.fallback == b.fallback


@pytest.mark.parametrize("method", ["joint", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_group_equals_separate_layers_with_one_setup(method, sparsity, dtype, rng, monkeypatch):
    cols = 48
    _, H = random_layer(1, cols, rng, dead=2)
    weights = [torch.randn(rows, cols, generator=rng, dtype=torch.float64).to(dtype) for rows in (16, 8, 8)]
    H = H.to(dtype)
    cfg = PruneConfig(method=method, sparsity=sparsity, block_size=16)
    calls = count_setups(monkeypatch)
    group = prune_group(weights, H, cfg)
    assert len(calls) == 1
    separate = [prune_layer(W, H, cfg) for W in weights]
    assert len(calls) == 4
    for a, b in zip(group, separate):
        same(a, b)


def test_group_with_fixed_masks_and_mixed_dtypes(rng, monkeypatch):
    cols = 32
    _, H = random_layer(1, cols, rng)
    W64 = torch.randn(6, cols, generator=rng, dtype=torch.float64)
    weights = [W64, W64.bfloat16(), torch.randn(4, cols, generator=rng, dtype=torch.float64).half()]
    masks = [random_mask(6, cols, rng), None, random_mask(4, cols, rng)]
    cfg = PruneConfig(block_size=8)
    calls = count_setups(monkeypatch)
    group = prune_group(weights, H, cfg, masks=masks)
    assert calls == [torch.float64, torch.float32]  # one setup per compute dtype
    for W, m, res in zip(weights, masks, group):
        same(res, prune_layer(W, H, cfg, mask=m))
        assert res.weight.dtype == W.dtype
    assert torch.equal(group[0].mask, masks[0])


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_group_of_methods_without_setup_loops(method, rng):
    _, H = random_layer(1, 24, rng, dead=1)
    weights = [torch.randn(r, 24, generator=rng, dtype=torch.float64) for r in (5, 7)]
    cfg = PruneConfig(method=method, sparsity="2:4")
    for a, W in zip(prune_group(weights, H, cfg), weights):
        same(a, prune_layer(W, H, cfg))


def test_group_errors(rng):
    W, H = random_layer(4, 16, rng)
    with pytest.raises(ValueError, match="2 weights but 1 masks"):
        prune_group([W, W], H, PruneConfig(), masks=[None])
    with pytest.raises(ValueError, match=r"weight 1 of the group has 8 input columns but H is 16x16"):
        prune_group([W, W[:, :8]], H, PruneConfig())
    with pytest.raises(ValueError, match="needs the layer's Hessian"):
        prune_group([W], None, PruneConfig(method="sparsegpt"))
    assert prune_group([], H, PruneConfig()) == []


def test_exported():
    assert pyprune.prune_group is prune_group and "prune_group" in pyprune.__all__
