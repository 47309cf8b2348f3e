"""mask="wanda" for the joint method (issue 13): Wanda's score |w_ij| * sqrt(H_jj), then the joint update.

The exact OBS math on the calibration H: every config here sets shrink=0 (test_shrink.py ties shrink > 0 to
it)."""
import pytest
import torch

from pyprune import PruneConfig, prune_layer
from pyprune.algorithms import layer_objective
from pyprune.algorithms.common import damped_hessian
from pyprune.algorithms.joint import prune_joint, select_block_mask
from tests.helpers import optimal_for_mask, random_layer


def wanda(sparsity):
    return PruneConfig(shrink=0.0, method="wanda", sparsity=sparsity)


@pytest.mark.parametrize("rows,cols", [(16, 32), (9, 40), (33, 64)])
@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.7, "2:4", "4:8"])
@pytest.mark.parametrize("dead", [0, 3])
def test_mask_is_wandas_where_the_rule_coincides(rows, cols, sparsity, dead, rng):
    """B = cols (the whole row is one block: the scores see the unmodified weights) and per-row counts: the joint
    method's mask is Wanda's, and the joint update on it has a lower layer loss than Wanda's (no update)."""
    W, H = random_layer(rows, cols, rng, dead=dead)
    scope = {} if isinstance(sparsity, str) else dict(mask_scope="row")
    cfg = PruneConfig(shrink=0.0, sparsity=sparsity, block_size=cols, mask="wanda", swaps=0, **scope)  # the mask as chosen
    joint, ref = prune_layer(W, H, cfg), prune_layer(W, H, wanda(sparsity))
    # dead columns (zero input) are pruned for free by the joint method; where an N:M group holds more dead columns
    # than it prunes, Wanda keeps one of them (all score 0), so the rule coincides on the live columns
    live = torch.diagonal(H) > 0
    assert torch.equal(joint.mask[:, live], ref.mask[:, live])
    assert bool(joint.mask[:, ~live].all())
    assert torch.all(joint.weight[joint.mask] == 0)
    assert joint.loss < ref.loss
    # the joint update is the optimal reconstruction for that mask (damped H, float64)
    W_ref, H_d, _ = damped_hessian(W, H, cfg.damp)
    best = float(layer_objective(W_ref, optimal_for_mask(W_ref, H_d, ref.mask), H_d).sum())
    assert joint.loss == pytest.approx(best, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_blocked_mask_reads_the_updated_weights(sparsity, rng):
    """B < cols: each block's counts hold (per row, per N:M group) and the loss is still below Wanda's on its own
    mask: the joint update reconstructs what the mask removes."""
    W, H = random_layer(24, 64, rng)
    scope = {} if isinstance(sparsity, str) else dict(mask_scope="row")
    res = prune_layer(W, H, PruneConfig(shrink=0.0, sparsity=sparsity, block_size=16, mask="wanda", **scope))
    ref = prune_layer(W, H, wanda(sparsity))
    if isinstance(sparsity, str):
        assert torch.all(res.mask.view(24, 16, 4).sum(2) == 2)
    else:
        assert torch.all(res.mask.view(24, 4, 16).sum(2) == 8)
    assert res.loss < ref.loss


def test_block_scope_counts_the_whole_block(rng):
    W, H = random_layer(12, 32, rng)
    res = prune_layer(W, H, PruneConfig(shrink=0.0, sparsity=0.5, block_size=32, mask="wanda", mask_scope="block", swaps=0))
    assert int(res.mask.sum()) == 12 * 16
    score = W.abs() * torch.sqrt(torch.diagonal(H))[None, :]
    assert score[res.mask].max() <= score[~res.mask].min()


def test_select_block_mask_needs_the_diagonal(rng):
    W, H = random_layer(4, 8, rng)
    U = torch.eye(8, dtype=W.dtype)
    with pytest.raises(ValueError, match="diag"):
        select_block_mask(W, U, U, PruneConfig(shrink=0.0, mask="wanda"))
    # a fixed mask does not read it
    m = torch.zeros(4, 8, dtype=torch.bool)
    m[:, :4] = True
    res = prune_joint(W, H, PruneConfig(shrink=0.0, mask="wanda"), mask=m)
    assert torch.equal(res.mask, m)


def test_config_accepts_the_option():
    assert PruneConfig(shrink=0.0, mask="wanda").settings()["mask"] == "wanda"
    assert PruneConfig(shrink=0.0, sparsity="2:4", mask="wanda").mask == "wanda"
    with pytest.raises(ValueError, match="joint method only"):
        PruneConfig(shrink=0.0, method="sparsegpt", mask="wanda")
