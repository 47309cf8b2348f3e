"""Where the named texts are read from (``pyprune.data.shared_dir``), the copies that ship inside the package, and
the in-repository maths note that code comments cite. Fast; the wheel itself is tested in test_install.py."""
from __future__ import annotations

import os
import re

import pytest

from pyprune import data
from pyprune.data import checkout_shared_dir, load_text, packaged_dir, shared_dir, shared_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "ALGORITHM.md")
# The named texts the defaults read: calibration (wikitext2,gutenberg), `pyprune eval --text wikitext2`, the demo.
DEFAULT_TEXTS = [("wikitext2", "calib"), ("wikitext2", "eval"), ("gutenberg", "calib"), ("gutenberg", "eval")]


def packaged_files() -> list[str]:
    root = packaged_dir()
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                  if f.endswith(".txt"))


def full_shared_dir() -> str | None:
    env = os.environ.get("PYPRUNE_SHARED")
    return env if env and os.path.isdir(env) else checkout_shared_dir()


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("PYPRUNE_SHARED", raising=False)


def fake_root(monkeypatch, path) -> None:
    """Make ``repo_root()`` (the parent of the package directory) return ``path``."""
    monkeypatch.setattr(data, "repo_root", lambda: str(path))


def test_packaged_texts_are_the_shared_files_byte_for_byte():
    shared = full_shared_dir()
    if shared is None:
        pytest.skip("no shared data folder (PYPRUNE_SHARED or ../shared beside the checkout) to compare with")
    files = packaged_files()
    assert files, f"no packaged texts under {packaged_dir()}"
    for rel in files:
        with open(os.path.join(packaged_dir(), rel), "rb") as a, open(os.path.join(shared, rel), "rb") as b:
            assert a.read() == b.read(), f"packaged {rel} differs from {os.path.join(shared, rel)}"


def test_named_texts_read_the_same_from_shared_and_packaged(monkeypatch, no_env, tmp_path):
    """Every text the defaults name resolves in the packaged copies alone, to the same string (so the same token ids)
    as from the shared folder."""
    shared = full_shared_dir()
    fake_root(monkeypatch, tmp_path / "site-packages")  # no setup.py there: an installed wheel
    assert shared_dir() == packaged_dir()
    packaged = {key: load_text(name, split=split) for key in DEFAULT_TEXTS for name, split in [key]}
    assert all(len(t) > 500_000 for t in packaged.values())
    assert packaged[("wikitext2", "calib")] != packaged[("wikitext2", "eval")]
    assert packaged[("gutenberg", "calib")] != packaged[("gutenberg", "eval")]
    assert "*** START OF" not in packaged[("gutenberg", "eval")]  # the header is stripped on reading only
    if shared is None:
        pytest.skip("no shared data folder to compare the packaged texts with")
    monkeypatch.setenv("PYPRUNE_SHARED", shared)
    for (name, split), text in packaged.items():
        assert load_text(name, split=split) == text, f"{name} ({split}) differs between shared and packaged"


def test_resolution_order(monkeypatch, no_env, tmp_path):
    (tmp_path / "checkout").mkdir()
    (tmp_path / "checkout" / "setup.py").write_text("")
    fake_root(monkeypatch, tmp_path / "checkout")
    assert checkout_shared_dir() is None and shared_dir() == packaged_dir()  # a checkout without ../shared
    (tmp_path / "shared" / "data" / "wikitext2").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "wikitext2" / "test.txt").write_text("beside the checkout\n")
    assert shared_dir() == str(tmp_path / "shared")
    assert load_text("wikitext2") == "beside the checkout\n"
    fake_root(monkeypatch, tmp_path / "site-packages")  # ../shared beside an installed package is not looked at
    assert shared_dir() == packaged_dir()
    env = tmp_path / "mine"
    (env / "data" / "wikitext2").mkdir(parents=True)
    (env / "data" / "wikitext2" / "test.txt").write_text("from PYPRUNE_SHARED\n")
    monkeypatch.setenv("PYPRUNE_SHARED", str(env))
    fake_root(monkeypatch, tmp_path / "checkout")
    assert shared_dir() == str(env) and load_text("wikitext2") == "from PYPRUNE_SHARED\n"
    with pytest.raises(FileNotFoundError, match="valid.txt.* is missing"):  # no fallback from an explicit folder
        load_text("wikitext2", split="calib")


