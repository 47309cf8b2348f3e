"""Quantized checkpoints (pyprune.models.fp8): an FP8 checkpoint (transformers' fine-grained FP8, DeepSeek-V3's
layout: float8_e4m3fn weights with ``weight_scale_inv`` block scales) is pruned streamed and written back in FP8 with
the same keys, dtypes and config; the pruned weights are exactly the FP8 quantization of what pruning the same
dequantized weights as a float checkpoint gives. Other quantized formats are refused before any weight is read."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from pyprune import PruneConfig
from pyprune.models.pipeline import prune_pretrained
from pyprune.models.discover import UnsupportedModelError
from pyprune.models.fp8 import FP8, Fp8Format

from .tiny import calibration, save_tiny_dir, tiny_model

BLOCK = (32, 32)


def _all_tensors(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def _fp8_and_float_checkpoints(root, rng):
    """The same tiny Llama twice: as an FP8 checkpoint (its projections quantized with BLOCK scales) and as a float32
    checkpoint holding exactly those weights dequantized."""
    model = tiny_model("llama", rng, layers=2)
    fdir, qdir = str(root / "float"), str(root / "fp8")
    save_tiny_dir(model, fdir)
    save_tiny_dir(model, qdir)
    fmt = Fp8Format(BLOCK)
    sd = load_file(os.path.join(qdir, "model.safetensors"))
    q, f = {}, {}
    for k, v in sd.items():
        if k.endswith("proj.weight"):
            w8, s = fmt.quantize(v, torch.ones(-(-v.shape[0] // BLOCK[0]), -(-v.shape[1] // BLOCK[1])))
            q[k], q[k + "_scale_inv"] = w8, s
            f[k] = fmt.dequantize(w8, s, v.dtype)
        else:
            q[k] = f[k] = v
    save_file(q, os.path.join(qdir, "model.safetensors"), metadata={"format": "pt"})
    save_file(f, os.path.join(fdir, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(qdir, "config.json")))
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": list(BLOCK)}
    json.dump(cfg, open(os.path.join(qdir, "config.json"), "w"))
    return fdir, qdir, fmt


def test_fp8_checkpoint_pruned_and_written_back_in_fp8(tmp_path, rng):
    fdir, qdir, fmt = _fp8_and_float_checkpoints(tmp_path, rng)
    ids = calibration(rng, 4, 16)
    config = PruneConfig(method="joint", sparsity="2:4", block_size=32)
    report = prune_pretrained(qdir, str(tmp_path / "out_fp8"), ids, config, device="cpu")
    prune_pretrained(fdir, str(tmp_path / "out_float"), ids, config, device="cpu", stream="on")
    assert "fp8" in report.settings["weight_format"] and "32 x 32" in report.settings["weight_format"]
    src, got = _all_tensors(qdir), _all_tensors(str(tmp_path / "out_fp8"))
    ref = _all_tensors(str(tmp_path / "out_float"))
    assert set(got) == set(src) and all(got[k].dtype == src[k].dtype and got[k].shape == src[k].shape for k in src)
    cfg = json.load(open(tmp_path / "out_fp8" / "config.json"))
    assert cfg["quantization_config"]["weight_block_size"] == list(BLOCK)
    pruned = [k for k in src if k.endswith("proj.weight")]
    assert len(pruned) == 14
    for k in pruned:
        assert got[k].dtype == FP8
        w8, s = fmt.quantize(ref[k], src[k + "_scale_inv"])  # the float run's pruned weight, quantized
        assert torch.equal(got[k].view(torch.uint8), w8.view(torch.uint8)), k
        assert torch.equal(got[k + "_scale_inv"], s), k
        w = fmt.dequantize(got[k], got[k + "_scale_inv"], torch.float32)
        assert torch.equal((w == 0).view(w.shape[0], -1, 4).sum(-1), torch.full((w.shape[0], w.shape[1] // 4), 2))
    from transformers import AutoModelForCausalLM  # transformers loads it (dequantized on the CPU)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out_fp8"))
    assert torch.isfinite(loaded(ids[:1]).logits).all()


def test_fp8_checkpoint_refuses_in_memory_and_other_formats_fail_early(tmp_path, rng):
    _, qdir, _ = _fp8_and_float_checkpoints(tmp_path, rng)
    ids = calibration(rng, 2, 16)
    with pytest.raises(ValueError, match="fp8.*stream='off'"):
        prune_pretrained(qdir, str(tmp_path / "o1"), ids, PruneConfig(), device="cpu", stream="off")
    cfg = json.load(open(os.path.join(qdir, "config.json")))
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    json.dump(cfg, open(os.path.join(qdir, "config.json"), "w"))
    os.remove(os.path.join(qdir, "model.safetensors"))  # refused before any weight is read
    with pytest.raises(UnsupportedModelError, match="quantized \\('gptq'"):
        prune_pretrained(qdir, str(tmp_path / "o2"), ids, PruneConfig(), device="cpu")
    assert not os.path.exists(tmp_path / "o2") or not os.listdir(tmp_path / "o2")


@pytest.mark.parametrize("shape,block", [((130, 70), (128, 128)), ((64, 96), (32, 32)), ((3, 40, 24), (16, 8)),
                                         ((50, 30), None)])
def test_fp8_quantize_round_trip(shape, block, rng):
    """Block scales amax / 448 (ragged edge blocks, 3-D expert tensors, one scale per tensor): every value within
    FP8's half-ulp (2^-4 relative) of itself, exact zeros kept, the scales' shape and dtype those given."""
    fmt = Fp8Format(block)
    w = torch.randn(*shape, generator=rng)
    w[..., ::3] = 0.0
    nb = (1,) if block is None else (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    like = torch.ones(nb, dtype=torch.bfloat16)
    w8, s = fmt.quantize(w, like)
    assert w8.dtype == FP8 and s.shape == like.shape and s.dtype == torch.bfloat16
    back = fmt.dequantize(w8, s, torch.float32)
    assert torch.equal(back[..., ::3], torch.zeros_like(back[..., ::3]))
    scale = fmt._expand(s.float(), tuple(w.shape))
    assert bool(((back - w).abs() <= 2.0 ** -4 * w.abs() + 2.0 ** -9 * scale + 1e-12).all())


@pytest.mark.parametrize("dtype", [FP8, torch.int8])
def test_quantized_weights_in_memory_refused(dtype, rng):
    """A model whose block weights are quantized in memory (transformers' FP8Linear on a GPU keeps float8 weights;
    GPTQ/bitsandbytes layers hold packed integers) is refused before any work, naming the parameter and the fix."""
    from pyprune.models.driver import prune_model
    model = tiny_model("llama", rng, layers=2)
    lin = model.model.layers[1].mlp.up_proj
    lin.weight = torch.nn.Parameter(lin.weight.data.to(dtype), requires_grad=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.is_floating_point()}
    with pytest.raises(UnsupportedModelError,
                       match=r"model\.layers\.1\.mlp\.up_proj\.weight holds torch\.(float8|int8)"):
        prune_model(model, calibration(rng, 2, 16), PruneConfig(), device="cpu")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)  # nothing pruned


def test_inspect_says_what_the_weights_are(tmp_path, rng):
    from pyprune.models.pipeline import inspect_model
    fdir, qdir, _ = _fp8_and_float_checkpoints(tmp_path, rng)
    q, f = inspect_model(qdir), inspect_model(fdir)
    assert q.weight_format.startswith("fp8 (float8_e4m3fn weights, 32 x 32 block scales)")
    assert "weights: fp8" in q.table() and q.to_dict()["weight_format"] == q.weight_format
    assert f.weight_format is None and "\nweights:" not in f.table()
    assert q.to_dict()["blocks"] == f.to_dict()["blocks"]  # the same matrices either way
    cfg = json.load(open(os.path.join(qdir, "config.json")))
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    json.dump(cfg, open(os.path.join(qdir, "config.json"), "w"))
    assert "not prunable as they are" in inspect_model(qdir).weight_format
