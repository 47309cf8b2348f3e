"""The held-out report's bookkeeping (benchmarks/heldout.py): run keys, the run order, the reordered calibration,
and the seed summary / noise floor on a synthetic cache (no model runs)."""
import pytest
import torch

from .util import load_benchmark


@pytest.fixture(scope="module")
def ho():
    return load_benchmark("heldout")


def test_keys_and_plan(ho):
    cfgs = ho.configs(damp=True)
    keys = [ho.config_key(c) for c in cfgs]
    assert len(keys) == len(set(keys))
    assert {"wanda/0.5", "sparsegpt/2:4", "joint/0.5/sparsegpt", "joint/2:4/exact", "joint/0.5/wanda",
            "joint/2:4/wanda/damp0.1"} <= set(keys)
    floor = [c for c in cfgs if c["method"] == "joint" and "mask" not in c and "damp" not in c]
    runs = ho.plan(cfgs, [0, 1, 2], floor, 0)
    run_keys = [ho.run_key(*r) for r in runs]
    assert len(run_keys) == len(set(run_keys)) == 3 * len(cfgs) + len(floor)
    # every configuration at the first two seeds before the noise floor, the third seed last
    assert run_keys[:2 * len(cfgs)] == [ho.run_key(c, s) for s in (0, 1) for c in cfgs]
    assert run_keys[2 * len(cfgs)] == "joint/0.5/sparsegpt/seed0/order1"


def test_reorder_keeps_the_samples(ho):
    calib = torch.arange(32 * 3).reshape(32, 3)
    assert ho.reorder(calib, 0) is calib
    r = ho.reorder(calib, 1)
    assert not torch.equal(r, calib)
    assert sorted(map(tuple, r.tolist())) == sorted(map(tuple, calib.tolist()))


def test_book_header_is_cut(ho, tmp_path):
    p = tmp_path / "book.txt"
    p.write_text("licence\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nChapter 1\n")
    assert ho.book_text(str(p)) == "Chapter 1\n"


def test_report_from_a_synthetic_cache(ho, tmp_path):
    def entry(cfg, seed, order, base):
        return dict(cfg, config=ho.config_key(cfg), seed=seed, order=order, prune_seconds=1.0,
                    **{f"ppl_{n}": base + seed + 0.1 * order for n in ho.TEXTS})
    a, b = dict(method="wanda", sparsity="0.5"), dict(method="joint", sparsity="0.5", mask="wanda")
    cache = {"dense": dict(method="dense", **{f"ppl_{n}": 10.0 for n in ho.TEXTS})}
    for cfg, base in ((a, 20.0), (b, 15.0)):
        for s in (0, 1):
            cache[ho.run_key(cfg, s)] = entry(cfg, s, 0, base)
    cache[ho.run_key(b, 0, 1)] = entry(b, 0, 1, 15.0)
    summary = ho.summarise(cache)
    assert summary["joint/0.5/wanda"]["wikitext2"][:3] == (15.5, 15.0, 16.0)
    floor = ho.noise_floor(cache)
    assert len(floor) == len(ho.TEXTS) and floor[0][3] == pytest.approx(0.1 / 15.0)
    assert all("lowest mean `joint/0.5/wanda`; ranges apart from `wanda/0.5`" in v for v in ho.verdicts(summary))
    args = type("A", (), dict(nsamples=32, seqlen=512, eval_windows=20, out=str(tmp_path)))()
    text = ho.write_report(cache, args)
    assert "| joint/0.5/wanda | 0,1 | 15.50 (15.00-16.00)" in text
    assert "| `joint/0.5/wanda` / `wanda/0.5` | 0.756 (0.750-0.762)" in text
    assert (tmp_path / "heldout.md").exists()
