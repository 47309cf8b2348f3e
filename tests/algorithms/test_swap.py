"""Swap refinement of a block mask against a brute-force oracle: every exchange re-solved from scratch in float64.

The exact OBS math on the calibration H: every config here sets shrink=0 (test_shrink.py ties shrink > 0 to
it)."""
import itertools

import pytest
import torch

from pyprune import PruneConfig, prune_layer
from pyprune.reference.swap import swap_refine
from tests.helpers import random_layer, spd_block


def set_loss(w: torch.Tensor, G: torch.Tensor, M: list[int]) -> float:
    """1/2 w_M^T G[M, M]^{-1} w_M by a direct float64 solve."""
    if not M:
        return 0.0
    idx = torch.tensor(M)
    wM = w[idx].double()
    return 0.5 * float(wM @ torch.linalg.solve(G[idx][:, idx].double(), wM))


def exchanges(M: list[int], B: int, m: int):
    kept = [k for k in range(B) if k not in M]
    for j, k in itertools.product(M, kept):
        if not m or j // m == k // m:
            yield j, k


def brute_refine(w, G, M, rounds, m=0):
    """Best single exchange per round by re-solving every candidate set."""
    M = sorted(M)
    for _ in range(rounds):
        cur = set_loss(w, G, M)
        best, arg = cur, None
        for j, k in exchanges(M, w.numel(), m):
            cand = sorted([x for x in M if x != j] + [k])
            val = set_loss(w, G, cand)
            if val < best:
                best, arg = val, cand
        if arg is None or best >= cur - 1e-9 * abs(cur):
            break
        M = arg
    return M


