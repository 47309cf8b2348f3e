"""The accuracy report's bookkeeping: run keys, the grid per calibration size, and which SparseGPT run a joint run
is compared with (a mistake here silently compares runs of different damping or calibration size)."""
import pytest

from .util import load_benchmark


@pytest.fixture(scope="module")
def acc():
    return load_benchmark("accuracy")


def test_keys_are_unique_and_stable(acc):
    keys = [acc.key(r) for n in (32, 128) for r in acc.grid("full", n)]
    assert len(keys) == len(set(keys))
    # keys of the base calibration size predate the calibration-size suffix: cached runs must still be found
    assert acc.key(dict(method="joint", sparsity="2:4", block_size=128)) == "joint/2:4/B128/exact/block"
    assert acc.key(dict(method="sparsegpt", sparsity="0.5", block_size=128, damp=0.1)) == "sparsegpt/0.5/B128/damp0.1"
    assert acc.key(dict(method="wanda", sparsity="0.6", block_size=128, nsamples=128)) == "wanda/0.6/B128/n128"
    assert acc.key(dict(method="sparsegpt", sparsity="0.7", block_size=128, mask_scope="row")) == "sparsegpt/0.7/B128/row"
    assert acc.key(dict(method="joint", sparsity="0.5", block_size=128, mask_scope="row")) == \
        "joint/0.5/B128/sparsegpt/row"
    # the main comparison runs each method with its default mask scope: per row for joint, per block for SparseGPT
    assert acc.main_key("joint", "0.5") == "joint/0.5/B128/sparsegpt/row"
    assert acc.main_key("sparsegpt", "0.5") == "sparsegpt/0.5/B128"
    # the keys carry no exchanges: a re-run of a cached N:M joint run computes what the key named then
    assert acc.config_of(dict(method="joint", sparsity="2:4", block_size=128)).swaps == 0
    assert acc.main_key("joint", "4:8", 128) == "joint/4:8/B128/exact/block/n128"
    # methods that never look at calibration data have one key for every calibration size
    assert acc.key(dict(method="magnitude", sparsity="0.5", block_size=128, nsamples=128)) == "magnitude/0.5/B128"


def test_other_calibration_sizes_rerun_only_calibrated_main_runs(acc):
    runs = acc.grid("full", 128)
    assert runs and all(r["method"] in ("wanda", "sparsegpt", "joint") for r in runs)
    assert all(r["nsamples"] == 128 and r["block_size"] == 128 and "mask" not in r for r in runs)
    assert {(r["method"], r["sparsity"]) for r in runs if "damp" not in r and "mask_scope" not in r} == {
        (m, sp) for m in ("wanda", "sparsegpt", "joint") for sp in acc.SPARSITIES}
    assert not any("damp" in r or "mask_scope" in r for r in runs[:15])   # the main comparison runs first


def test_reference_matches_sparsity_damping_and_calibration(acc):
    assert acc.reference_key("joint/0.5/B64/sparsegpt/block") == "sparsegpt/0.5/B128"
    assert acc.reference_key("joint/2:4/B128/exact/block/damp0.1/n128") == "sparsegpt/2:4/B128/damp0.1/n128"
    assert acc.reference_key("sparsegpt/4:8/B32") == "sparsegpt/4:8/B128"


def test_layer_ratios(acc):
    cache = {"sparsegpt/0.5/B128": dict(method="sparsegpt", layer_loss={"a": 2.0, "b": 4.0, "c": 1.0}),
             "joint/0.5/B128/sparsegpt/block": dict(method="joint", layer_loss={"a": 1.0, "b": 5.0, "c": 0.75})}
    med, worst = acc.layer_ratios(cache, "joint/0.5/B128/sparsegpt/block")
    assert med == pytest.approx(0.75) and worst == pytest.approx(1.25)
    assert acc.layer_ratios(cache, "sparsegpt/0.5/B128") is None      # not against itself
