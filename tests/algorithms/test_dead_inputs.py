"""Dead inputs (issue 11 item 5): inputs with diag(H) == 0. Their weights are pruned first and counted in the mask,
so the reported sparsity is the fraction of zeros the method made; a zero Hessian falls back to magnitude pruning.

The exact OBS math on the calibration H: every config here sets shrink=0 (test_shrink.py ties shrink > 0 to it)."""
import pytest
import torch

from pyprune import PruneConfig, prune_group, prune_layer
from pyprune.algorithms import FALLBACK_ALL_DEAD, layer_objective
from pyprune.algorithms.common import damped_hessian
from pyprune.algorithms.magnitude import magnitude_mask
from tests.algorithms.test_joint import reported_equals_objective
from tests.helpers import random_layer

METHODS = [("joint", None), ("joint", "diag"), ("sparsegpt", None), ("wanda", None), ("magnitude", None)]


def kill(H: torch.Tensor, cols) -> torch.Tensor:
    """H of inputs that are zero on every calibration token at ``cols`` (still PSD)."""
    H = H.clone()
    H[:, cols] = 0
    H[cols, :] = 0
    return H


def zeros_are_the_mask(W, res):
    live = W != 0
    assert torch.equal((res.weight == 0) & live, res.mask & live)
    assert res.sparsity == float((res.weight == 0).float().mean())  # W has no zeros of its own here


@pytest.mark.parametrize("method,mask", METHODS)
@pytest.mark.parametrize("sparsity", [0.5, 0.3, "2:4"])
def test_zero_hessian_prunes_by_magnitude_at_the_requested_sparsity(method, mask, sparsity, rng):
    rows, cols, B = 12, 48, 16
    W = torch.randn(rows, cols, generator=rng, dtype=torch.float64)
    cfg = PruneConfig(shrink=0.0, method=method, sparsity=sparsity, block_size=B, mask=mask)
    res = prune_layer(W, torch.zeros(cols, cols, dtype=torch.float64), cfg)
    zeros_are_the_mask(W, res)
    if cfg.sparsity.structured:
        assert torch.all(res.mask.reshape(rows, cols // 4, 4).sum(-1) == 2)
    else:
        per_row = cfg.mask_scope == "row" or method == "wanda"
        width = cols if method in ("wanda", "magnitude") else B
        k = [round(cfg.sparsity.fraction * width)] * (cols // width)
        expect = rows * sum(k) if per_row else sum(round(cfg.sparsity.fraction * rows * width) for _ in k)
        assert int(res.mask.sum()) == expect
    # no update: the kept weights are W's, the pruned ones the smallest |w| of each counting unit
    assert torch.equal(res.weight, W.masked_fill(res.mask, 0))
    scope = "row" if method == "wanda" else cfg.mask_scope
    block = {"wanda": None, "magnitude": None}.get(method, B)
    assert torch.equal(res.mask, magnitude_mask(W, cfg.sparsity, scope, block))
    assert res.loss == 0.0 and torch.all(res.row_loss == 0)
    assert res.fallback == (None if method == "magnitude" else FALLBACK_ALL_DEAD)


def test_zero_hessian_group_and_fixed_mask(rng):
    W = torch.randn(6, 16, generator=rng, dtype=torch.float64)
    H = torch.zeros(16, 16)
    fixed = torch.rand(6, 16, generator=rng) < 0.4
    a, b = prune_group([W, W.float()], H, PruneConfig(shrink=0.0), masks=[fixed, None])
    assert torch.equal(a.mask, fixed) and torch.equal(a.weight, W.masked_fill(fixed, 0))
    assert b.fallback == FALLBACK_ALL_DEAD and b.sparsity == 0.5


@pytest.mark.parametrize("method,mask", METHODS)
@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_some_dead_inputs_reported_sparsity_counts_the_zeros(method, mask, sparsity, rng):
    W, H = random_layer(10, 40, rng, dead=3)
    dead = torch.diagonal(H) == 0
    cfg = PruneConfig(shrink=0.0, method=method, sparsity=sparsity, block_size=20, mask=mask)
    res = prune_layer(W, H, cfg)
    zeros_are_the_mask(W, res)
    assert res.fallback is None
    if method in ("joint", "sparsegpt"):
        assert torch.all(res.mask[:, dead]) and torch.all(res.weight[:, dead] == 0)
        reported_equals_objective(W, H, res)
    # every method: dead inputs cost nothing in the reported loss
    W_ref, H_d, _ = damped_hessian(W, H, 0.01)
    expect = layer_objective(W_ref, res.weight.masked_fill(dead, 0), H_d)
    torch.testing.assert_close(res.row_loss, expect, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("method,scope", [("joint", "row"), ("joint", "block"), ("sparsegpt", "block"),
                                          ("sparsegpt", "row")])
def test_more_dead_than_a_block_prunes_only_what_they_force(method, scope, rng):
    """Block 0 has 12 dead columns of 16 (budget 8 per row at 50%): all 12 are zero and counted; block 1 keeps
    exactly its own count. Any other block is untouched by the excess."""
    rows, cols, B = 8, 32, 16
    W, H = random_layer(rows, cols, rng)
    H = kill(H, list(range(12)))
    res = prune_layer(W, H, PruneConfig(shrink=0.0, method=method, sparsity=0.5, block_size=B, mask_scope=scope))
    zeros_are_the_mask(W, res)
    assert torch.all(res.mask[:, :12]) and int(res.mask[:, :B].sum()) == rows * 12
    if scope == "row":
        assert torch.all(res.mask[:, B:].sum(1) == 8)
    else:
        assert int(res.mask[:, B:].sum()) == rows * 8
    reported_equals_objective(W, H, res)


@pytest.mark.parametrize("method,mask", [("joint", None), ("joint", "diag"), ("sparsegpt", None)])
def test_nm_group_of_dead_inputs_is_all_zero_and_the_rest_exact(method, mask, rng):
    rows, cols = 6, 32
    W, H = random_layer(rows, cols, rng)
    H = kill(H, [4, 5, 6, 7, 21])  # one whole group of 4, and one column of another
    res = prune_layer(W, H, PruneConfig(shrink=0.0, method=method, sparsity="2:4", block_size=16, mask=mask))
    zeros_are_the_mask(W, res)
    counts = res.mask.reshape(rows, cols // 4, 4).sum(-1)
    assert torch.all(counts[:, 1] == 4)
    others = torch.ones(cols // 4, dtype=torch.bool)
    others[1] = False
    assert torch.all(counts[:, others] == 2)
    assert torch.all(res.mask[:, 21])


def test_wanda_keeps_dead_weights_beyond_the_row_count(rng):
    """Wanda makes no update: dead weights beyond the row's count stay as they were (they cost nothing)."""
    W, H = random_layer(5, 16, rng)
    H = kill(H, list(range(10)))
    res = prune_layer(W, H, PruneConfig(shrink=0.0, method="wanda", sparsity=0.5))
    assert torch.all(res.mask.sum(1) == 8) and torch.all(res.mask[:, 10:] == 0)
    zeros_are_the_mask(W, res)
    assert res.loss == 0.0
