"""Issue 23, part 6: a safetensors shard cut short is refused before any slow work, naming the file and the fault;
windows longer than the model's positions are refused before any slow work, naming the option and the limit (and
models without such a limit, Mamba, take any length)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from pyprune import PruneConfig
from pyprune.cli import EXIT_BAD_INPUT, EXIT_OK, main
from pyprune.models import prune_checkpoint, prune_model

from ..models.tiny import calibration, save_tiny_dir, tiny_model
from .test_cli import WORDS


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad23")
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    model = tiny_model("llama", g)  # max_position_embeddings 256
    single = save_tiny_dir(model, str(root / "single"))
    sharded = save_tiny_dir(model, str(root / "sharded"), max_shard_size="100KB")
    mamba = save_tiny_dir(tiny_model("mamba", g), str(root / "mamba"))
    text = root / "text.txt"
    idx = torch.randint(0, len(WORDS), (1500,), generator=g).tolist()
    text.write_text(" ".join(WORDS[i] for i in idx) + "\n")
    return {"root": root, "single": single, "sharded": sharded, "mamba": mamba, "text": str(text), "g": g}


def prune(ws, model, out, *extra, seqlen="32"):
    return main(["prune", model, "--calib-text", ws["text"], "--nsamples", "2", "--seqlen", seqlen,
                 "--block-size", "16", "--device", "cpu", "-q", "-o", str(out), *extra])


@pytest.fixture
def no_slow_work(monkeypatch):
    """Fail the test if a run gets as far as tokenizing or loading weights."""
    import pyprune.models.io as io
    monkeypatch.setattr(io, "load_tokenizer", lambda *a, **k: pytest.fail("tokenized before checking"))
    monkeypatch.setattr(io, "load_model", lambda *a, **k: pytest.fail("loaded weights before checking"))


def cut(src, dst, name, keep):
    shutil.copytree(src, dst)
    f = os.path.join(dst, name)
    with open(f, "rb") as fh:
        data = fh.read()
    with open(f, "wb") as fh:
        fh.write(data[:keep(len(data))])
    return f


@pytest.mark.parametrize("where", ["header", "data"])
@pytest.mark.parametrize("stream", ["auto", "on", "off"])
def test_truncated_shard_named_with_its_fault(ws, tmp_path, capsys, no_slow_work, where, stream):
    keep = (lambda n: 40) if where == "header" else (lambda n: n - 1000)
    shard = sorted(f for f in os.listdir(ws["sharded"]) if f.endswith(".safetensors"))[-1]
    for src, name in ((ws["single"], "model.safetensors"), (ws["sharded"], shard)):
        d = tmp_path / f"{os.path.basename(src)}-{where}"
        f = cut(src, d, name, keep)
        assert prune(ws, str(d), tmp_path / f"out-{d.name}", "--stream", stream) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert f"{f}: truncated safetensors file" in err, err
        assert ("its header alone needs" if where == "header" else "bytes of tensor data") in err, err
        assert "Unterminated" not in err
        assert not os.path.exists(tmp_path / f"out-{d.name}" / "pyprune_manifest.json")


def test_truncated_shard_named_by_eval_and_the_library(ws, tmp_path, capsys):
    d = tmp_path / "cut"
    f = cut(ws["single"], d, "model.safetensors", lambda n: n // 2)
    assert main(["eval", str(d), "--text", ws["text"], "--seqlen", "32", "--nsamples", "2", "-q"]) == EXIT_BAD_INPUT
    assert f"{f}: truncated safetensors file" in capsys.readouterr().err
    from pyprune.models.io import load_model
    with pytest.raises(ValueError, match="truncated safetensors file"):
        load_model(str(d))
    with pytest.raises(ValueError, match="truncated safetensors file"):
        prune_checkpoint(str(d), str(tmp_path / "o"), calibration(ws["g"], 2, 16))


def test_index_naming_a_tensor_its_shard_lacks(ws, tmp_path, capsys, no_slow_work):
    d = tmp_path / "idx"
    shutil.copytree(ws["sharded"], d)
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = "model.layers.0.mlp.up_proj.weight"
    other = sorted(set(data["weight_map"].values()) - {data["weight_map"][key]})[0]
    data["weight_map"][key] = other
    index.write_text(json.dumps(data))
    assert prune(ws, str(d), tmp_path / "out") == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{d / other}: holds no tensor '{key}'" in err, err


@pytest.mark.parametrize("stream", ["off", "on"])
def test_seqlen_beyond_the_positions_refused_early(ws, tmp_path, capsys, no_slow_work, stream):
    assert prune(ws, ws["single"], tmp_path / "out", "--stream", stream, seqlen="100000") == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--seqlen 100000 is more than the 256 positions" in err and "--seqlen 256 or less" in err, err
    assert not os.path.exists(tmp_path / "out")


def test_seqlen_at_the_limit_is_taken_and_eval_checks_too(ws, tmp_path, capsys):
    assert main(["eval", ws["single"], "--text", ws["text"], "--seqlen", "257", "-q"]) == EXIT_BAD_INPUT
    assert "--seqlen 257 is more than the 256 positions" in capsys.readouterr().err
    assert main(["eval", ws["single"], "--text", ws["text"], "--seqlen", "256", "--nsamples", "1", "-q"]) == EXIT_OK


def test_seqlen_refused_by_the_library_before_capture(ws, tmp_path):
    model = tiny_model("llama", ws["g"])
    long = calibration(ws["g"], 1, 300)
    with pytest.raises(ValueError, match="calibration window length 300 is more than the 256 positions"):
        prune_model(model, long, PruneConfig(block_size=16))
    with pytest.raises(ValueError, match="calibration window length 300 is more than the 256 positions"):
        prune_checkpoint(ws["single"], str(tmp_path / "o"), long, PruneConfig(block_size=16))
    assert not os.path.exists(tmp_path / "o" / "pyprune_manifest.json")


def test_models_without_a_position_limit_take_any_length(ws, tmp_path):
    assert prune(ws, ws["mamba"], tmp_path / "out", "--method", "wanda", seqlen="300") == EXIT_OK
    with open(tmp_path / "out" / "pyprune_report.json") as f:
        assert json.load(f)["settings"]["seqlen"] == 300
