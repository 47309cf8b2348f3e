"""Issue 23, part 3: the report says what loads. Its achieved sparsity is over every weight matrix of the pruned
blocks, pruned or kept, and equals the zeros of the saved model; every kept matrix is listed with its reason; the
block table never shows a bare "nan"; in-memory and streamed runs record the same settings; the distributed solves
report their fallbacks and damping."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import pytest
import torch

from pyprune import PruneConfig, prune_layer
from pyprune.models import prune_checkpoint, prune_model
from pyprune.models.io import save_model
from pyprune.models.pipeline import matrix_views
from pyprune.report import PruneReport

from .tiny import calibration, tiny_model

REASONS = ("router: ", "gate: ", "shared with block ", "not selected", "not a linear module's weight")


def saved_zeros(out_dir, report):
    """(zeros, weights) over the saved model's block matrices that the report names, pruned or kept (a matrix
    shared between blocks once)."""
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(str(out_dir))
    views = matrix_views(loaded)
    params = dict(loaded.named_parameters())
    zeros = numel = 0
    for layer in report.layers:
        W = views[layer.name]
        zeros, numel = zeros + int((W == 0).sum()), numel + W.numel()
    for d in report.dense:
        assert d.reason.startswith(REASONS), d
        if not d.counted:
            continue
        W = views.get(d.name)
        if W is None:  # a router or gate: not a prunable matrix, read as the parameter
            W = params[d.name + ".weight"] if d.name + ".weight" in params else params[d.name]
        assert tuple(W.shape) == tuple(d.shape), d
        zeros, numel = zeros + int((W == 0).sum()), numel + W.numel()
    return zeros, numel


@pytest.mark.parametrize("model_type,kw", [
    ("ernie4_5_moe", dict(num_experts=64, moe_num_shared_experts=1, moe_layer_start_index=0,
                          moe_intermediate_size=16, intermediate_size=64)),
    ("qwen2_moe", {}),
    ("zamba2", dict(layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"], hybrid_layer_ids=[1, 3])),
])
def test_sparsity_is_what_the_saved_blocks_hold(model_type, kw, rng, tmp_path):
    model = tiny_model(model_type, rng, **kw)
    report = prune_model(model, calibration(rng, 2, 16), PruneConfig(block_size=16), device="cpu")
    assert report.dense, "the case this test is for: matrices kept dense"
    save_model(model, str(tmp_path / "out"), report=report)
    zeros, numel = saved_zeros(tmp_path / "out", report)
    assert report.sparsity == pytest.approx(zeros / numel, abs=1e-9)
    if model_type == "zamba2":  # only the shared attention kept, counted once in the block that pruned it
        assert report.sparsity == pytest.approx(report.pruned_sparsity)
    else:  # the kept routers and gates hold no zeros
        assert report.sparsity < report.pruned_sparsity
    saved = PruneReport.from_dict(json.loads((tmp_path / "out" / "pyprune_report.json").read_text()))
    assert saved.sparsity == pytest.approx(report.sparsity) and saved.dense == report.dense
    table = report.table()
    assert f"achieved sparsity {report.sparsity:.4f}" in table and "kept dense: " in table
    cfg = PruneConfig(block_size=16)  # the settings that shape the weights are on the summary's method line
    assert f"  shrink {cfg.shrink:g}  exchanges up to {cfg.swaps}  modules pruned" in table
    assert report.outside and all(d.reason == "outside the blocks" and not d.counted for d in report.outside)
    if model_type == "zamba2":
        shared = [d for d in report.dense if d.reason.startswith("shared with block 1")]
        assert shared and all(not d.counted for d in shared)


def test_not_selected_matrices_are_listed(rng):
    model = tiny_model("llama", rng)
    report = prune_model(model, calibration(rng, 2, 16), PruneConfig(block_size=16), modules=["mlp.*"],
                         device="cpu")
    kept = {d.name.split(".", 3)[-1] for d in report.dense}
    assert kept == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    assert all(d.reason.startswith("not selected") and d.sparsity == 0.0 for d in report.dense)
    attn = sum(d.numel for d in report.dense) / len(report.layers + report.dense) > 0
    assert attn and report.sparsity < 0.5 - 1e-3 and report.pruned_sparsity >= 0.5


def test_block_table_never_shows_a_bare_nan(rng):
    model = tiny_model("qwen2_moe", rng, num_experts=64, moe_intermediate_size=8)
    report = prune_model(model, calibration(rng, 1, 4), PruneConfig(block_size=16), device="cpu")
    assert any(not math.isfinite(r.loss) for r in report.layers), "the case: experts no token reached"
    for table in (report.table(), report.table("layer")):
        assert "nan" not in table.lower().replace("magnitude", ""), table
    assert "without a loss: no tokens: magnitude" in report.table()
    magnitude = prune_model(tiny_model("llama", rng), None, PruneConfig(method="magnitude"), device="cpu")
    table = magnitude.table()
    assert "nan" not in table.lower() and "total loss: none (" in table, table


def test_in_memory_and_streamed_reports_record_the_same(rng, tmp_path):
    model = tiny_model("qwen2_moe", rng)
    src = tmp_path / "src"
    model.save_pretrained(str(src))
    ids = calibration(rng, 4, 16)
    kw = dict(device="cpu", batch_size=2, expert_min_tokens=3, hessian_budget=None)
    config = PruneConfig(block_size=16)
    streamed = prune_checkpoint(str(src), str(tmp_path / "out"), ids, config, **kw)
    mem = prune_model(model, ids, config, **kw)
    assert streamed.settings.pop("streaming") is True and mem.settings.pop("streaming") is False
    assert streamed.settings.pop("source") == str(src)
    streamed.settings.pop("replaced_files", None)
    assert streamed.settings == mem.settings
    assert streamed.dense == mem.dense and streamed.outside == mem.outside
    assert streamed.sparsity == pytest.approx(mem.sparsity)


@dataclass
class OneRank:
    """The part of ``distributed.Comm`` that ``prune_units`` uses, for one process."""
    world_size: int = 1
    rank: int = 0
    split_rows: bool = True
    min_split_rows: int = 64
    device: torch.device = torch.device("cpu")

    def broadcast_(self, t, src):
        return t

    def all_gather_object(self, obj):
        return [obj]


def test_distributed_units_report_fallback_and_damp(rng):
    from pyprune.algorithms import FALLBACK_ALL_DEAD
    from pyprune.distributed import prune_units
    cols = 32
    X = torch.randn(256, cols, generator=rng, dtype=torch.float64)
    H = (X.T @ X / 256).float()
    indefinite = H.clone()
    indefinite[0, 0] = -0.05 * float(H.diagonal().mean())  # Cholesky fails at the asked damping, not at 10x
    dead = torch.zeros(cols, cols)
    Ws = [torch.randn(16, cols, generator=rng) for _ in range(4)]
    items = [("a", Ws[0].clone(), H), ("b", Ws[1].clone(), H), ("c", Ws[2].clone(), indefinite),
             ("d", Ws[3].clone(), dead)]
    config = PruneConfig(block_size=16)
    out = [W for _, W, _ in items]
    stats = prune_units(OneRank(), items, config, [lambda rows, v, W=W: W[rows].copy_(v) for W in out])
    for (name, _, Hi), W0, W, st in zip(items, Ws, out, stats):
        ref = prune_layer(W0, Hi, config)
        assert torch.equal(W, ref.weight), name  # the group solve equals each layer alone
        assert st.loss == pytest.approx(float(ref.loss), rel=1e-6, abs=1e-9)
        assert st.fallback == ref.fallback and st.damp == ref.damp, name
    assert stats[3].fallback == FALLBACK_ALL_DEAD
    assert stats[2].damp is not None and stats[2].damp > config.damp


def test_report_round_trip_keeps_dense_entries(tmp_path, rng):
    model = tiny_model("qwen2_moe", rng)
    report = prune_model(model, calibration(rng, 2, 16), PruneConfig(block_size=16), device="cpu")
    path = os.path.join(tmp_path, "r.json")
    report.save(path)
    again = PruneReport.from_dict(json.loads(open(path).read()))
    assert again.dense == report.dense and again.outside == report.outside
    assert again.sparsity == pytest.approx(report.sparsity)


class _Killed(Exception):
    pass


def test_resumed_streamed_report_keeps_the_kept_matrices(rng, tmp_path):
    model = tiny_model("qwen2_moe", rng)
    src = tmp_path / "src"
    model.save_pretrained(str(src))
    ids = calibration(rng, 2, 16)
    config = PruneConfig(block_size=16)
    whole = prune_checkpoint(str(src), str(tmp_path / "whole"), ids, config, device="cpu")

    def kill_after_0(i, reports):
        if i == 0:
            raise _Killed

    with pytest.raises(_Killed):
        prune_checkpoint(str(src), str(tmp_path / "resumed"), ids, config, device="cpu", on_block_done=kill_after_0)
    resumed = prune_checkpoint(str(src), str(tmp_path / "resumed"), ids, config, device="cpu")
    assert resumed.settings["resumed_after_block"] == 0
    assert resumed.dense == whole.dense and len(resumed.dense) == 4
    assert resumed.sparsity == pytest.approx(whole.sparsity)
