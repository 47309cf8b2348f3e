"""The Mamba benchmark's bookkeeping (benchmarks/mamba_quality.py): the token remapping, the run order, the
reordered calibration, and the seed summary / paired ratios / noise floor / verdicts on synthetic rows (no model)."""
import argparse
import json
import math

import pytest
import torch

from .util import load_benchmark


@pytest.fixture(scope="module")
def mq():
    return load_benchmark("mamba_quality")


def test_remap_unknown_ids_to_zero(mq):
    vocab = torch.tensor([3, 7, 10])
    ids = torch.tensor([7, 3, 10, 0, 4, 11, 1000])
    assert mq.remap(ids, vocab).tolist() == [2, 1, 3, 0, 0, 0, 0]


def test_plan(mq):
    runs = mq.plan([0, 1, 2])
    assert len(runs) == len(set(runs)) == 2 + 3 * 6 + 2
    assert runs[:2] == [("magnitude", "0.5", None, 0), ("magnitude", "2:4", None, 0)]
    # the first seed, then the noise floor, then the other seeds
    assert runs[2:8] == [(m, sp, 0, 0) for sp in ("0.5", "2:4") for m in ("wanda", "sparsegpt", "joint")]
    assert runs[8:10] == [("joint", "0.5", 0, 1), ("joint", "2:4", 0, 1)]
    assert runs[-1] == ("joint", "2:4", 2, 0)


def _rows(mq):
    """Synthetic rows: joint 10% below Wanda at every seed and text; SparseGPT equal to joint within 0.1% and mixed in
    sign; a reordered joint run 0.05% off."""
    keys = [k for k, _, _ in mq.score_keys()]

    def row(method, sp, seed, order, ppl):
        return {"method": method, "sparsity": sp, "seed": seed, "order": order, "ppl": {k: ppl for k in keys},
                "window_nll": {k: [math.log(ppl)] * 3 + [None if k.endswith("/known") else math.log(ppl)]
                               for k in keys},
                "unknown_target_nll": {n: 12.0 for n in mq.TEXTS},
                "total_loss": float("nan") if method == "magnitude" else 1.0, "prune_seconds": 2.0,
                "sparsity_achieved": 0.5, "loss_by_module": {k: 0.25 for k in mq.MODULE_KINDS}}
    rows = [row("dense", "0", None, 0, 50.0)]
    rows[0].update(total_loss=None, prune_seconds=None, loss_by_module=None)
    for sp in mq.SPARSITIES:
        rows.append(row("magnitude", sp, None, 0, 80.0))
        for seed in (0, 1, 2):
            j = 60.0 + seed
            rows += [row("wanda", sp, seed, 0, j / 0.9), row("joint", sp, seed, 0, j),
                     row("sparsegpt", sp, seed, 0, j * (1.001 if seed % 2 else 0.999))]
        rows.append(row("joint", sp, 0, 1, 60.0 * 1.0005))
    return rows


def test_summary_paired_floor_verdicts(mq):
    rows = _rows(mq)
    out = mq.report(rows)
    s = out["summary"]
    assert list(s)[:3] == ["dense/0", "magnitude/0.5", "wanda/0.5"]
    assert s["joint/0.5"]["seeds"] == [0, 1, 2]
    assert s["joint/0.5"]["wikitext2"] == pytest.approx([61.0, 60.0, 62.0])
    assert s["joint/0.5"]["moby/known"] == pytest.approx([61.0, 60.0, 62.0])
    assert s["magnitude/2:4"]["seeds"] == [None] and math.isnan(s["magnitude/2:4"]["total_loss"])
    p = out["paired"]["joint/wanda/0.5"]["moby"]
    assert p["seeds"] == [0, 1, 2] and p["ratios"] == pytest.approx([0.9] * 3)
    assert (p["mean"], p["min"], p["max"]) == pytest.approx((0.9, 0.9, 0.9))
    assert p["windows"] == pytest.approx([0.9, 0.9])     # constant per-window differences: no spread
    # a window without a known target (None) is left out of the window range
    assert out["paired"]["joint/wanda/0.5"]["moby/known"]["windows"] == pytest.approx([0.9, 0.9])
    q = out["paired"]["joint/sparsegpt/2:4"]["pride"]
    assert q["min"] == pytest.approx(1 / 1.001) and q["max"] == pytest.approx(1 / 0.999)
    assert out["noise_floor"]["joint/0.5/seed0"]["wikitext2"] == pytest.approx(0.0005)
    v = {(x["sparsity"], x["score"], x["baseline"]): x for x in out["verdicts"]}
    assert len(v) == 2 * len(mq.TEXTS) * len(mq.SCORINGS) * 2
    assert v[("0.5", "pride/known", "wanda")]["text"] == "pride"
    w = v[("2:4", "moby", "wanda")]
    assert (w["seed_ranges"], w["paired"], w["verdict"]) == ("apart, lower", "lower", "win")
    assert w["floor"] == pytest.approx(0.0005)
    t = v[("0.5", "pride", "sparsegpt")]
    assert (t["seed_ranges"], t["paired"], t["verdict"]) == ("overlapping", "within noise", "tie")


