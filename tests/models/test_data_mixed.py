"""Mixed-domain calibration (issue 13): samples split evenly between several texts, the shared books as a named text
set, and the CLI's comma-separated ``--calib-text``."""
from __future__ import annotations

import pytest
import torch

from pyprune.data import calibration_samples, load_text, mixed_calibration_samples, strip_gutenberg_header


def test_mixed_samples_split_evenly_and_keep_each_streams_windows():
    g = torch.Generator().manual_seed(7)
    streams = [torch.randint(0, 100, (400,), generator=g), torch.randint(100, 200, (300,), generator=g),
               torch.randint(200, 300, (500,), generator=g)]
    out = mixed_calibration_samples(streams, 8, 17, seed=4)
    assert out.shape == (8, 17)
    source = (out[:, 0] // 100).tolist()
    assert source == [0, 0, 0, 1, 1, 1, 2, 2]  # 8 = 3 + 3 + 2, in stream order
    assert torch.equal(out[:3], calibration_samples(streams[0], 3, 17, seed=4))
    assert torch.equal(out[6:], calibration_samples(streams[2], 2, 17, seed=4))
    # every window lies inside its own stream (no window straddles two texts)
    for row, s in zip(out, source):
        assert bool(((row >= 100 * s) & (row < 100 * (s + 1))).all())
    assert torch.equal(mixed_calibration_samples(streams[:1], 5, 17, seed=4),
                       calibration_samples(streams[0], 5, 17, seed=4))


def test_mixed_samples_refuse_too_few_samples():
    with pytest.raises(ValueError, match="fewer than the 3 calibration texts"):
        mixed_calibration_samples([torch.arange(100)] * 3, 2, 10)
    with pytest.raises(ValueError, match="at least one"):
        mixed_calibration_samples([], 2, 10)


def test_gutenberg_header_and_named_set():
    assert strip_gutenberg_header("licence\n*** START OF THE BOOK ***\nChapter 1\n") == "Chapter 1\n"
    assert strip_gutenberg_header("no header\n") == "no header\n"
    calib, evaluation = load_text("gutenberg", split="calib"), load_text("gutenberg", split="eval")
    assert "Project Gutenberg" not in calib[:500] and "Project Gutenberg" not in evaluation[:500]
    assert calib[:2000] != evaluation[:2000]  # never the same book to calibrate and to evaluate


def test_cli_calibrates_on_several_texts(tmp_path, capsys):
    from pyprune.cli import main
    from pyprune.models.io import load_model

    from ..cli.test_cli import WORDS
    from .tiny import save_tiny_dir, tiny_model

    g = torch.Generator().manual_seed(3)
    model = save_tiny_dir(tiny_model("llama", g, layers=2), str(tmp_path / "model"))
    texts = []
    for i, words in enumerate((WORDS[:20], WORDS[20:])):
        idx = torch.randint(0, len(words), (800,), generator=g).tolist()
        p = tmp_path / f"text{i}.txt"
        p.write_text(" ".join(words[j] for j in idx) + "\n")
        texts.append(str(p))
    outs = {}
    for name, calib in (("both", ",".join(texts)), ("first", texts[0])):
        out = str(tmp_path / name)
        rc = main(["prune", model, "--calib-text", calib, "--nsamples", "4", "--seqlen", "32", "--output", out,
                   "-q", "--sparsity", "0.5"])
        assert rc == 0, capsys.readouterr().err
        outs[name] = load_model(out).state_dict()
    # the second text's samples change the Hessians, so the pruned weights differ
    k = next(k for k in outs["both"] if k.endswith("mlp.down_proj.weight"))
    assert not torch.equal(outs["both"][k], outs["first"][k])
    rc = main(["prune", model, "--calib-text", texts[0] + ",missing.txt", "--nsamples", "4", "--seqlen", "32",
               "--output", str(tmp_path / "bad"), "-q"])
    assert rc != 0 and "missing.txt" in capsys.readouterr().err
