"""Text -> token batches, and perplexity (whole model and block by block)."""
from __future__ import annotations

import math

import pytest
import torch

from pyprune.data import TextTooShortError, calibration_samples, eval_windows, load_text, shared_dir, tokenize
from pyprune.evaluate import perplexity

from .tiny import TINY, byte_tokenizer, calibration, tiny_model


def test_calibration_and_eval_windows(rng):
    tokens = torch.randint(0, 100, (1000,), generator=rng)
    a = calibration_samples(tokens, 8, 64, seed=3)
    assert a.shape == (8, 64) and torch.equal(a, calibration_samples(tokens, 8, 64, seed=3))
    starts = [int((tokens.unfold(0, 64, 1) == row).all(1).nonzero()[0]) for row in a]
    assert all(0 <= s <= 1000 - 64 for s in starts)
    w = eval_windows(tokens, 100)
    assert w.shape == (10, 100) and torch.equal(w.reshape(-1), tokens)
    assert eval_windows(tokens, 100, 3).shape == (3, 100)
    with pytest.raises(TextTooShortError, match="fewer than nsamples=11"):
        eval_windows(tokens, 100, 11)
    with pytest.raises(TextTooShortError, match="fewer than one sample"):
        calibration_samples(tokens, 1, 2000)
    with pytest.raises(ValueError, match="positive integer"):
        calibration_samples(tokens, 0, 10)


def test_text_sources(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n")
    assert load_text(str(f)) == "hello world\n"
    ids = tokenize(byte_tokenizer(), "hello")
    assert ids.tolist() == tokenize(byte_tokenizer(), "hello").tolist() and ids.numel() == 5
    with pytest.raises(FileNotFoundError, match="not found"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(TextTooShortError):
        load_text(str(tmp_path / "empty.txt"))
    try:
        shared_dir()
    except FileNotFoundError:
        pytest.skip("shared data not present")
    assert len(load_text("wikitext2", split="calib")) > 100_000


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_sequential_perplexity_matches_whole_model(model_type, rng):
    model = tiny_model(model_type, rng)
    windows = calibration(rng, 3, 20)
    whole = perplexity(model, windows, batch_size=2)
    seq = perplexity(model, windows, batch_size=2, sequential=True)
    assert whole["tokens"] == seq["tokens"] == 3 * 19
    assert seq["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-5)
    # per-window NLLs (for paired comparisons): one per window, averaging to the overall NLL, the same both ways
    assert len(whole["window_nll"]) == 3 and sum(whole["window_nll"]) / 3 == pytest.approx(whole["nll"], rel=1e-9)
    assert seq["window_nll"] == pytest.approx(whole["window_nll"], rel=1e-5)
    assert math.isfinite(whole["perplexity"]) and whole["perplexity"] > 1
