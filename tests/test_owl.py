"""pyprune.owl: the outlier ratio and the per-block allocation against float64 hand computations on small random
inputs, the allocation's weighted mean, order, clamping and degenerate cases, and the argument checks."""
from __future__ import annotations

import math

import pytest
import torch

from pyprune.config import Sparsity
from pyprune.owl import OWL_LAMBDA, OWL_M, allocate, make_profile, outlier_ratio


def hand_ratio(weights, norms, m):
    """Plain Python floats, entry by entry."""
    entries = [abs(float(w[i, j])) * float(n[j]) for w, n in zip(weights, norms)
               for i in range(w.shape[0]) for j in range(w.shape[1])]
    mean = sum(entries) / len(entries)
    return sum(1 for a in entries if a > m * mean) / len(entries)


def heavy(rng, rows, cols):
    """Weights with a few large entries (so that some exceed a few times the mean)."""
    w = torch.randn(rows, cols, generator=rng, dtype=torch.float64)
    spikes = torch.rand(rows, cols, generator=rng) < 0.05
    return torch.where(spikes, w * 20, w)


def test_outlier_ratio_matches_hand_computation(rng):
    ws = [heavy(rng, 6, 10), heavy(rng, 4, 7), heavy(rng, 9, 10)]
    ns = [torch.rand(w.shape[1], generator=rng, dtype=torch.float64) * 3 for w in ws]
    for m in (1.0, 2.0, 5.0):
        expected = hand_ratio(ws, ns, m)
        assert outlier_ratio(ws, ns, m) == pytest.approx(expected, abs=1e-12)
    assert 0 < hand_ratio(ws, ns, 2.0) < 0.5  # the case is not trivial
    # one matrix, given bare; float32 in gives the same count here (no entry within rounding of the threshold)
    w, n = ws[0], ns[0]
    assert outlier_ratio(w, n, 2.0) == pytest.approx(hand_ratio([w], [n], 2.0), abs=1e-12)
    assert outlier_ratio(w.float(), n.float(), 2.0) == pytest.approx(hand_ratio([w], [n], 2.0), abs=1e-12)


def test_outlier_ratio_mean_is_over_the_block_not_per_matrix(rng):
    """A matrix ten times larger than the other: its entries are the block's outliers, though none of them is an
    outlier within its own matrix."""
    small = torch.ones(4, 8, dtype=torch.float64)
    large = torch.full((4, 8), 10.0, dtype=torch.float64)
    ones = torch.ones(8, dtype=torch.float64)
    assert outlier_ratio(small, ones, 1.5) == 0.0
    assert outlier_ratio(large, ones, 1.5) == 0.0
    assert outlier_ratio([small, large], [ones, ones], 1.5) == pytest.approx(0.5)
    # the input norms weight the columns: a column with a large norm holds the outliers
    norms = torch.ones(8, dtype=torch.float64)
    norms[3] = 100.0
    assert outlier_ratio(small, norms, 5.0) == pytest.approx(1 / 8)


def test_outlier_ratio_zero_and_bad_arguments():
    w = torch.zeros(3, 4)
    assert outlier_ratio(w, torch.ones(4), 5) == 0.0
    with pytest.raises(ValueError, match="col_norms\\[0\\] must be a 1-D tensor of 4"):
        outlier_ratio(torch.ones(3, 4), torch.ones(5), 5)
    with pytest.raises(ValueError, match="2 weight matrices but 1"):
        outlier_ratio([torch.ones(3, 4), torch.ones(3, 4)], [torch.ones(4)], 5)
    with pytest.raises(ValueError, match="2-D"):
        outlier_ratio(torch.ones(4), torch.ones(4), 5)
    with pytest.raises(ValueError, match="m must be > 0"):
        outlier_ratio(torch.ones(3, 4), torch.ones(4), 0)
    with pytest.raises(ValueError, match=">= 0"):
        outlier_ratio(torch.ones(3, 4), -torch.ones(4), 5)
    with pytest.raises(ValueError, match="NaN"):
        outlier_ratio(torch.full((3, 4), float("nan")), torch.ones(4), 5)
    with pytest.raises(ValueError, match="at least one"):
        outlier_ratio([], [], 5)


