"""Issue 23, part 5: ``pyprune inspect`` of a checkpoint reads no weight: the model is built from its config on the
meta device and observed there (or, where a block's forward needs values, with zero-filled weights one block at a
time); the result equals the inspection of the loaded model, for every type of the matrix, from a directory that holds
only config.json."""
from __future__ import annotations

import os

import pytest

from pyprune.cli import EXIT_OK, main
from pyprune.models.pipeline import inspect_model

from .tiny import MODEL_TYPES, MORE_TYPES, tiny_model


@pytest.mark.parametrize("model_type", MODEL_TYPES + MORE_TYPES)
def test_inspect_from_the_config_equals_the_loaded_model(model_type, rng, tmp_path):
    model = tiny_model(model_type, rng, layers=3)
    model.save_pretrained(str(tmp_path))
    for name in os.listdir(tmp_path):
        if name.endswith(".safetensors"):
            os.remove(tmp_path / name)  # no weight to read
    assert inspect_model(str(tmp_path)).to_dict() == inspect_model(model).to_dict()


def test_cli_inspect_without_weights(rng, tmp_path, capsys):
    tiny_model("qwen2_moe", rng).config.save_pretrained(str(tmp_path))
    assert os.listdir(tmp_path) == ["config.json"]
    assert main(["inspect", str(tmp_path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "4 experts" in out and "dense: mlp.gate (router: its output chooses experts (topk))" in out, out
