"""Issue 23 part 4 (one run path): a prune checks its output against its input once, before any slow work, and
writes its report once, complete (the CLI's labels and times included), in memory and streamed alike."""
from __future__ import annotations

import json
import os

import pytest
import torch

from pyprune.cli import main

from ..models.tiny import save_tiny_dir, tiny_model
from .test_cli import WORDS


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("onepath")
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    model_dir = save_tiny_dir(tiny_model("llama", g, layers=2), str(root / "model"))
    text = root / "text.txt"
    idx = torch.randint(0, len(WORDS), (1500,), generator=g).tolist()
    text.write_text(" ".join(WORDS[i] for i in idx) + "\n")
    return {"model": model_dir, "text": str(text)}


@pytest.fixture
def counted(monkeypatch):
    """Counts the output-versus-input checks (under every name pyprune calls it by) and the report writes, and
    records, for each check, whether a weight was loaded or a block pruned before it."""
    import pyprune.models.driver as driver
    import pyprune.models.io as io
    import pyprune.models.outdir as outdir
    import pyprune.report as report
    seen = {"checks": 0, "saves": [], "slow_before_check": False, "slow": False}
    check = outdir.check_output_vs_input

    def counting_check(*a, **k):
        seen["checks"] += 1
        seen["slow_before_check"] |= seen["slow"]
        return check(*a, **k)

    monkeypatch.setattr(outdir, "check_output_vs_input", counting_check)
    monkeypatch.setattr(io, "check_output_vs_input", counting_check)
    save = report.PruneReport.save

    def counting_save(self, path):
        seen["saves"].append(path)
        return save(self, path)

    monkeypatch.setattr(report.PruneReport, "save", counting_save)
    load, run = io.load_model, driver.run_blocks

    def slow(fn):
        def wrapped(*a, **k):
            seen["slow"] = True
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(io, "load_model", slow(load))
    monkeypatch.setattr(driver, "run_blocks", slow(run))
    import pyprune.models.streaming as streaming
    monkeypatch.setattr(streaming, "run_blocks", slow(streaming.run_blocks))
    return seen


@pytest.mark.parametrize("stream", ["off", "on"])
def test_checked_once_and_reported_once(ws, tmp_path, counted, stream):
    out = tmp_path / "out"
    assert main(["prune", ws["model"], "--calib-text", ws["text"], "--nsamples", "2", "--seqlen", "32",
                 "--block-size", "16", "--device", "cpu", "-q", "--seed", "7", "--stream", stream, "-o",
                 str(out)]) == 0
    assert counted["checks"] == 1 and not counted["slow_before_check"]
    assert counted["saves"] == [os.path.join(os.path.realpath(out), "pyprune_report.json")]
    report = json.load(open(out / "pyprune_report.json"))
    s = report["settings"]
    assert (s["calib_text"], s["seed"], s["source"], s["streaming"]) == (ws["text"], 7, ws["model"], stream == "on")
    assert s["replaced_files"] == []
    assert list(report["times"])[0] == "tokenize"
    if stream == "off":
        assert list(report["times"])[1] == "load" and report["times"]["save"] > 0
    manifest = json.load(open(out / "pyprune_manifest.json"))
    assert "pyprune_report.json" in manifest["files"]


def test_prune_and_inspect_walk_the_blocks_with_one_loop(ws, monkeypatch):
    """Inspect (from the config on meta, and of a loaded model) and prune go through ``driver.walk_blocks``, each
    block once; inspect's step prunes nothing."""
    import pyprune.models.driver as driver
    from pyprune.config import PruneConfig
    from pyprune.models.io import load_model, resolve_model
    from pyprune.models.pipeline import inspect_model
    walked = []
    walk = driver.walk_blocks

    def counting_walk(blocks, inputs, store, step, **kw):
        def counted_step(i, block, inputs):
            walked.append(i)
            return step(i, block, inputs)
        return walk(blocks, inputs, store, counted_step, **kw)

    monkeypatch.setattr(driver, "walk_blocks", counting_walk)
    skeleton = inspect_model(ws["model"])
    assert walked == [0, 1] and [b.index for b in skeleton.blocks] == [0, 1]
    model = load_model(resolve_model(ws["model"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    walked.clear()
    loaded = inspect_model(model, device="cpu")
    assert walked == [0, 1] and loaded.to_dict() == skeleton.to_dict()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing pruned
    walked.clear()
    report = driver.prune_model(model, torch.randint(0, model.config.vocab_size, (2, 16)), PruneConfig(block_size=16),
                                device="cpu")
    assert walked == [0, 1] and {r.block for r in report.layers} == {0, 1}
    # eval's block-by-block mode walks the same loop: every block once, the last one advanced for the head
    from pyprune.evaluate import perplexity
    walked.clear()
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    seq = perplexity(model, ids, batch_size=2, sequential=True, device="cpu")
    assert walked == [0, 1]
    whole = perplexity(model, ids, batch_size=2, device="cpu")
    assert abs(seq["perplexity"] - whole["perplexity"]) <= 1e-3 * whole["perplexity"]
