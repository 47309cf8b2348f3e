"""The OWL sparsity profile end to end: the pre-pass's outlier ratios against an independent computation on the dense
model (forward hooks on its linear modules), each block pruned to its own target, the weighted mean at the target,
blocks of different sizes (Jamba: Mamba and attention/MoE blocks), in memory, streamed and resumed, from the CLI on a
saved directory, and the bad inputs refused before any work."""
from __future__ import annotations

import json
import os

import pytest
import torch

from pyprune import PruneConfig
from pyprune.models import driver, prune_checkpoint, prune_model
from pyprune.models.streaming import STATE_DIR
from pyprune.owl import allocate
from pyprune.report import PruneReport

from .tiny import calibration, save_tiny_dir, tiny_model

TARGET = 0.7


def spiky(model, block: int, rng, fraction=0.03, scale=15.0):
    """Scale a few random entries of every linear weight of one block: that block gets the most outliers."""
    with torch.no_grad():
        for mod in model.model.layers[block].modules():
            if isinstance(mod, torch.nn.Linear):
                pick = torch.rand(mod.weight.shape, generator=rng) < fraction
                mod.weight[pick] *= scale


def reference_ratios(model, ids, m=5.0):
    """Block -> (outlier ratio, prunable weights), from the dense model's own forward: the squared norms of every
    linear module's input columns by a pre-hook, then |W| * ||X_j|| over the block's matrices together, float64."""
    sq, hooks = {}, []
    layers = model.model.layers
    for i, layer in enumerate(layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                def hook(mod, args, key=(i, name)):
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                    sq[key] = sq.get(key, 0) + (x * x).sum(0)
                hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    out = {}
    for i, layer in enumerate(layers):
        mods = dict(layer.named_modules())
        scores = [(mods[name].weight.detach().double().abs() * sq[(j, name)].sqrt()).reshape(-1)
                  for (j, name) in sq if j == i]
        a = torch.cat(scores)
        out[i] = (float((a > m * a.mean()).double().mean()), a.numel())
    return out


def block_sparsity(report: PruneReport) -> dict[int, tuple[float, int]]:
    """Block -> (achieved sparsity of its pruned matrices, their weights)."""
    out = {}
    for b in sorted({r.block for r in report.layers}):
        rows = [r for r in report.layers if r.block == b]
        n = sum(r.numel for r in rows)
        out[b] = (sum(r.sparsity * r.numel for r in rows) / n, n)
    return out


def test_owl_follows_the_dense_model_and_each_block_gets_its_target(rng):
    model = tiny_model("llama", rng, layers=3)
    spiky(model, 2, rng)  # the last block: spikes earlier also put outliers into the next blocks' inputs
    ids = calibration(rng, 4, 16)
    expected = reference_ratios(model, ids)
    report = prune_model(model, ids, PruneConfig(method="wanda", sparsity=TARGET), sparsity_profile="owl",
                         device="cpu", batch_size=2)
    prof = report.profile
    assert (prof["name"], prof["m"], prof["lambda"], prof["target"]) == ("owl", 5.0, 0.08, TARGET)
    rows = {r["block"]: r for r in prof["blocks"]}
    assert sorted(rows) == [0, 1, 2]
    for b, (ratio, n) in expected.items():
        assert rows[b]["weights"] == n
        assert rows[b]["outlier_ratio"] == pytest.approx(ratio, abs=2 / n)  # a score at the threshold may flip
    alloc = allocate([expected[b][0] for b in range(3)], TARGET, 0.08, sizes=[expected[b][1] for b in range(3)])
    assert [rows[b]["sparsity"] for b in range(3)] == pytest.approx(alloc, abs=1e-3)
    # the spiky block has the most outliers and the lowest target; the targets span 2 lambda, mean the target
    targets = report.block_targets()
    assert min(targets, key=targets.get) == 2
    assert max(targets.values()) - min(targets.values()) == pytest.approx(0.16, abs=1e-9)
    weights = {b: rows[b]["weights"] for b in rows}
    assert sum(targets[b] * weights[b] for b in rows) / sum(weights.values()) == pytest.approx(TARGET, abs=1e-12)
    # what the weights are: every block at its own target, within one weight per row (64 columns at least)
    achieved = block_sparsity(report)
    for b, (sp, _) in achieved.items():
        assert sp == pytest.approx(targets[b], abs=1 / 64), b
    assert report.pruned_sparsity == pytest.approx(TARGET, abs=1 / 64)
    assert max(s for s, _ in achieved.values()) - min(s for s, _ in achieved.values()) > 0.12
    # the report shows and keeps it
    table = report.table()
    assert "target" in table.splitlines()[0]
    assert "sparsity profile owl (M 5, lambda 0.08)" in table and "mean 0.7000" in table
    assert report.settings["sparsity_profile"] == "owl" and report.settings["owl_lambda"] == 0.08
    again = PruneReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.block_targets() == targets


def test_blocks_of_different_sizes_weighted_mean(rng):
    """Jamba: a Mamba block and an attention block with a MoE feed-forward; the targets' mean weighted by the blocks'
    prunable weights is the target, and so is the achieved sparsity over all pruned matrices."""
    model = tiny_model("jamba", rng, layers=2)
    ids = calibration(rng, 4, 16)
    report = prune_model(model, ids, PruneConfig(method="wanda", sparsity=0.6), sparsity_profile="owl", owl_m=3,
                         owl_lambda=0.05, device="cpu")
    rows = report.profile["blocks"]
    assert [r["block"] for r in rows] == [0, 1]
    achieved = block_sparsity(report)
    assert [r["weights"] for r in rows] == [achieved[0][1], achieved[1][1]]
    assert rows[0]["weights"] != rows[1]["weights"]
    if rows[0]["outlier_ratio"] != rows[1]["outlier_ratio"]:  # two blocks: the extremes, 2 lambda apart
        assert abs(rows[0]["sparsity"] - rows[1]["sparsity"]) == pytest.approx(0.1, abs=1e-9)
    mean = sum(r["sparsity"] * r["weights"] for r in rows) / sum(r["weights"] for r in rows)
    assert mean == pytest.approx(0.6, abs=1e-12)
    for r in rows:
        assert achieved[r["block"]][0] == pytest.approx(r["sparsity"], abs=1 / 16)
    assert report.pruned_sparsity == pytest.approx(0.6, abs=1 / 32)


def test_block_config_keeps_every_other_choice():
    cfg = PruneConfig(method="joint", sparsity=0.7, mask="diag", mask_scope="block", swaps=2, shrink=0.3, damp=0.05)
    got = driver.block_config(cfg, 0.62)
    assert got.sparsity.fraction == 0.62
    assert (got.method, got.mask, got.mask_scope, got.swaps, got.shrink, got.damp) == ("joint", "diag", "block", 2,
                                                                                       0.3, 0.05)
    assert driver.block_config(PruneConfig(method="sparsegpt", sparsity=0.7), 0.75).shrink == 0.0
    # the joint default shrink follows the model's target, not each block's share of it
    assert driver.block_config(PruneConfig(sparsity=0.7), 0.62).shrink == 0.25


def test_bad_inputs_fail_before_any_work(rng, monkeypatch):
    model = tiny_model("llama", rng, layers=2)
    ids = calibration(rng, 2, 16)

    def no_capture(*a, **k):
        raise AssertionError("the run started")
    monkeypatch.setattr(driver, "capture_inputs", no_capture)
    with pytest.raises(ValueError, match="2:4 sparsity fixes the pattern"):
        prune_model(model, ids, PruneConfig(sparsity="2:4"), sparsity_profile="owl")
    with pytest.raises(ValueError, match="unknown sparsity_profile 'owl2'"):
        prune_model(model, ids, PruneConfig(sparsity=0.7), sparsity_profile="owl2")
    with pytest.raises(ValueError, match="owl_lambda .* out of range for sparsity 0.7"):
        prune_model(model, ids, PruneConfig(sparsity=0.7), sparsity_profile="owl", owl_lambda=0.35)
    with pytest.raises(ValueError, match="owl_m=3 is an option of sparsity_profile='owl'"):
        prune_model(model, ids, PruneConfig(sparsity=0.7), owl_m=3)
    with pytest.raises(ValueError, match="needs calibration data"):
        prune_model(model, None, PruneConfig(method="magnitude", sparsity=0.7), sparsity_profile="owl")


class Killed(Exception):
    pass


def test_streamed_run_matches_memory_and_resumes_with_the_stored_allocation(rng, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    from pyprune.models import streaming
    base = tiny_model("llama", rng, layers=4)
    spiky(base, 2, rng)
    src = save_tiny_dir(base, str(tmp_path / "src"), max_shard_size="60KB")
    ids = calibration(rng, 4, 16)
    config = PruneConfig(method="sparsegpt", sparsity=0.6, block_size=16)

    in_memory = AutoModelForCausalLM.from_pretrained(src)
    mem = prune_model(in_memory, ids, config, batch_size=2, sparsity_profile="owl")
    full = prune_checkpoint(src, str(tmp_path / "full"), ids, config, batch_size=2, sparsity_profile="owl")
    assert full.profile == mem.profile
    streamed = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full")).state_dict()
    for k, v in in_memory.state_dict().items():
        assert torch.equal(streamed[k], v), k
    saved = json.load(open(tmp_path / "full" / "pyprune_report.json"))
    assert saved["profile"] == mem.profile

    out = str(tmp_path / "resumed")

    def kill_after_1(i, reports):
        if i == 1:
            raise Killed
    with pytest.raises(Killed):
        prune_checkpoint(src, out, ids, config, batch_size=2, sparsity_profile="owl", on_block_done=kill_after_1)
    state = json.load(open(os.path.join(out, STATE_DIR, "state.json")))
    assert state["profile"] == mem.profile

    def no_pass(*a, **k):
        raise AssertionError("a resumed run recomputed the allocation")
    monkeypatch.setattr(streaming, "outlier_pass", no_pass)
    with pytest.raises(ValueError, match="other settings"):  # the profile's settings are in the fingerprint
        prune_checkpoint(src, out, ids, config, batch_size=2, sparsity_profile="owl", owl_lambda=0.05)
    again = prune_checkpoint(src, out, ids, config, batch_size=2, sparsity_profile="owl")
    assert again.profile == mem.profile
    resumed = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for k, v in streamed.items():
        assert torch.equal(resumed[k], v), k


def test_cli_from_a_saved_directory(rng, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    from pyprune.cli import EXIT_BAD_INPUT, main
    model = tiny_model("llama", rng, layers=3)
    spiky(model, 0, rng)
    src = save_tiny_dir(model, str(tmp_path / "src"))
    text = tmp_path / "calib.txt"
    words = "the of and to in a is that for it as was with be by on not he this are or his from at".split()
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (3000,), generator=rng)))
    out = str(tmp_path / "out")
    rc = main(["prune", src, "--method", "wanda", "--sparsity", "0.7", "--sparsity-profile", "owl", "--owl-lambda",
               "0.1", "--calib-text", str(text), "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "-q",
               "--output", out])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "sparsity profile owl (M 5, lambda 0.1)" in captured.out
    report = json.load(open(os.path.join(out, "pyprune_report.json")))
    targets = {r["block"]: r["sparsity"] for r in report["profile"]["blocks"]}
    assert report["settings"]["sparsity_profile"] == "owl" and report["settings"]["owl_lambda"] == 0.1
    assert max(targets.values()) - min(targets.values()) == pytest.approx(0.2, abs=1e-9)
    pruned = AutoModelForCausalLM.from_pretrained(out)
    for b, layer in enumerate(pruned.model.layers):
        ws = [m.weight for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        zeros = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
        assert zeros == pytest.approx(targets[b], abs=1 / 64), b

    rc = main(["prune", src, "--sparsity", "2:4", "--sparsity-profile", "owl", "--calib-text", str(text),
               "--output", str(tmp_path / "nm"), "-q"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT
    assert "--sparsity-profile" in err and "2:4 sparsity fixes the pattern" in err
    assert not os.path.exists(tmp_path / "nm")
    rc = main(["prune", src, "--sparsity", "0.7", "--owl-m", "4", "--calib-text", str(text),
               "--output", str(tmp_path / "m"), "-q"])
    assert rc == EXIT_BAD_INPUT and "owl_m=4.0 is an option" in capsys.readouterr().err
