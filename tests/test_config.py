"""Options belong to the methods that read them (issue 11 item 11): a report lists only the settings a run used."""
from __future__ import annotations

import pytest

from pyprune import PruneConfig


def test_defaults_only_where_used():
    joint = PruneConfig(method="joint", sparsity=0.5)
    assert (joint.mask, joint.mask_scope) == ("sparsegpt", "row")
    assert PruneConfig(method="joint", sparsity="2:4").mask_scope is None
    assert PruneConfig(method="joint", sparsity="2:4").mask == "exact"
    sgpt = PruneConfig(method="sparsegpt", sparsity="2:4")
    assert (sgpt.mask, sgpt.mask_scope) == (None, None)
    assert PruneConfig(method="sparsegpt", sparsity=0.5).mask_scope == "block"
    for method in ("wanda", "magnitude"):
        c = PruneConfig(method=method, sparsity=0.5)
        assert (c.mask, c.mask_scope) == (None, None)
        assert "mask" not in c.settings() and "mask_scope" not in c.settings() and "block_size" not in c.settings()


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(method="wanda", mask="diag"), "joint method only"),
    (dict(method="sparsegpt", mask="exact", sparsity="2:4"), "joint method only"),
    (dict(method="wanda", mask_scope="row"), "mask_scope"),
    (dict(method="joint", sparsity="2:4", mask_scope="row"), "N:M"),
])
def test_options_a_method_ignores_are_refused(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        PruneConfig(**kwargs)


def test_replace_rederives_method_defaults():
    joint = PruneConfig(method="joint", sparsity=0.5)
    wanda = joint.replace(method="wanda")
    assert (wanda.mask, wanda.mask_scope) == (None, None)
    assert joint.replace(method="sparsegpt").mask_scope == "block"
    assert joint.replace(sparsity="2:4").mask == "exact"
    assert joint.replace(block_size=64).mask_scope == "row"
