"""Issue 11: bad input is refused before the slow work, naming the file, module or option at fault; damaged
weights are named; streamed runs never mix with an earlier output and say when they resume."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from pyprune.cli import EXIT_BAD_INPUT, main

from ..models.tiny import save_tiny_dir, tiny_model
from .test_cli import WORDS


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("early")
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    model_dir = save_tiny_dir(tiny_model("llama", g, layers=2), str(root / "model"))
    text = root / "text.txt"
    idx = torch.randint(0, len(WORDS), (1500,), generator=g).tolist()
    text.write_text(" ".join(WORDS[i] for i in idx) + "\n")
    return {"root": root, "model": model_dir, "text": str(text), "g": g}


def prune(ws, model, out, *extra):
    return main(["prune", model, "--calib-text", ws["text"], "--nsamples", "2", "--seqlen", "32", "--block-size", "16",
                 "--device", "cpu", "-q", "-o", str(out), *extra])


def test_device_and_backend_fail_before_loading(ws, tmp_path, capsys, monkeypatch):
    import pyprune.models.io as io
    monkeypatch.setattr(io, "load_model", lambda *a, **k: pytest.fail("loaded weights before checking"))
    if not torch.cuda.is_available():
        assert prune(ws, ws["model"], tmp_path / "a", "--device", "cuda") == EXIT_BAD_INPUT
        assert "CUDA is not available" in capsys.readouterr().err
        assert prune(ws, ws["model"], tmp_path / "b", "--backend", "cuda") == EXIT_BAD_INPUT
        assert "backend" in capsys.readouterr().err
    assert prune(ws, ws["model"], tmp_path / "c", "--device", "foo") == EXIT_BAD_INPUT
    assert "invalid device 'foo'" in capsys.readouterr().err


def test_nm_checked_against_the_config_before_loading(ws, tmp_path, capsys, monkeypatch):
    model = save_tiny_dir(tiny_model("llama", ws["g"], intermediate_size=130), str(tmp_path / "odd"))
    import pyprune.models.io as io
    monkeypatch.setattr(io, "load_model", lambda *a, **k: pytest.fail("loaded weights before checking"))
    assert prune(ws, model, tmp_path / "out", "--sparsity", "2:4") == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.down_proj has 130 input features, not a multiple of M=4" in err


def test_damaged_weights_are_named(ws, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    for what, key, pattern in (("nan", "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight holds"),
                               ("inf", "model.embed_tokens.weight", "model.embed_tokens.weight")):
        d = tmp_path / what
        shutil.copytree(ws["model"], d)
        sd = load_file(str(d / "model.safetensors"))
        sd[key][0, 0] = float("nan") if what == "nan" else float("inf")
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        assert prune(ws, str(d), tmp_path / f"out-{what}") == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert pattern in err, err
        assert not os.path.exists(tmp_path / f"out-{what}" / "pyprune_manifest.json")
    assert main(["eval", str(tmp_path / "nan"), "--text", ws["text"], "--seqlen", "32", "--nsamples", "2",
                 "-q"]) == EXIT_BAD_INPUT
    assert "not finite" in capsys.readouterr().err


def test_truncated_files_are_named(ws, tmp_path, capsys):
    d = tmp_path / "trunc"
    shutil.copytree(ws["model"], d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert main(["eval", str(d), "--text", ws["text"], "--seqlen", "32", "--nsamples", "2", "-q"]) == EXIT_BAD_INPUT
    assert str(d) in capsys.readouterr().err
    g = tmp_path / "bad.gguf"
    g.write_bytes(b"GGUF" + b"\0" * 64)
    assert prune(ws, str(g), tmp_path / "out-gguf") == EXIT_BAD_INPUT
    assert "not a readable GGUF file" in capsys.readouterr().err


def test_streamed_run_into_an_earlier_output(ws, tmp_path, capsys):
    """Issue 11 item 4: a streamed run into an earlier (in-memory) output needs --overwrite, and then no stale
    model.safetensors stays beside the new shards; the user's own file is kept."""
    out = tmp_path / "out"
    assert prune(ws, ws["model"], out, "--sparsity", "0.5") == 0
    assert (out / "model.safetensors").exists()
    (out / "my_eval.json").write_text("{}")
    assert prune(ws, ws["model"], out, "--sparsity", "2:4", "--stream", "on") == EXIT_BAD_INPUT
    assert "overwrite" in capsys.readouterr().err
    assert prune(ws, ws["model"], out, "--sparsity", "2:4", "--stream", "on", "--overwrite") == 0
    assert "model.safetensors" in capsys.readouterr().err  # says what it removed
    assert not (out / "model.safetensors").exists() and (out / "my_eval.json").exists()
    report = json.load(open(out / "pyprune_report.json"))
    assert report["settings"]["sparsity"] == "2:4" and "model.safetensors" in report["settings"]["replaced_files"]
    from transformers import AutoModelForCausalLM
    W = AutoModelForCausalLM.from_pretrained(str(out)).model.layers[0].mlp.up_proj.weight
    assert bool(((W == 0).reshape(W.shape[0], -1, 4).sum(-1) == 2).all())


def test_resumed_streamed_run_says_so(ws, tmp_path, capsys, monkeypatch):
    import pyprune.models.streaming as streaming
    out = tmp_path / "out"
    real = streaming._ShardStore.done

    def die_after_0(self, i, *a):
        real(self, i, *a)
        if i == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(streaming._ShardStore, "done", die_after_0)
    assert prune(ws, ws["model"], out, "--stream", "on") == 130
    monkeypatch.setattr(streaming._ShardStore, "done", real)
    capsys.readouterr()
    assert prune(ws, ws["model"], out, "--stream", "on") == 0
    assert "resuming the unfinished run there after block 0" in capsys.readouterr().err
    assert json.load(open(out / "pyprune_report.json"))["settings"]["resumed_after_block"] == 0


def test_failed_prune_model_says_which_blocks_are_done(ws):
    """Issue 11 item 8: a prune_model call that fails midway leaves earlier blocks pruned; the error says so."""
    from pyprune import PruneConfig
    from pyprune.models import prune_model
    from ..models.tiny import calibration
    model = tiny_model("llama", ws["g"], layers=3)
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model.layers.2.mlp.up_proj.weight holds NaN") as info:
        prune_model(model, calibration(ws["g"], 2, 16), PruneConfig(sparsity=0.5, block_size=16))
    assert any("blocks 0-1 of model.layers were pruned before this error" in n for n in info.value.__notes__)


def test_library_calls_print_nothing(ws, tmp_path, capfd):
    """Library code prints nothing: loading, pruning and saving leave stdout and stderr empty."""
    import pyprune
    from ..models.tiny import calibration
    model = pyprune.load_model(ws["model"])
    report = pyprune.prune_model(model, calibration(ws["g"], 2, 16), pyprune.PruneConfig(sparsity="2:4",
                                                                                        block_size=16))
    pyprune.save_model(model, str(tmp_path / "out"), report=report)
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
