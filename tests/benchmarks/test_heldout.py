"""The held-out report's bookkeeping (benchmarks/heldout.py): configuration keys, the run order, the reordered and
mixed calibration, and the seed summary / paired ratios / noise floor on a synthetic cache (no model runs)."""
import math
import statistics

import pytest
import torch

from .util import load_benchmark


@pytest.fixture(scope="module")
def ho():
    return load_benchmark("heldout")


def test_keys_round_trip(ho):
    for key in ("wanda/0.5", "sparsegpt/2:4", "joint/0.5/sparsegpt", "joint/2:4/exact", "joint/0.5/wanda/damp0.1",
                "joint/0.5/wanda/n64/mix", "wanda/0.5/mix", "joint/2:4/exact/swap8/mix"):
        assert ho.config_key(ho.parse_key(key, 16), 16) == key
    # joint's default mask is spelled out; the default calibration size is left out
    assert ho.config_key(ho.parse_key("joint/0.5/n16", 16), 16) == "joint/0.5/sparsegpt"
    assert ho.config_key(ho.parse_key("joint/2:4", 16), 16) == "joint/2:4/exact"
    c = ho.parse_key("joint/0.5/wanda/damp1/n32/mix", 16)
    assert (c["mask"], c["damp"], c["nsamples"], c["mix"]) == ("wanda", 1.0, 32, True)
    assert ho.parse_key("joint/0.5/swap4", 16)["swaps"] == 4
    for key, cal in (("wanda/2:4/code", ("code",)), ("joint/2:4/exact/swap16/self+code", ("self", "code")),
                     ("sparsegpt/0.5/book", ("book",)), ("wanda/0.5/mix", ("wiki", "book")), ("wanda/0.5", ("wiki",))):
        c = ho.parse_key(key, 16)
        assert c["calib"] == cal and ho.config_key(c, 16) == key and ho.calib_of(key) == key.split("/")[-1] * (
            len(cal) > 1 or cal != ("wiki",))
    assert ho.config_key(ho.parse_key("wanda/0.5/wiki", 16), 16) == "wanda/0.5"      # the default left out
    for bad in ("wanda/0.5/self+self", "wanda/0.5/code+bogus", "wanda/0.5/code/book"):
        with pytest.raises((SystemExit, ValueError)):
            ho.parse_key(bad, 16)
    for bad in ("wanda", "wanda/0.5/wanda", "joint/0.5/nomask", "joint/0.5/wanda/bogus", "sparsegpt/0.5/swap4"):
        with pytest.raises((SystemExit, ValueError)):
            ho.parse_key(bad, 16)


def test_plan(ho):
    keys = ["wanda/0.5", "joint/0.5/wanda"]
    runs = ho.plan(keys, [0, 1, 2], ["joint/0.5/wanda"])
    assert [ho.run_key(*r) for r in runs] == [
        "wanda/0.5/seed0", "joint/0.5/wanda/seed0", "joint/0.5/wanda/seed0/order1",
        "wanda/0.5/seed1", "joint/0.5/wanda/seed1", "wanda/0.5/seed2", "joint/0.5/wanda/seed2"]
    runs = ho.plan(keys, [0], ["wanda/0.5"], ("order1", "torch"))
    assert [ho.run_key(*r) for r in runs] == [
        "wanda/0.5/seed0", "joint/0.5/wanda/seed0", "wanda/0.5/seed0/order1", "wanda/0.5/seed0/torch"]


def test_reorder_keeps_the_samples(ho):
    calib = torch.arange(32 * 3).reshape(32, 3)
    assert ho.reorder(calib, 0) is calib
    r = ho.reorder(calib, 1)
    assert not torch.equal(r, calib)
    assert sorted(map(tuple, r.tolist())) == sorted(map(tuple, calib.tolist()))


def test_mixed_calibration_takes_half_from_the_book(ho):
    sources = {"wiki": torch.arange(0, 1000), "book": torch.arange(5000, 6000)}
    c = ho.parse_key("joint/0.5/wanda/n5/mix", 16)
    calib = ho.calibration(sources, c, seed=3, seqlen=10)
    assert calib.shape == (5, 10)
    from_book = (calib[:, 0] >= 5000).tolist()
    assert from_book == [False, False, False, True, True]
    plain = ho.calibration(sources, ho.parse_key("joint/0.5/wanda/n5", 16), seed=3, seqlen=10)
    assert torch.equal(plain[:3], calib[:3]) and bool((plain < 1000).all())