@pytest.mark.parametrize("rows,B,frac,m", [(6, 10, 0.5, 0), (4, 13, 0.3, 0), (5, 12, 0.5, 4), (3, 16, 0.5, 8)])
def test_swap_matches_brute_force(rows, B, frac, m, rng):
    _, G = spd_block(B, rng)
    W1 = torch.randn(rows, B, generator=rng, dtype=torch.float64)
    if m:  # a poor but valid N:M start: the first half of every group
        M1 = (torch.arange(B) % m < m // 2).expand(rows, B).clone()
    else:  # a poor start: the largest weights
        c = int(frac * B)
        M1 = torch.zeros(rows, B, dtype=torch.bool)
        M1.scatter_(1, W1.abs().topk(c, dim=1).indices, True)
    out = swap_refine(W1, G, M1, rounds=B, m=m)
    for i in range(rows):
        want = brute_refine(W1[i], G, torch.nonzero(M1[i]).flatten().tolist(), B, m)
        assert torch.nonzero(out[i]).flatten().tolist() == want, f"row {i}"
    assert torch.equal(out.sum(1), M1.sum(1))
    if m:
        assert torch.equal(out.reshape(rows, -1, m).sum(-1), M1.reshape(rows, -1, m).sum(-1))


def test_swap_result_is_a_local_optimum_and_never_worse(rng):
    B = 14
    _, G = spd_block(B, rng)
    W1 = torch.randn(8, B, generator=rng, dtype=torch.float64)
    M1 = torch.rand(8, B, generator=rng) < 0.5  # per-row counts vary (block scope)
    out = swap_refine(W1, G, M1, rounds=100)
    assert torch.equal(out.sum(1), M1.sum(1))
    for i in range(8):
        M = torch.nonzero(out[i]).flatten().tolist()
        start = set_loss(W1[i], G, torch.nonzero(M1[i]).flatten().tolist())
        got = set_loss(W1[i], G, M)
        assert got <= start + 1e-12
        for j, k in exchanges(M, B, 0):
            cand = [x for x in M if x != j] + [k]
            assert set_loss(W1[i], G, cand) >= got * (1 - 1e-9) - 1e-12


def test_swap_rounds_bound_the_exchanges(rng):
    B = 12
    _, G = spd_block(B, rng)
    W1 = torch.randn(5, B, generator=rng, dtype=torch.float64)
    M1 = torch.zeros(5, B, dtype=torch.bool)
    M1.scatter_(1, W1.abs().topk(6, dim=1).indices, True)
    assert torch.equal(swap_refine(W1, G, M1, rounds=0), M1)
    one = swap_refine(W1, G, M1, rounds=1)
    assert int((one != M1).sum(1).max()) <= 2  # one exchange moves two entries


@pytest.mark.parametrize("sparsity,dtype", [(0.5, torch.float64), ("2:4", torch.float64), ("4:8", torch.float64),
                                            (0.5, torch.float32), ("2:4", torch.float32)])
def test_joint_with_swaps_lowers_the_layer_loss(sparsity, dtype, rng):
    W, H = random_layer(24, 64, rng, dead=2)
    W, H = W.to(dtype), H.to(dtype)
    base = PruneConfig(shrink=0.0, sparsity=sparsity, block_size=32, swaps=0)
    plain = prune_layer(W, H, base)
    swapped = prune_layer(W, H, base.replace(swaps=16))
    assert torch.equal(swapped.mask.sum(1), plain.mask.sum(1))
    assert swapped.loss <= plain.loss * (1 + 1e-9)
    assert swapped.loss < plain.loss  # random layers always leave an exchange that helps
    if dtype == torch.float64:  # the reported loss is the objective (float64 tolerances)
        from tests.algorithms.test_joint import reported_equals_objective
        reported_equals_objective(W, H, swapped)
    if base.sparsity.structured:
        n, m = base.sparsity.n, base.sparsity.m
        assert torch.all(swapped.mask.reshape(24, -1, m).sum(-1) == n)


def test_swaps_option_is_checked():
    with pytest.raises(ValueError, match="swaps"):
        PruneConfig(shrink=0.0, swaps=-1)
    with pytest.raises(ValueError, match="swaps.*joint"):
        PruneConfig(shrink=0.0, method="sparsegpt", swaps=4)
    from pyprune.config import DEFAULT_SWAPS
    assert PruneConfig(shrink=0.0).swaps == DEFAULT_SWAPS and PruneConfig(shrink=0.0).settings()["swaps"] == DEFAULT_SWAPS
    assert "swaps" not in PruneConfig(shrink=0.0, swaps=0).settings()
    assert PruneConfig(shrink=0.0, swaps=8).settings()["swaps"] == 8
    assert PruneConfig(shrink=0.0, sparsity="2:4").swaps == DEFAULT_SWAPS
    assert PruneConfig(shrink=0.0, sparsity="2:4", swaps=0).swaps == 0
    assert PruneConfig(shrink=0.0, method="sparsegpt", sparsity="2:4").swaps == 0
    # a new method or sparsity re-derives the default
    assert PruneConfig(shrink=0.0, sparsity="2:4").replace(method="magnitude").swaps == 0
    assert PruneConfig(shrink=0.0, sparsity="2:4", swaps=3).replace(sparsity=0.5).swaps == DEFAULT_SWAPS
    assert PruneConfig(shrink=0.0, method="sparsegpt").replace(method="joint").swaps == DEFAULT_SWAPS


def test_swap_inside_uneven_groups_matches_brute_force(rng):
    """m given but groups holding different counts (not an N:M start): the general path, exchanges inside groups."""
    rows, B, m = 5, 16, 4
    _, G = spd_block(B, rng)
    W1 = torch.randn(rows, B, generator=rng, dtype=torch.float64)
    M1 = torch.rand(rows, B, generator=rng) < 0.5
    M1[:, 0], M1[:, 1] = True, False  # at least one uneven group per row
    M1[:, 2], M1[:, 3] = True, True
    out = swap_refine(W1, G, M1, rounds=B, m=m)
    for i in range(rows):
        want = brute_refine(W1[i], G, torch.nonzero(M1[i]).flatten().tolist(), B, m)
        assert torch.nonzero(out[i]).flatten().tolist() == want, f"row {i}"
    assert torch.equal(out.reshape(rows, -1, m).sum(-1), M1.reshape(rows, -1, m).sum(-1))
