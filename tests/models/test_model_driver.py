"""The architecture table and the sequential block driver on tiny random models of every architecture."""
from __future__ import annotations

import copy

import pytest
import torch

from pyprune import PruneConfig
from pyprune.algorithms import prune_layer
from pyprune.models import ARCHITECTURES, UnsupportedArchitectureError, architecture_for, prune_model
from pyprune.models.architectures import get_submodule
from pyprune.models.driver import weight_2d

from .tiny import TINY, VOCAB, calibration, tiny_model

MODEL_TYPES = sorted(TINY)


def pruned_names(model, arch, blocks=None):
    n = len(get_submodule(model, arch.blocks))
    return [f"{arch.blocks}.{i}.{m}" for i in range(n) if blocks is None or i in blocks
            for m in arch.linear_modules]


def test_table_covers_every_supported_type():
    covered = {t for a in ARCHITECTURES for t in a.model_types}
    assert set(MODEL_TYPES) <= covered
    with pytest.raises(UnsupportedArchitectureError, match="supported model types"):
        architecture_for("bert")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_table_matches_model(model_type, rng):
    """Every linear map of a block is in the table (pruned or listed dense), and modules grouped together really read
    the same input."""
    model = tiny_model(model_type, rng)
    arch = architecture_for(model.config.model_type)
    block = get_submodule(model, arch.blocks)[0]
    linear = {n for n, m in block.named_modules() if type(m).__name__ in ("Linear", "Conv1D")}
    assert linear == set(arch.linear_modules)
    for name in arch.dense:
        get_submodule(block, name)  # exists
    seen = {}
    hooks = [get_submodule(block, m).register_forward_hook(
        lambda mod, inp, out, m=m: seen.__setitem__(m, inp[0].detach().clone())) for g in arch.groups
        for m in g.modules if g.source is None]
    with torch.no_grad():
        model(calibration(rng, 2, 12))
    for h in hooks:
        h.remove()
    for g in arch.groups:
        if g.source is None:
            for m in g.modules[1:]:
                assert torch.equal(seen[g.modules[0]], seen[m]), (g.modules[0], m)


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_prune_every_architecture(model_type, sparsity, rng):
    model = tiny_model(model_type, rng)
    arch = architecture_for(model.config.model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = calibration(rng)
    config = PruneConfig(method="joint", sparsity=sparsity, block_size=32)
    report = prune_model(model, ids, config, batch_size=2, device="cpu")

    names = pruned_names(model, arch)
    assert [r.name for r in report.layers] == names
    assert report.sparsity == pytest.approx(0.5, abs=1e-12)
    for name in names:
        W = weight_2d(get_submodule(model, name), arch)
        rows, cols = W.shape
        if sparsity == "2:4":
            per_group = (W == 0).reshape(rows, cols // 4, 4).sum(-1)
            assert bool((per_group == 2).all()), name
        else:
            assert int((W == 0).sum()) == rows * cols // 2, name
    weights = {n + ".weight" for n in names}
    after = model.state_dict()
    for key, value in before.items():
        if key not in weights:
            assert torch.equal(after[key], value), f"{key} changed"
        else:
            assert not torch.equal(after[key], value)
    for r in report.layers:
        assert r.loss >= 0 and r.samples == ids.numel()
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (*ids.shape, VOCAB) and bool(torch.isfinite(logits).all())
    assert report.peak_host_rss > 0 and report.blocks == len(get_submodule(model, arch.blocks))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_block0_losses_match_prune_layer_on_hooked_hessians(model_type, rng):
    """The driver's layer losses for block 0 equal prune_layer on Hessians collected independently (one per module,
    in float64, all calibration tokens at once)."""
    model = tiny_model(model_type, rng)
    arch = architecture_for(model.config.model_type)
    dense = copy.deepcopy(model)
    block = get_submodule(dense, arch.blocks)[0]
    ids = calibration(rng, 4, 16)
    xs = {}

    def keep(name, width=None, output=False):
        def hook(mod, inp, out):
            x = (out if output else inp[0]).detach().double()
            if width is not None:
                x = x[..., :width]
            xs.setdefault(name, []).append(x.reshape(-1, x.shape[-1]))
        return hook

    handles = []
    for g in arch.groups:
        for m in g.modules:
            if g.source is None:
                handles.append(get_submodule(block, m).register_forward_hook(keep(m)))
            else:
                width = int(get_submodule(block, g.narrow))
                handles.append(get_submodule(block, g.source).register_forward_hook(keep(m, width, True)))
    with torch.no_grad():
        dense(ids)
    for h in handles:
        h.remove()

    config = PruneConfig(method="joint", sparsity="0.5", block_size=32)
    report = prune_model(model, ids, config, batch_size=3, blocks=[0], device="cpu")
    got = {r.name.split(f"{arch.blocks}.0.", 1)[1]: r for r in report.layers}
    assert set(got) == set(arch.linear_modules)
    for m in arch.linear_modules:
        X = torch.cat(xs[m])
        H = (2.0 / X.shape[0]) * X.T @ X
        W = weight_2d(get_submodule(block, m), arch).detach()
        ref = prune_layer(W.contiguous(), H.float(), config)
        assert got[m].loss == pytest.approx(ref.loss, rel=2e-3, abs=1e-6), m
        mine = weight_2d(get_submodule(get_submodule(model, arch.blocks)[0], m), arch)
        agree = float(((mine == 0) == ref.mask).float().mean())
        assert agree > 0.98, (m, agree)
    # blocks=[0]: the second block is untouched
    assert torch.equal(get_submodule(model, arch.blocks)[1].state_dict()[arch.linear_modules[0] + ".weight"],
                       get_submodule(dense, arch.blocks)[1].state_dict()[arch.linear_modules[0] + ".weight"])


def test_module_patterns_and_true_sequential(rng):
    model = tiny_model("llama", rng)
    before = copy.deepcopy(model.state_dict())
    report = prune_model(model, calibration(rng), PruneConfig(sparsity="2:4", block_size=16), modules=["mlp.*"],
                         true_sequential=True)
    assert {r.name.split(".", 3)[3] for r in report.layers} == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    after = model.state_dict()
    assert torch.equal(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])
    assert report.sparsity == 0.5
    with pytest.raises(ValueError, match="matches none"):
        prune_model(model, calibration(rng), PruneConfig(), modules=["attn.nothing"])
    with pytest.raises(ValueError, match="out of range"):
        prune_model(model, calibration(rng), PruneConfig(), blocks=[7])


def test_mamba_dense_parts_on_request(rng):
    model = tiny_model("mamba", rng)
    A_log = model.backbone.layers[0].mixer.A_log.detach().clone()
    report = prune_model(model, calibration(rng), PruneConfig(method="sparsegpt", sparsity="2:4", block_size=16),
                         dense=["mixer.conv1d"])
    conv = model.backbone.layers[0].mixer.conv1d.weight
    assert int((conv == 0).sum()) == conv.numel() // 2
    assert torch.equal(model.backbone.layers[0].mixer.A_log, A_log)
    assert any(r.name.endswith("mixer.conv1d") and r.method == "magnitude" for r in report.layers)
    with pytest.raises(ValueError, match="not a weight matrix"):
        prune_model(model, calibration(rng), PruneConfig(), dense=["mixer.A_log"])
    with pytest.raises(ValueError, match="dense-by-default"):
        prune_model(model, calibration(rng), PruneConfig(), dense=["mixer.in_proj"])


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_other_methods_and_bf16(method, rng):
    model = tiny_model("qwen2", rng, dtype=torch.bfloat16)
    report = prune_model(model, calibration(rng), PruneConfig(method=method, sparsity=0.5, block_size=32))
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
    W = model.model.layers[1].mlp.down_proj.weight
    assert int((W == 0).sum()) == W.numel() // 2
    assert len(report.layers) == 14


def test_magnitude_without_calibration_and_errors(rng):
    model = tiny_model("gpt2", rng)
    report = prune_model(model, None, PruneConfig(method="magnitude", sparsity="4:8", block_size=8))
    assert report.sparsity == 0.5 and all(r.samples == 0 for r in report.layers)
    with pytest.raises(ValueError, match="needs calibration"):
        prune_model(model, None, PruneConfig(method="joint"))
    with pytest.raises(ValueError, match="same length"):
        prune_model(model, [torch.arange(8), torch.arange(9)], PruneConfig())
    with pytest.raises(UnsupportedArchitectureError):
        from transformers import AutoConfig, AutoModelForCausalLM
        bloom = AutoModelForCausalLM.from_config(AutoConfig.for_model("bloom", hidden_size=32, n_layer=1, n_head=4,
                                                                      vocab_size=VOCAB))
        prune_model(bloom, calibration(rng), PruneConfig())


def test_report_json_roundtrip(rng, tmp_path):
    from pyprune.report import PruneReport
    model = tiny_model("opt", rng)
    report = prune_model(model, calibration(rng), PruneConfig(method="magnitude"))
    path = tmp_path / "r.json"
    report.save(str(path))
    again = PruneReport.from_dict(__import__("json").loads(path.read_text()))
    assert [r.name for r in again.layers] == [r.name for r in report.layers]
    assert again.sparsity == pytest.approx(report.sparsity)
    for per in ("layer", "block", "none"):
        assert "achieved sparsity" in report.table(per=per)