def test_single_and_self_calibration(ho):
    sources = {"wiki": torch.arange(0, 1000), "code": torch.arange(7000, 8000)}
    calib = ho.calibration(sources, ho.parse_key("wanda/0.5/n4/code", 16), seed=1, seqlen=10)
    assert calib.shape == (4, 10) and bool((calib >= 7000).all())
    calls = []

    def generate(count, seed):
        calls.append((count, seed))
        return torch.full((count, 10), -1)
    calib = ho.calibration(sources, ho.parse_key("wanda/0.5/n5/self+code", 16), seed=2, seqlen=10, generate=generate)
    assert calls == [(3, 2)] and calib[:3].eq(-1).all() and calib[3:].ge(7000).all()
    with pytest.raises(ValueError, match="needs the model"):
        ho.calibration(sources, ho.parse_key("wanda/0.5/self", 16), seed=2, seqlen=10)


def test_code_texts_are_disjoint_and_stable(ho):
    assert not set(ho.CODE_EVAL) & set(ho.CODE_CALIB)
    assert list(ho.CODE_EVAL) == sorted(ho.CODE_EVAL) and list(ho.CODE_CALIB) == sorted(ho.CODE_CALIB)
    h = ho.text_hashes()
    assert set(h) == set(ho.TEXTS) | {"code (calibration)"} and all(len(v) == 64 for v in h.values())
    assert "def " in ho.text_of("code") and "->" in ho.text_of("tables")


def test_book_header_is_cut(ho, tmp_path):
    p = tmp_path / "book.txt"
    p.write_text("licence\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nChapter 1\n")
    assert ho.book_text(str(p)) == "Chapter 1\n"


def test_report_from_a_synthetic_cache(ho, tmp_path):
    def entry(ckey, seed, order, base):
        nll = [math.log(base + seed + 0.1 * order)] * 4
        return dict(config=ckey, method=ckey.split("/")[0], seed=seed, order=order, prune_seconds=1.0,
                    **{f"ppl_{n}": base + seed + 0.1 * order for n in ho.TEXTS},
                    **{f"window_nll_{n}": nll for n in ho.TEXTS})
    a, b = "wanda/0.5", "joint/0.5/wanda"
    cache = {"dense": dict(method="dense", **{f"ppl_{n}": 10.0 for n in ho.TEXTS})}
    for ckey, base in ((a, 20.0), (b, 15.0)):
        for s in (0, 1):
            cache[ho.run_key(ckey, s)] = entry(ckey, s, 0, base)
    cache[ho.run_key(b, 0, "order1")] = entry(b, 0, 1, 15.0)              # cached before backend floors: no "floor"
    cache[ho.run_key(b, 0, "torch")] = dict(entry(b, 0, 0, 15.0), floor="torch")
    cache[ho.run_key(b, 0, "torch")]["ppl_moby"] = 15.3
    summary = ho.summarise(cache)
    assert summary[b]["wikitext2"][:3] == (15.5, 15.0, 16.0)
    assert summary[b]["wikitext2"][3] == pytest.approx(math.sqrt(0.5))
    floor = ho.noise_floor(cache)
    assert len(floor) == 2 * len(ho.TEXTS) and floor[0][2] == "order1" and floor[0][4] == pytest.approx(0.1 / 15.0)
    assert {(f[2], f[3]): f[4] for f in floor}[("torch", "moby")] == pytest.approx(0.3 / 15.0)
    assert {(f[2], f[3]): f[4] for f in floor}[("torch", "pride")] == 0.0
    assert all(f"lowest mean `{b}`; ranges apart from `{a}`" in v for v in ho.verdicts(summary))
    assert ho.comparisons(summary) == [(b, a)]
    ratios, win = ho.paired(cache, b, a)["pride"]
    assert ratios == pytest.approx([15 / 20, 16 / 21])
    geo = math.sqrt(15 / 20 * 16 / 21)  # the mean NLL difference over windows of both seeds
    assert 15 / 20 < win[0] < geo < win[1] < 16 / 21
    args = type("A", (), dict(nsamples=16, seqlen=512, eval_windows=4, out=str(tmp_path)))()
    text = ho.write_report(cache, args)
    assert f"| {b} | 0,1 | 15.50 (15.00-16.00) 0.71" in text
    assert f"| `{b}` / `{a}` | 0.756 (0.750-0.762)" in text
    assert (tmp_path / "heldout.md").exists() and "{hw}" not in text
    q = ho.pooled(cache, b, a)                           # b: 4 draws (2 seeds, 2 floor runs); a: 2 draws
    assert q is None
    cache[ho.run_key(a, 2)] = entry(a, 2, 0, 20.0)
    q = ho.pooled(cache, b, a)["pride"]
    assert q[3:] == (4, 3)
    assert q[0] == pytest.approx(statistics.fmean([15, 16, 15.1, 15]) / statistics.fmean([20, 21, 22]))
    assert q[1] < q[0] < q[2] < 1
    text = ho.write_report(cache, args)
    assert f"| `{b}` / `{a}` | 4 / 3 | " in text and "**<1**" in text
    assert "Largest change: 2.0%" in text and f"| {b} | 0 | {ho.FLOOR_KINDS['torch']} | Moby Dick | +2.00% |" in text