def test_verdict_paired_win_with_overlapping_ranges(mq):
    rows = _rows(mq)
    for r in rows:      # SparseGPT 1% above joint at every seed: ranges (60-62 vs 60.6-62.6) overlap
        if r["method"] == "sparsegpt":
            r["ppl"] = {k: (60.0 + r["seed"]) * 1.01 for k in r["ppl"]}

    def verdict():
        v = mq.report(rows)["verdicts"]
        return next(x for x in v if (x["sparsity"], x["score"], x["baseline"]) == ("0.5", "wikitext2", "sparsegpt"))
    # the per-window NLLs still say +-0.1%, mixed in sign: the window range spans 1, so not beyond the noise
    x = verdict()
    assert (x["seed_ranges"], x["paired"], x["verdict"]) == ("overlapping", "within noise", "tie")
    for r in rows:
        if r["method"] == "sparsegpt":
            r["window_nll"] = {k: [math.log((60.0 + r["seed"]) * 1.01 * (1 + 0.001 * i)) for i in range(4)]
                               for k in r["window_nll"]}
    x = verdict()
    assert (x["seed_ranges"], x["paired"], x["verdict"]) == ("overlapping", "lower", "paired win, seed ranges overlap")


def test_markdown_and_json(mq):
    rows = _rows(mq)
    result = {
        "model": {"hidden": 8, "layers": 1, "state": 2, "expand": 2, "vocab_size": 11, "parameters": 1000,
                  "pruned_parameters": 500},
        "training": {"steps": 1, "batch": 1, "seqlen": 8, "tokens_seen": 8, "lr": 0.1, "train_seconds": 1.0,
                     "threads": 1, "cached": True, "first_loss_mean10": 3.0, "final_loss_mean10": 2.0},
        "data": {"calib_samples": 4, "calib_seqlen": 8, "eval_seqlen": 8,
                 "texts": {n: {"unknown_fraction": 0.01, "eval_unknown_fraction": 0.02, "eval_windows": 40}
                           for n in mq.TEXTS}},
        "settings": {"block_size": 128}, "seeds": [0, 1, 2], **mq.report(rows), "rows": rows, "seconds": 3.0,
        "threads": 1, "host": "x", "torch": "t"}
    text = mq.markdown(result)
    assert "| joint | 0.5 | 0,1,2 | 61.00 (60.00-62.00) |" in text
    assert "| magnitude | 2:4 | - | 80.00 | 80.00 | 80.00 | 0.5000 | - |" in text
    assert "| magnitude | 2:4 | - | 80.00 | 80.00 | 80.00 |\n" in text          # the known-target table
    assert "| all | 0.5 | joint / wanda | 0.9000 (0.9000-0.9000); windows 0.9000-0.9000 |" in text
    assert "| known | 2:4 | joint / sparsegpt |" in text
    assert "| joint/2:4/seed0 | known | +0.0500% |" in text
    assert ("| known | 2:4 | Moby Dick | wanda | 0.9000 (0.9000-0.9000) | apart, lower | lower (f = 0.0500%) "
            "| **win** |") in text
    assert "12.0 nats per unknown target" in text
    assert "calibration tokens at random positions of valid.txt, one draw" in text
    mixed = {**result, "data": {**result["data"], "calib": "mix", "calib_book_unknown_fraction": 0.25}}
    assert "valid.txt (half) and A Tale of Two Cities (half; 25.0% of its tokens unknown" in mq.markdown(mixed)
    dumped = json.dumps(mq.finite(result), allow_nan=False)   # NaN layer losses become null
    back = json.loads(dumped)
    assert back["summary"]["magnitude/0.5"]["total_loss"] is None
    # --report-only rebuilds everything from the JSON's rows
    again = {**back, **mq.report(back["rows"])}
    assert again["verdicts"] == back["verdicts"] and mq.markdown(again) == text


