"""``distributed.solve_group`` (issue 23 part 4: the distributed solve calls ``prune_group`` on each rank's share of a
group's rows), run by threads standing in for ranks: every rank ends with the same results, equal to one
``prune_group`` of the whole group (same masks, weights within rounding), with the rows really split."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
import torch

from pyprune.algorithms import prune_group
from pyprune.config import PruneConfig
from pyprune.distributed import plan_units, row_split_exact, solve_group


@dataclass
class _Hub:
    world: int
    barrier: threading.Barrier = None
    box: object = None
    objs: list = field(default_factory=list)

    def __post_init__(self):
        self.barrier = threading.Barrier(self.world, timeout=120)
        self.objs = [None] * self.world


@dataclass
class ThreadComm:
    """The collectives ``solve_group`` uses, between threads of one process."""
    rank: int
    world_size: int
    hub: _Hub
    split_rows: bool = True
    min_split_rows: int = 8
    device: torch.device = torch.device("cpu")

    def broadcast_(self, t, src):
        self.hub.barrier.wait()
        if self.rank == src:
            self.hub.box = t.clone()
        self.hub.barrier.wait()
        if self.rank != src:
            t.copy_(self.hub.box)
        self.hub.barrier.wait()
        return t

    def all_gather_object(self, obj):
        self.hub.objs[self.rank] = obj
        self.hub.barrier.wait()
        out = list(self.hub.objs)
        self.hub.barrier.wait()
        return out


def _run(world, weights, H, config):
    hub, results, errors = _Hub(world), [None] * world, []

    def rank(r):
        try:
            results[r] = solve_group(ThreadComm(r, world, hub), [W.clone() for W in weights], H, config)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            hub.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("kw", [dict(method="joint", sparsity="2:4", block_size=16),
                                dict(method="joint", sparsity=0.5, block_size=16),
                                dict(method="sparsegpt", sparsity=0.5, block_size=16),
                                dict(method="wanda", sparsity=0.5), dict(method="magnitude", sparsity="2:4")])
def test_solve_group_equals_prune_group(rng, kw):
    torch.set_num_threads(1)
    cols, world = 32, 3
    X = torch.randn(512, cols, generator=rng, dtype=torch.float64)
    H = (X.T @ X / 512).float() if kw["method"] != "magnitude" else None
    weights = [torch.randn(rows, cols, generator=rng) for rows in (48, 16, 40)]
    config = PruneConfig(**kw)
    units = plan_units([(str(i), W.shape[0], W.shape[1]) for i, W in enumerate(weights)], world,
                       row_split_exact(config), 8)
    assert len({u.owner for u in units}) == world  # every rank has work
    if row_split_exact(config):
        assert len(units) > len(weights)  # some matrix's rows are split between ranks
    whole = prune_group(weights, H, config)
    ranks = _run(world, weights, H, config)
    for res in ranks:  # every rank: identical results
        for a, b in zip(res, ranks[0]):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)
            torch.testing.assert_close(a.row_loss, b.row_loss, rtol=0, atol=0, equal_nan=True)  # (NaN: magnitude)
            assert (str(a.loss), str(a.damp), a.exchanges, a.fallback) == (str(b.loss), str(b.damp), b.exchanges,
                                                                           b.fallback)
    for got, ref in zip(ranks[0], whole):  # equal to one process's group solve
        assert torch.equal(got.mask, ref.mask)
        torch.testing.assert_close(got.weight, ref.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.row_loss, ref.row_loss, rtol=1e-4, atol=1e-6, equal_nan=True)
        assert got.loss == pytest.approx(ref.loss, rel=1e-4, abs=1e-7, nan_ok=True)
        assert got.exchanges == ref.exchanges and got.fallback == ref.fallback
        assert (got.damp == ref.damp) or (got.damp != got.damp and ref.damp != ref.damp)