def test_comparisons_pair_levers_with_their_baselines(ho):
    keys = ["wanda/2:4/mix", "sparsegpt/2:4/mix", "joint/2:4/exact/mix", "joint/2:4/exact/swap16/mix",
            "llmc-sparsegpt/2:4/mix", "joint/2:4/exact", "joint/0.5/wanda/damp1"]
    pairs = ho.comparisons({k: {} for k in keys})
    assert ("joint/2:4/exact/swap16/mix", "joint/2:4/exact/mix") in pairs       # the update lever
    assert ("joint/2:4/exact/swap16/mix", "sparsegpt/2:4/mix") in pairs
    assert ("joint/2:4/exact/mix", "joint/2:4/exact") in pairs                  # the calibration lever
    assert ("llmc-sparsegpt/2:4/mix", "sparsegpt/2:4/mix") in pairs
    assert ("joint/2:4/exact/swap16/mix", "llmc-sparsegpt/2:4/mix") in pairs    # both implementations
    assert not any(a == "joint/0.5/wanda/damp1" for a, _ in pairs)             # no baseline in the summary
    keys = ["wanda/2:4/code", "joint/2:4/exact/swap16/code", "joint/2:4/exact/swap16/self+code",
            "wanda/2:4/self+code", "joint/2:4/exact/swap16"]
    pairs = ho.comparisons({k: {} for k in keys})
    assert ("joint/2:4/exact/swap16/code", "wanda/2:4/code") in pairs                  # the same calibration
    assert ("joint/2:4/exact/swap16/self+code", "joint/2:4/exact/swap16/code") in pairs  # self added to code
    assert ("joint/2:4/exact/swap16/self+code", "wanda/2:4/self+code") in pairs
    assert ("joint/2:4/exact/swap16/code", "joint/2:4/exact/swap16") in pairs          # against WikiText-2 alone


def test_report_with_texts_added_later(ho, tmp_path):
    """Runs cached before a text was added have no score on it: the report shows '-' there and uses the rest."""
    old = [n for n in ho.TEXTS if n in ("wikitext2", "pride", "moby")]
    a, b = "wanda/2:4", "joint/2:4/exact"
    cache = {"dense": dict(method="dense", **{f"ppl_{n}": 10.0 for n in old},
                           **{f"window_nll_{n}": [math.log(10.0)] * 2 for n in old})}
    for ckey, base in ((a, 20.0), (b, 15.0)):
        for s in (0, 1, 2):
            names = old if s == 0 else list(ho.TEXTS)
            cache[ho.run_key(ckey, s)] = dict(config=ckey, method=ckey.split("/")[0], seed=s, order=0,
                                              prune_seconds=1.0, **{f"ppl_{n}": base + s for n in names},
                                              **{f"window_nll_{n}": [math.log(base + s)] * 2 for n in names})
    summary = ho.summarise(cache)
    assert summary[b]["wikitext2"][0] == 16.0 and summary[b]["code"][:3] == (16.5, 16.0, 17.0)
    assert ho.pooled(cache, b, a)["code"] is None and ho.pooled(cache, b, a)["pride"][3:] == (3, 3)
    assert ho.paired(cache, b, a)["code"][0] == pytest.approx([16 / 21, 17 / 22])
    args = type("A", (), dict(nsamples=16, seqlen=512, eval_windows=2, out=str(tmp_path)))()
    text = ho.write_report(cache, args)
    assert "| dense | - | 10.00 | 10.00 | 10.00 | - | - | - |" in text


def test_at_windows_recomputes_from_the_first_windows(ho):
    nll = [1.0, 2.0, 3.0, 6.0]
    cache = {"r": dict(config="wanda/0.5", ppl_code=math.exp(3.0), window_nll_code=nll,
                       ppl_pride=math.exp(1.5), window_nll_pride=nll[:2])}
    two = ho.at_windows(cache, 2)["r"]
    assert two["ppl_code"] == pytest.approx(math.exp(1.5)) and two["window_nll_code"] == [1.0, 2.0]
    assert two["ppl_pride"] == math.exp(1.5)
    four = ho.at_windows(cache, 4)["r"]
    assert four["ppl_code"] == math.exp(3.0) and "ppl_pride" not in four and "window_nll_pride" not in four
    assert cache["r"]["window_nll_code"] == nll                       # the cache itself is unchanged
