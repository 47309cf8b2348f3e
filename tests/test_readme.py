"""The README's Model API example runs as written: its python blocks (section "Model API and CLI") are executed with
the built-in model and the big checkpoint replaced by tiny models, and the calibration size scaled down. It reads
``wikitext2`` from the shared data folder beside the checkout, as the README says (skipped without it, like the other
data tests). About 15 s on 2 CPU cores."""
from __future__ import annotations

import os
import re

import pytest
import torch

from pyprune.models.outdir import MANIFEST_NAME

from .models.tiny import save_tiny_dir, tiny_model

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
SECTION = "### Model API and CLI"
SUBSTITUTIONS = {'"builtin"': "SMALL", '"llama-70b/"': "BIG", "nsamples=128, seqlen=2048": "nsamples=4, seqlen=64"}


def section_code() -> str:
    text = open(README, encoding="utf-8").read()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    body = text.split(SECTION, 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"no python code block in the README section {SECTION!r}"
    return "\n".join(blocks)


def test_readme_model_api_example_runs(tmp_path, monkeypatch, capsys):
    from pyprune.data import shared_dir
    try:
        shared_dir()
    except FileNotFoundError as e:
        pytest.skip(f"the README example reads wikitext2 from the shared data folder: {e}")
    code = section_code()
    for old, new in SUBSTITUTIONS.items():
        assert old in code, f"the README example no longer contains {old}; update SUBSTITUTIONS in {__file__}"
        code = code.replace(old, new)
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    small = save_tiny_dir(tiny_model("llama", g, layers=2), str(tmp_path / "small"))
    big = save_tiny_dir(tiny_model("llama", g, layers=3), str(tmp_path / "big"), max_shard_size="60KB")
    monkeypatch.chdir(tmp_path)
    namespace = {"SMALL": small, "BIG": big, "__name__": "readme"}
    exec(compile(code, f"{README} ({SECTION})", "exec"), namespace)
    out = namespace["out"]
    assert out == str(tmp_path / "pruned") and "tokenizer.json" in out.files and out.removed == ()
    assert {"tokenizer.json", MANIFEST_NAME, "pyprune_report.json"} <= set(os.listdir(tmp_path / "pruned"))
    assert os.path.isfile(tmp_path / "pruned-70b" / "pyprune_report.json")
    assert "achieved sparsity 0.5000" in capsys.readouterr().out