def test_errors_name_the_setting_and_the_file(monkeypatch, no_env, tmp_path):
    monkeypatch.setenv("PYPRUNE_SHARED", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="PYPRUNE_SHARED points to .*nowhere"):
        load_text("wikitext2")
    monkeypatch.delenv("PYPRUNE_SHARED")
    fake_root(monkeypatch, tmp_path / "site-packages")
    with pytest.raises(FileNotFoundError, match=r"'data/gutenberg/2701-0.txt' is not among the texts packaged.*"
                                                r"data/wikitext2/test.txt.*PYPRUNE_SHARED"):
        shared_file("data", "gutenberg", "2701-0.txt")
    with pytest.raises(FileNotFoundError, match="test.raw.txt' is not among the texts packaged"):
        load_text("wikitext2-raw")
    monkeypatch.setattr(data, "packaged_dir", lambda: str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match="texts packaged with pyprune are missing.*reinstall"):
        shared_dir()


def test_packaged_texts_are_only_the_defaults_with_their_licences():
    expected = {os.path.join("data", "wikitext2", f) for f in set(data._WIKITEXT_SPLITS.values())}
    expected |= {os.path.join("data", "gutenberg", f) for f in data._GUTENBERG_SPLITS.values()}
    assert set(packaged_files()) == expected
    notes = open(os.path.join(packaged_dir(), "README.md"), encoding="utf-8").read()
    for rel in expected:
        assert rel.replace(os.sep, "/") in notes, f"pyprune/shared/README.md does not describe {rel}"
    for needed in ("CC BY-SA 3.0", "https://creativecommons.org/licenses/by-sa/3.0/", "Merity", "public domain"):
        assert needed in notes
    for book in data._GUTENBERG_SPLITS.values():  # shipped whole: Project Gutenberg's licence is kept at the end
        text = open(os.path.join(packaged_dir(), "data", "gutenberg", book), encoding="utf-8").read()
        assert "*** END OF" in text and "Project Gutenberg" in text[text.index("*** END OF"):]


def test_code_cites_sections_the_maths_note_has():
    sections = set(re.findall(r"^## (\d+)\. ", open(DOC, encoding="utf-8").read(), flags=re.M))
    assert sections >= {"1", "2", "3", "4", "5", "6"}
    cited, stale = set(), []
    for top in ("pyprune", "triton_kernels", "csrc", "tests", "benchmarks", "README.md"):
        walk = [(ROOT, [], [top])] if top.endswith(".md") else os.walk(os.path.join(ROOT, top))
        for d, _, files in walk:
            for f in files:
                if not f.endswith((".py", ".md", ".cu", ".cuh", ".cpp", ".h")) or "results" in d.split(os.sep):
                    continue
                path = os.path.join(d, f)
                if os.path.abspath(path) == os.path.abspath(__file__):
                    continue
                text = open(path, encoding="utf-8").read()
                cited |= set(re.findall(r"ALGORITHM\.md(?:'s)?[^\n]{0,60}?section (\d+)", text))
                if "shared/design" in text or re.search(r"(?<!docs/)ALGORITHM\.md", text):
                    stale.append(os.path.relpath(path, ROOT))
    assert not stale, f"these cite ALGORITHM.md by another path than docs/ALGORITHM.md: {stale}"
    assert cited and cited <= sections, f"sections cited but missing from docs/ALGORITHM.md: {cited - sections}"
