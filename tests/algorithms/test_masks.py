"""The mask rules shared by the methods (``smallest_mask``, ``nm_smallest_mask``) against a stable sort, the
definition they keep: the k smallest scores of each row (or of the whole block), ties to the lower position, NaN
counted as the largest; odd shapes, ties, infinities and NaN."""
from __future__ import annotations

import pytest
import torch

from pyprune.algorithms.common import nm_smallest_mask, smallest_mask


def sorted_smallest(score: torch.Tensor, fraction: float, scope: str) -> torch.Tensor:
    rows, cols = score.shape
    flat = score if scope == "row" else score.reshape(1, -1)
    k = int(round(fraction * flat.shape[1]))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k and flat.numel():
        mask.scatter_(1, torch.sort(flat, dim=1, stable=True).indices[:, :k], True)
    return mask.reshape(rows, cols)


def scores(shape, kind, rng):
    x = torch.rand(*shape, generator=rng)
    if kind == "ties":
        x = torch.randint(0, 4, shape, generator=rng).float()
    elif kind == "nan":
        x[torch.rand(*shape, generator=rng) < 0.4] = float("nan")
    elif kind == "inf":
        x[torch.rand(*shape, generator=rng) < 0.3] = float("inf")
        x[torch.rand(*shape, generator=rng) < 0.1] = -float("inf")
    return x


@pytest.mark.parametrize("shape", [(257, 128), (33, 100), (7, 5), (1, 1), (0, 4), (4, 0)])
@pytest.mark.parametrize("kind", ["rand", "ties", "nan", "inf"])
@pytest.mark.parametrize("scope", ["row", "block"])
def test_smallest_mask_is_the_stable_sort(shape, kind, scope, rng):
    x = scores(shape, kind, rng)
    for fraction in (0.0, 0.3, 0.5, 0.7, 0.9, 1.0):
        got = smallest_mask(x, fraction, scope)
        assert torch.equal(got, sorted_smallest(x, fraction, scope)), (fraction, scope)


def test_smallest_mask_counts(rng):
    x = torch.randint(0, 3, (65, 96), generator=rng).float()  # many ties
    assert torch.equal(smallest_mask(x, 0.5, "row").sum(1), torch.full((65,), 48))
    assert int(smallest_mask(x, 0.37, "block").sum()) == round(0.37 * 65 * 96)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 5)])
@pytest.mark.parametrize("kind", ["rand", "ties", "inf"])
def test_nm_smallest_mask_is_the_stable_sort(n, m, kind, rng):
    x = scores((37, 4 * m), kind, rng)
    got = nm_smallest_mask(x, n, m)
    groups = x.view(37, 4, m)
    want = torch.zeros_like(groups, dtype=torch.bool)
    want.scatter_(2, torch.sort(groups, dim=2, stable=True).indices[:, :, :n], True)
    assert torch.equal(got, want.view(37, 4 * m))
    assert bool((got.view(37, 4, m).sum(2) == n).all())