def test_calibration_mix_and_stems(mq):
    train, book = torch.arange(1000), torch.arange(5000, 6000)
    args = argparse.Namespace(calib="mix", nsamples=5, seqlen=16)
    mixed = mq.calibration(args, train, book, seed=3)
    assert mixed.shape == (5, 16) and bool((mixed[:3] < 1000).all()) and bool((mixed[3:] >= 5000).all())
    from pyprune.data import calibration_samples
    assert torch.equal(mq.calibration(argparse.Namespace(calib="valid", nsamples=5, seqlen=16), train, book, 3),
                       calibration_samples(train, 5, 16, seed=3))   # the first report's windows, unchanged
    assert mq.output_stem("valid") == "mamba_quality" and mq.output_stem("mix") == "mamba_quality_mix"
    assert mq.output_stem("mix", "books") == "mamba_quality_mix_trainbooks"


def test_train_settings_key(mq):
    """valid.txt training keeps the first reports' settings (so their cached model is found again); another
    training text is part of the key."""
    ns = dict(hidden=8, layers=1, state=4, expand=2, steps=3, batch=2, train_seqlen=16, lr=1e-3, weight_decay=0.1,
              warmup=1, seed=0)
    valid = mq.train_settings(argparse.Namespace(**ns, train_text="valid"), 10, "abc")
    books = mq.train_settings(argparse.Namespace(**ns, train_text="books"), 10, "abc")
    assert "train_text" not in valid and books == {**valid, "train_text": "books"}


def test_score_windows_known_targets(mq):
    class Stub(torch.nn.Module):   # log-probabilities log 1/2 for id 1 and log 1/6 for the other three ids
        def forward(self, input_ids, use_cache=False):
            logits = torch.zeros(*input_ids.shape, 4)
            logits[..., 1] = math.log(3.0)
            return type("Out", (), {"logits": logits})()
    windows = torch.tensor([[1, 1, 0, 2], [0, 0, 0, 0]])
    r = mq.score_windows(Stub(), windows, batch_size=1)
    h, lo = math.log(2.0), math.log(6.0)
    assert r["targets"] == 3
    assert r["sum"].tolist() == pytest.approx([h + lo + lo, 3 * lo])
    assert r["known_sum"].tolist() == pytest.approx([h + lo, 0.0]) and r["known_count"].tolist() == [2, 0]
    ev = mq.evaluate_all(Stub(), {"wikitext2": windows}, batch_size=2)
    assert ev["ppl"]["wikitext2"] == pytest.approx(math.exp((h + 5 * lo) / 6))
    assert ev["ppl"]["wikitext2/known"] == pytest.approx(math.exp((h + lo) / 2))
    assert ev["window_nll"]["wikitext2/known"][1] is None
    assert ev["unknown_target_nll"]["wikitext2"] == pytest.approx(lo)


def test_output_stem_names_a_non_default_shrink(mq):
    from pyprune.config import DEFAULT_SHRINK
    assert mq.output_stem("mix", "books") == "mamba_quality_mix_trainbooks"
    assert mq.output_stem("mix", "books", DEFAULT_SHRINK) == "mamba_quality_mix_trainbooks"
    assert mq.output_stem("mix", "books", 0.25) == "mamba_quality_mix_trainbooks_shrink0.25"
    assert mq.output_stem("valid", "valid", 0.0) == "mamba_quality_shrink0"


def test_reused_rows_checks_the_run_it_reuses(mq, tmp_path):
    rows = _rows(mq)
    expect = {"training": {"steps": 180, "seed": 0}, "data": {"calib": "mix", "calib_samples": 32},
              "seeds": [0, 1, 2], "block_size": 128}
    old = {"training": {"steps": 180, "seed": 0, "train_seconds": 3.0}, "data": {"calib": "mix", "calib_samples": 32,
           "texts": {}}, "seeds": [0, 1, 2], "settings": {"block_size": 128}, "rows": rows}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    dense = dict(rows[0])
    got = mq.reused_rows(str(path), expect, dense)
    assert got and {r["method"] for r in got} == {"magnitude", "wanda", "sparsegpt"}
    assert len(got) == len([r for r in rows if r["method"] in ("magnitude", "wanda", "sparsegpt")])
    # another model: the dense perplexities differ
    other = dict(dense, ppl={k: v * 1.001 for k, v in dense["ppl"].items()})
    with pytest.raises(ValueError, match="dense perplexities differ"):
        mq.reused_rows(str(path), expect, other)
    # other settings: each named
    for key, value in (("seeds", [0, 1]), ("block_size", 64), ("data", {"calib": "valid", "calib_samples": 32}),
                       ("training", {"steps": 90, "seed": 0})):
        with pytest.raises(ValueError, match=f"its {key} "):
            mq.reused_rows(str(path), dict(expect, **{key: value}), dense)
