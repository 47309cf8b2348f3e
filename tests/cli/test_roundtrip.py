"""Issue 23, part 1: every model type of the matrix as a user meets it: a tiny config, ``save_pretrained`` (the
config.json transformers writes, non-finite floats as ``{"__float__": "Infinity"}`` included: Bamba, Granite-4.0-H,
Nemotron-H, Falcon-H1), pruned from the directory with the CLI, the output loaded back with transformers. A few types
streamed from their shards too; inspect and eval read the same configs."""
from __future__ import annotations

import json
import os

import pytest
import torch

from pyprune.cli import EXIT_OK, main
from pyprune.models.io import model_config, resolve_model
from pyprune.models.pipeline import matrix_views

from ..models.tiny import MODEL_TYPES, MORE_TYPES, save_tiny_dir, tiny_model
from .test_cli import WORDS

NONFINITE_TYPES = ("bamba", "granitemoehybrid", "nemotron_h", "falcon_h1")  # config.json holds {"__float__": ...}
STREAMED = ("bamba", "granitemoehybrid", "nemotron_h", "qwen2_moe", "gpt2")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    path = tmp_path_factory.mktemp("rt") / "text.txt"
    idx = torch.randint(0, len(WORDS), (800,), generator=g).tolist()
    path.write_text(" ".join(WORDS[i] for i in idx) + "\n")
    return str(path)


def saved(model_type, rng, path) -> str:
    return save_tiny_dir(tiny_model(model_type, rng), str(path))


def prune_cli(src, out, text, *extra) -> int:
    return main(["prune", src, "--calib-text", text, "--nsamples", "2", "--seqlen", "16", "--block-size", "16",
                 "--device", "cpu", "-q", "-o", str(out), *extra])


def check_output(out, model_type):
    """The output loads with transformers and holds what the report says: every listed matrix at its sparsity."""
    from transformers import AutoModelForCausalLM
    with open(os.path.join(out, "pyprune_report.json")) as f:
        report = json.load(f)
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert loaded.config.model_type == model_type
    views = matrix_views(loaded)
    assert report["layers"], "nothing pruned"
    for layer in report["layers"]:
        W = views[layer["name"]]
        assert float((W == 0).float().mean()) == pytest.approx(layer["sparsity"], abs=1e-6), layer["name"]
        assert layer["sparsity"] >= 0.5 - 1e-6, layer["name"]
    with torch.no_grad():
        logits = loaded(input_ids=torch.arange(8).reshape(1, 8), use_cache=False).logits
    assert bool(torch.isfinite(logits).all())
    return report


@pytest.mark.parametrize("model_type", MODEL_TYPES + MORE_TYPES)
def test_saved_model_prunes_and_loads(model_type, rng, tmp_path, text):
    src = saved(model_type, rng, tmp_path / "in")
    assert prune_cli(src, tmp_path / "out", text, "--stream", "off") == EXIT_OK
    check_output(tmp_path / "out", model_type)


@pytest.mark.parametrize("model_type", STREAMED)
def test_saved_model_streams_and_loads(model_type, rng, tmp_path, text):
    src = saved(model_type, rng, tmp_path / "in")
    assert prune_cli(src, tmp_path / "out", text, "--stream", "on") == EXIT_OK
    report = check_output(tmp_path / "out", model_type)
    assert report["settings"]["streaming"] is True


@pytest.mark.parametrize("model_type", NONFINITE_TYPES)
def test_nonfinite_config_floats_read_as_transformers_reads_them(model_type, rng, tmp_path, text, capsys):
    src = saved(model_type, rng, tmp_path / "in")
    with open(os.path.join(src, "config.json")) as f:
        raw = f.read()
    assert '"__float__": "Infinity"' in raw, "the case this test is for: transformers' encoding of inf"
    from transformers import AutoConfig
    theirs = AutoConfig.from_pretrained(src)
    mine = model_config(resolve_model(src))
    assert mine.to_dict() == theirs.to_dict()
    assert mine.time_step_limit[1] == float("inf")
    assert main(["inspect", src]) == EXIT_OK
    assert "prunable weights" in capsys.readouterr().out
    assert main(["eval", src, "--text", text, "--seqlen", "16", "--nsamples", "2", "-q"]) == EXIT_OK
    assert "perplexity" in capsys.readouterr().out


def test_config_linked_into_a_blob_store(rng, tmp_path, text):
    """A hub snapshot: config.json and the weights are links into another directory (blobs/)."""
    src = saved("llama", rng, tmp_path / "plain")
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snap.mkdir()
    for i, name in enumerate(sorted(os.listdir(src))):
        os.replace(os.path.join(src, name), blobs / f"blob{i}")
        os.symlink(blobs / f"blob{i}", snap / name)
    assert model_config(resolve_model(str(snap))).model_type == "llama"
    assert prune_cli(str(snap), tmp_path / "out", text, "--stream", "off") == EXIT_OK
    check_output(tmp_path / "out", "llama")
