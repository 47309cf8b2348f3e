"""``--calib-text self`` / ``self,FILE``: the spec's parsing (pyprune.data), the samples it builds, the prune command
with self-generated calibration text on a tiny model, and its errors."""
from __future__ import annotations

import json
import os

import pytest
import torch

from pyprune.cli import EXIT_BAD_INPUT, main
from pyprune.data import calibration_texts, calibration_windows, load_text

from ..models.tiny import byte_tokenizer, tiny_model

WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama whose byte-level tokenizer has a BOS token, and a text file."""
    root = tmp_path_factory.mktemp("calib_self")
    g = torch.Generator().manual_seed(3)
    model_dir = str(root / "model")
    tiny_model("llama", g, layers=2).save_pretrained(model_dir)
    tok = byte_tokenizer()
    tok.bos_token = "!"                                      # a byte of the vocabulary
    tok.save_pretrained(model_dir)
    idx = torch.randint(0, len(WORDS), (800,), generator=g).tolist()
    text = root / "text.txt"
    text.write_text(" ".join(WORDS[i] for i in idx) + "\n")
    return {"model": model_dir, "text": str(text), "tok": tok}


def test_spec_parsing(workspace):
    text = workspace["text"]
    assert calibration_texts("self") == [None]
    assert calibration_texts(f"self,{text}") == [None, load_text(text)]
    assert calibration_texts(f" {text} , self ") == [load_text(text), None]
    with pytest.raises(ValueError, match="more than once"):
        calibration_texts("self,self")
    with pytest.raises(FileNotFoundError, match="selff"):
        calibration_texts("selff")


def test_windows_split_between_self_and_text(workspace):
    tok, texts = workspace["tok"], calibration_texts(f"self,{workspace['text']}")
    calls = []

    def generate(count, seed):
        calls.append((count, seed))
        return torch.full((count, 16), -1, dtype=torch.long)
    w = calibration_windows(tok, texts, 5, 16, seed=4, generate=generate)
    assert calls == [(3, 4)] and w.shape == (5, 16)
    assert bool((w[:3] == -1).all()) and bool((w[3:] >= 0).all())
    plain = calibration_windows(tok, [texts[1]], 2, 16, seed=4)   # the text's windows as if alone
    assert torch.equal(w[3:], plain)
    with pytest.raises(ValueError, match="needs the model"):
        calibration_windows(tok, texts, 4, 16)
    with pytest.raises(ValueError, match="shape"):
        calibration_windows(tok, texts, 4, 16, generate=lambda c, s: torch.zeros(c, 8, dtype=torch.long))


def test_prune_with_self_generated_text(workspace, tmp_path, capsys):
    out = str(tmp_path / "pruned")
    rc = main(["prune", workspace["model"], "--method", "sparsegpt", "--sparsity", "0.5", "--calib-text",
               f"self,{workspace['text']}", "--nsamples", "3", "--seqlen", "24", "--seed", "2", "--device", "cpu",
               "--output", out, "--quiet", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "self-generated calibration: 2 x 24 tokens sampled from the dense model in" in captured.out
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["times"]["self_generate"] > 0
    report = json.load(open(os.path.join(out, "pyprune_report.json")))
    assert report["settings"]["calib_text"].startswith("self,") and report["times"]["self_generate"] > 0


def test_self_refused_when_streaming(workspace, tmp_path, capsys):
    rc = main(["prune", workspace["model"], "--calib-text", "self", "--nsamples", "2", "--seqlen", "16",
               "--stream", "on", "--output", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and "self-generated calibration text" in err and "--stream off" in err


def test_self_needs_a_start_token(workspace, tmp_path, capsys):
    model_dir = str(tmp_path / "nobos")
    tiny_model("llama", torch.Generator().manual_seed(1), layers=1).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    rc = main(["prune", model_dir, "--calib-text", "self", "--nsamples", "2", "--seqlen", "16",
               "--output", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and "neither a BOS nor an EOS" in err