def hand_allocate(ratios, target, lam, sizes):
    lo, hi = min(ratios), max(ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    mean = sum(s * w for s, w in zip(scaled, sizes)) / sum(sizes)
    return [target - s + mean for s in scaled]


def wmean(values, sizes):
    return sum(v * w for v, w in zip(values, sizes)) / sum(sizes)


def test_allocate_matches_hand_computation_and_keeps_the_weighted_mean(rng):
    ratios = [float(x) for x in torch.rand(7, generator=rng, dtype=torch.float64) * 0.05]
    sizes = [float(x) for x in torch.randint(1, 100, (7,), generator=rng)]
    for target, lam, sz in ((0.7, 0.08, None), (0.5, 0.1, sizes), (0.6, 0.02, sizes)):
        weights = sz or [1.0] * 7
        got = allocate(ratios, target, lam, sz)
        expected = hand_allocate(ratios, target, lam, weights)
        assert got == pytest.approx(expected, abs=1e-12)
        assert wmean(got, weights) == pytest.approx(target, abs=1e-12)
        # more outliers, lower sparsity; the extremes are 2 lam apart
        order = sorted(range(7), key=lambda i: ratios[i])
        assert all(got[a] >= got[b] for a, b in zip(order, order[1:]))
        assert max(got) - min(got) == pytest.approx(2 * lam, abs=1e-12)


def test_allocate_reference_values():
    """Unweighted, as the paper's code: ratios 1, 2, 3 % at S = 0.7, lambda = 0.08 -> 0.78, 0.70, 0.62."""
    assert allocate([1.0, 2.0, 3.0], 0.7, 0.08) == pytest.approx([0.78, 0.70, 0.62], abs=1e-12)
    # weighted: the small block's low sparsity costs the large ones less
    got = allocate([1.0, 3.0], 0.5, 0.1, sizes=[3.0, 1.0])
    assert got == pytest.approx([0.55, 0.35], abs=1e-12)
    assert (3 * got[0] + got[1]) / 4 == pytest.approx(0.5, abs=1e-12)


def test_allocate_uniform_cases():
    assert allocate([0.01, 0.03, 0.02], 0.7, 0.0) == [0.7, 0.7, 0.7]
    assert allocate([0.02, 0.02], 0.6, 0.08) == [0.6, 0.6]
    assert allocate([0.5], 0.3, 0.1) == [0.3]


def test_allocate_clamps_and_keeps_the_mean():
    """Target 0.1, lambda 0.09: one block with many outliers and three without would get 0.1 - 0.18 + 0.045 < 0."""
    ratios, sizes = [4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]
    raw = hand_allocate(ratios, 0.1, 0.09, sizes)
    assert raw[0] < 0
    got = allocate(ratios, 0.1, 0.09)
    assert got[0] == 0.0
    assert all(0 <= s < 1 for s in got)
    assert wmean(got, sizes) == pytest.approx(0.1, abs=1e-12)
    assert got[1] == got[2] == got[3] and got[1] > got[0]
    # and at the top: target 0.9, lambda 0.09, three blocks with outliers and one without
    got = allocate([0.0, 4.0, 4.0, 4.0], 0.9, 0.09, sizes=[1.0, 2.0, 2.0, 2.0])
    assert all(0 <= s < 1 for s in got)
    assert wmean(got, [1.0, 2.0, 2.0, 2.0]) == pytest.approx(0.9, abs=1e-12)
    assert got[0] > got[1] == got[2] == got[3]


@pytest.mark.parametrize("args, match", [
    (([], 0.5, 0.08), "at least one"),
    (([0.1, 0.2], 1.0, 0.08), "target sparsity must be in"),
    (([0.1, 0.2], 0.5, -0.1), "lam must be >= 0"),
    (([0.1, float("nan")], 0.5, 0.08), "finite"),
    (([0.1, -0.2], 0.5, 0.08), ">= 0"),
])
def test_allocate_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        allocate(*args)


def test_allocate_bad_sizes():
    with pytest.raises(ValueError, match="2 ratios but 3 sizes"):
        allocate([0.1, 0.2], 0.5, 0.08, sizes=[1, 2, 3])
    with pytest.raises(ValueError, match="sizes must be > 0"):
        allocate([0.1, 0.2], 0.5, 0.08, sizes=[1, 0])


def test_make_profile_defaults_and_errors():
    assert make_profile(None, Sparsity.parse("0.7")) is None
    p = make_profile("owl", Sparsity.parse("0.7"))
    assert (p.m, p.lam) == (OWL_M, OWL_LAMBDA) == (5.0, 0.08)
    assert p.settings() == {"sparsity_profile": "owl", "owl_m": 5.0, "owl_lambda": 0.08}
    assert make_profile("owl", Sparsity.parse("0.5"), 3, 0.2).lam == 0.2
    with pytest.raises(ValueError, match="unknown sparsity_profile 'uniform'.*owl"):
        make_profile("uniform", Sparsity.parse("0.7"))
    with pytest.raises(ValueError, match="2:4 sparsity fixes the pattern"):
        make_profile("owl", Sparsity.parse("2:4"))
    with pytest.raises(ValueError, match="owl_lambda .* 0.35 is out of range for sparsity 0.7"):
        make_profile("owl", Sparsity.parse("0.7"), lam=0.35)
    with pytest.raises(ValueError, match="owl_lambda .* out of range for sparsity 0.05"):
        make_profile("owl", Sparsity.parse("0.05"), lam=0.08)
    with pytest.raises(ValueError, match="owl_lambda .* out of range"):
        make_profile("owl", Sparsity.parse("0.7"), lam=-0.01)
    with pytest.raises(ValueError, match="owl_m .* must be > 0"):
        make_profile("owl", Sparsity.parse("0.7"), m=0)
    with pytest.raises(ValueError, match="owl_m must be a finite number"):
        make_profile("owl", Sparsity.parse("0.7"), m=math.inf)
    with pytest.raises(ValueError, match="owl_lambda=0.1 is an option of sparsity_profile='owl'"):
        make_profile(None, Sparsity.parse("0.7"), lam=0.1)
