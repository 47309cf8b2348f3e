"""The greedy OBS mask (exact OBS order inside a block) against a brute-force re-solve at every step.

The exact OBS math on the calibration H: every config here sets shrink=0 (test_shrink.py ties shrink > 0 to
it)."""
import pytest
import torch

from pyprune import PruneConfig, prune_layer
from pyprune.algorithms.greedy import greedy_mask
from tests.helpers import greedy_brute_force, random_layer, spd_block


@pytest.mark.parametrize("rows,B", [(5, 12), (3, 7)])
def test_greedy_unstructured_matches_brute_force(rows, B, rng):
    _, G = spd_block(B, rng)
    W1 = torch.randn(rows, B, generator=rng, dtype=torch.float64)
    counts = torch.randint(0, B + 1, (rows,), generator=rng)
    mask = greedy_mask(W1, G, counts)
    assert torch.equal(mask.sum(1), counts)
    assert torch.equal(mask, greedy_brute_force(W1, G, counts))


@pytest.mark.parametrize("n,m,B", [(2, 4, 12), (1, 4, 8), (3, 8, 16)])
def test_greedy_nm_matches_brute_force(n, m, B, rng):
    _, G = spd_block(B, rng)
    W1 = torch.randn(4, B, generator=rng, dtype=torch.float64)
    mask = greedy_mask(W1, G, n=n, m=m)
    assert torch.all(mask.reshape(4, B // m, m).sum(-1) == n)
    assert torch.equal(mask, greedy_brute_force(W1, G, n=n, m=m))


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_greedy_joint_reports_the_objective_and_meets_the_target(sparsity, rng):
    W, H = random_layer(12, 40, rng, dead=1)
    greedy = prune_layer(W, H, PruneConfig(shrink=0.0, sparsity=sparsity, block_size=20, mask="greedy"))
    diag = prune_layer(W, H, PruneConfig(shrink=0.0, sparsity=sparsity, block_size=20, mask="diag"))
    assert torch.equal(greedy.mask.sum(), diag.mask.sum())
    from tests.algorithms.test_joint import reported_equals_objective
    reported_equals_objective(W, H, greedy)
