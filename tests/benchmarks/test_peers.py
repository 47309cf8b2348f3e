"""The peer benchmark's bookkeeping (benchmarks/peers.py): configuration keys, the sparsity-pattern check of the
weights llm-compressor returns, and the account of a failed worker (no model runs, no llm-compressor needed)."""
import pytest
import torch

from .util import load_benchmark


@pytest.fixture(scope="module")
def peers():
    return load_benchmark("peers")


def test_keys(peers):
    assert peers.parse_key("llmc-sparsegpt/2:4") == ("sparsegpt", "2:4")
    assert peers.parse_key("llmc-wanda/0.50") == ("wanda", "0.5")
    assert peers.parse_key("llmc-wanda/0.5/mix") == ("wanda", "0.5")
    for bad in ("sparsegpt/0.5", "llmc-joint/0.5", "llmc-wanda", "llmc-wanda/0.5/seed0", "llmc-wanda/x"):
        with pytest.raises(SystemExit):
            peers.parse_key(bad)


def nm_prune(W, n, m):
    rows, cols = W.shape
    idx = W.abs().reshape(rows, cols // m, m).argsort(-1)[..., :n]
    mask = torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, cols)
    return W.masked_fill(mask, 0)


def test_pattern_nm_and_untouched(peers, rng):
    dense = {"a.weight": torch.randn(6, 16, generator=rng), "b.weight": torch.randn(4, 8, generator=rng),
             "norm.weight": torch.ones(8)}
    pruned = {"a.weight": nm_prune(dense["a.weight"], 2, 4), "b.weight": nm_prune(dense["b.weight"], 2, 4),
              "norm.weight": dense["norm.weight"].clone()}
    p = peers.pattern(dense, pruned, {"a.weight", "b.weight"}, "wanda", "2:4")
    assert p["sparsity"] == 0.5 and p["groups_exactly_2_of_4"] == 1.0 and p["kept_equal_dense"]
    assert p["pruned_modules"] == 2 and p["changed_other"] == [] and p["missing"] == []
    pruned["a.weight"][0, :4] = 0  # a group with 4 zeros; an update that moved a kept weight; a norm changed
    pruned["b.weight"][pruned["b.weight"] != 0] *= 1.5
    pruned["norm.weight"][0] = 2.0
    p = peers.pattern(dense, pruned, {"a.weight", "b.weight"}, "sparsegpt", "2:4")
    assert p["groups_exactly_2_of_4"] == pytest.approx(1 - 1 / 32) and p["groups_at_least_2_of_4"] == 1.0
    assert not p["kept_equal_dense"] and p["changed_other"] == ["norm.weight"]
    assert p["row_sparsity_max"] == pytest.approx(10 / 16)


def test_pattern_unstructured_counts(peers, rng):
    W = torch.randn(4, 256, generator=rng)
    per_row = W.scatter(1, W.abs().argsort(1)[:, :128], 0.0)  # Wanda: half of every row
    p = peers.pattern({"w": W}, {"w": per_row}, {"w"}, "wanda", "0.5")
    assert p["rows_exactly_int_fraction"] == 1.0 and "zeros_per_rows_x_128_block_minus_int_fraction" not in p
    block = W.clone()  # SparseGPT's threshold rule: int(p n) + 1 zeros in each rows x 128 block
    for b0 in (0, 128):
        flat = block[:, b0:b0 + 128].reshape(-1).clone()
        flat[flat.abs().argsort()[:257]] = 0
        block[:, b0:b0 + 128] = flat.reshape(4, 128)
    p = peers.pattern({"w": W}, {"w": block}, {"w"}, "sparsegpt", "0.5")
    assert p["zeros_per_rows_x_128_block_minus_int_fraction"] == {"1": 2}


def test_error_of_a_traceback(peers, tmp_path):
    log = tmp_path / "w.log"
    log.write_text("2026 | info | INFO - something\nTraceback (most recent call last):\n"
                   '  File "/x/llmcompressor/a.py", line 3, in outer\n    f()\n'
                   '  File "/x/llmcompressor/sgpt_sparsify.py", line 185, in sparsify_weight\n    y()\n'
                   "RuntimeError: selected index k out of range\n")
    assert peers.error_of(str(log), 1) == ("RuntimeError: selected index k out of range (raised in "
                                           "sgpt_sparsify.py:185, sparsify_weight); worker exit status 1")
    assert peers.error_of(str(tmp_path / "none.log"), -9) == "no output; worker exit status -9"
