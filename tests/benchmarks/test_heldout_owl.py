"""The held-out benchmark's OWL key part (benchmarks/heldout.py): ``owl`` / ``owl<lambda>`` round-trips, reaches
``prune_model`` as its sparsity profile, is refused where the profile is (N:M, lambda out of range), and pairs every
configuration with the same one without the allocation and joint with the baselines under the same allocation."""
import pytest

from .util import load_benchmark


@pytest.fixture(scope="module")
def ho():
    return load_benchmark("heldout")


def test_owl_keys_round_trip(ho):
    for key in ("wanda/0.7/owl", "sparsegpt/0.7/owl0.05", "joint/0.7/sparsegpt/swap16/owl/n64/mix"):
        assert ho.config_key(ho.parse_key(key, 16), 16) == key
    assert ho.config_key(ho.parse_key("joint/0.6/owl", 16), 16) == "joint/0.6/sparsegpt/owl"
    assert ho.config_key(ho.parse_key("wanda/0.7/owl0.08", 16), 16) == "wanda/0.7/owl"  # the default spelled short
    c = ho.parse_key("sparsegpt/0.7/owl0.05/mix", 16)
    assert c["owl"] == 0.05 and ho.config_key(c, 16) == "sparsegpt/0.7/owl0.05/mix"
    assert ho.profile_of(c) == {"sparsity_profile": "owl", "owl_lambda": 0.05}
    assert ho.profile_of(ho.parse_key("wanda/0.7", 16)) == {}
    assert "owl" not in ho.parse_key("joint/0.7/wanda", 16)


@pytest.mark.parametrize("bad, match", [("wanda/2:4/owl", "2:4 sparsity fixes the pattern"),
                                        ("wanda/0.7/owl0.4", "out of range for sparsity 0.7"),
                                        ("sparsegpt/0.7/owlx", "unknown part 'owlx'")])
def test_owl_bad_keys(ho, bad, match):
    with pytest.raises(SystemExit, match=match):
        ho.parse_key(bad, 16)


def test_owl_comparisons(ho):
    keys = ["wanda/0.7", "wanda/0.7/owl", "sparsegpt/0.7/owl", "joint/0.7/sparsegpt/owl", "joint/0.7/sparsegpt",
            "joint/0.7/sparsegpt/owl/mix", "joint/0.7/sparsegpt/mix", "wanda/0.7/owl/mix"]
    pairs = set(ho.comparisons(dict.fromkeys(keys)))
    assert ("wanda/0.7/owl", "wanda/0.7") in pairs                       # with and without the allocation
    assert ("joint/0.7/sparsegpt/owl", "joint/0.7/sparsegpt") in pairs
    assert ("joint/0.7/sparsegpt/owl", "wanda/0.7/owl") in pairs          # the baselines under the same allocation
    assert ("joint/0.7/sparsegpt/owl", "sparsegpt/0.7/owl") in pairs
    assert ("joint/0.7/sparsegpt/owl", "wanda/0.7") not in pairs
    assert ("joint/0.7/sparsegpt/owl/mix", "wanda/0.7/owl/mix") in pairs
    assert ("joint/0.7/sparsegpt/owl/mix", "joint/0.7/sparsegpt/mix") in pairs
    assert ("joint/0.7/sparsegpt/owl/mix", "joint/0.7/sparsegpt/owl") in pairs  # the calibration lever alone
    assert ("joint/0.7/sparsegpt", "wanda/0.7") in pairs                  # unchanged without owl
