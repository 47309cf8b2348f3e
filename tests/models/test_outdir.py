"""Issue 11, "never destroy, never mislead": pyprune never deletes or replaces a file it did not write, never writes
where its input lives, replaces an earlier output of its own only when asked and then only the files its manifest
lists, and leaves nothing a later run could take for a finished model when it is killed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from pyprune.models.io import prepare_output_dir, save_model
from pyprune.models.outdir import JOURNAL_NAME, MANIFEST_NAME, OutputDir, check_output_vs_input, output_state

from .tiny import byte_tokenizer, dir_hash, save_tiny_dir, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def manifest(path) -> dict:
    return json.load(open(os.path.join(path, MANIFEST_NAME)))


def snapshot(path) -> dict:
    """Every file under ``path`` with its bytes."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def write_files(od: OutputDir, contents: dict) -> None:
    """A fake writer: each file through the claim + atomic write the streamed writer uses."""
    for name, data in contents.items():
        with od.open(name) as f:
            f.write(data)


def fake_output(path, contents: dict) -> str:
    od = OutputDir(path)
    od.prepare()
    write_files(od, contents)
    od.finish()
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama in memory and on disk (an HF directory with a tokenizer)."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    model = tiny_model("llama", g, layers=1)
    src = save_tiny_dir(model, str(tmp_path_factory.mktemp("outdir") / "src"))
    return model, src


# ------------------------------------------------------------------------------------------- input vs output
def test_output_never_where_the_input_lives(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    gguf = models / "model.gguf"
    gguf.write_bytes(b"GGUF")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    refused = [(models, gguf), (tmp_path, gguf), (gguf, gguf),                    # the .gguf's directory, above it
               (hf, hf), (hf / "sub", hf), (tmp_path, hf)]                         # the HF directory, in, above
    for out, inp in refused:
        with pytest.raises(ValueError, match="never writes where its input lives") as e:
            check_output_vs_input(str(out), str(inp))
        assert str(out) in str(e.value) and str(inp) in str(e.value)
    for out, inp in [(models / "pruned", gguf), (tmp_path / "pruned", gguf), (tmp_path / "pruned", hf)]:
        check_output_vs_input(str(out), str(inp))  # beside or below a .gguf file is fine

    # Symbolic links are resolved on either side.
    link_dir = tmp_path / "link-to-hf"
    link_dir.symlink_to(hf, target_is_directory=True)
    link_gguf = tmp_path / "elsewhere.gguf"
    link_gguf.symlink_to(gguf)
    for out, inp in [(hf, link_dir), (link_dir, hf), (link_dir / "sub", hf), (models, link_gguf)]:
        with pytest.raises(ValueError, match="never writes where its input lives"):
            check_output_vs_input(str(out), str(inp))
    with pytest.raises(ValueError, match="never writes where"):
        prepare_output_dir(str(models), overwrite=True, input_path=str(gguf))
    # A .gguf that is a link into another directory: refused where the link is, too.
    (tmp_path / "gguf-links").mkdir()
    (tmp_path / "gguf-links" / "m.gguf").symlink_to(gguf)
    with pytest.raises(ValueError, match="holds the input file"):
        check_output_vs_input(str(tmp_path / "gguf-links"), str(tmp_path / "gguf-links" / "m.gguf"))


def test_cli_never_writes_over_its_input(tiny, tmp_path, capsys):
    """`pyprune prune DIR/model.gguf -o DIR --overwrite` deleted the input .gguf; an input given through a link with
    the real directory as -o ... --overwrite was replaced, even when that directory is an earlier pyprune output."""
    from pyprune.cli import EXIT_BAD_INPUT, main
    model, _ = tiny
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    (gguf_dir / "model.gguf").write_bytes(b"GGUF weights")
    real = save_model(model, str(tmp_path / "real"), tokenizer=byte_tokenizer())  # an earlier pyprune output
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    before = snapshot(real)
    common = ["--calib-text", str(text), "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--overwrite", "-q"]
    for model_arg, out in [(gguf_dir / "model.gguf", gguf_dir), (link, real)]:
        rc = main(["prune", str(model_arg), "--output", str(out), *common])
        err = capsys.readouterr().err
        assert rc == EXIT_BAD_INPUT, err
        assert "never writes where its input lives" in err or "not empty" in err, err
    assert (gguf_dir / "model.gguf").read_bytes() == b"GGUF weights" and os.listdir(gguf_dir) == ["model.gguf"]
    assert snapshot(real) == before


def test_save_model_refuses_the_input_directory(tiny, tmp_path):
    """`pyprune prune DIR/model.gguf -o DIR --overwrite` deleted the input; an HF input the same."""
    model, src = tiny
    before = dir_hash(src)
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(src)
    with pytest.raises(ValueError, match="is the input directory"):
        save_model(loaded, src, overwrite=True)
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    with pytest.raises(ValueError, match="is the input directory"):
        save_model(loaded, str(link), overwrite=True)
    assert dir_hash(src) == before

    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    (gguf_dir / "model.gguf").write_bytes(b"GGUF weights")
    model.config._name_or_path = str(gguf_dir)  # what from_pretrained(dir, gguf_file=...) records
    try:
        with pytest.raises(ValueError, match="holds the input file"):
            save_model(model, str(gguf_dir), overwrite=True)
    finally:
        model.config._name_or_path = ""
    assert (gguf_dir / "model.gguf").read_bytes() == b"GGUF weights"
    assert os.listdir(gguf_dir) == ["model.gguf"]


# ---------------------------------------------------------------------------------------------- save_model
def test_save_model_writes_tokenizer_and_manifest(tiny, tmp_path):
    model, _ = tiny
    out = save_model(model, str(tmp_path / "a" / "out"), tokenizer=byte_tokenizer())
    assert out == os.path.realpath(tmp_path / "a" / "out") and out.removed == ()
    listed = manifest(out)["files"]
    assert sorted(out.files) == listed
    assert set(os.listdir(out)) == set(listed) | {MANIFEST_NAME}
    assert {"config.json", "model.safetensors"} | TOKENIZER_FILES <= set(listed)
    assert output_state(out) == "finished"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("hi")["input_ids"] == byte_tokenizer()("hi")["input_ids"]
    again = AutoModelForCausalLM.from_pretrained(out)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_save_model_into_earlier_output_keeps_other_files(tiny, tmp_path):
    """A normal prune into an earlier output deleted every other file (a user's my_eval.json); --overwrite deleted
    unrelated files and folders too."""
    model, _ = tiny
    out = str(tmp_path / "out")
    save_model(model, out, tokenizer=byte_tokenizer())
    (tmp_path / "out" / "my_eval.json").write_text('{"ppl": 12.3}')
    (tmp_path / "out" / "notes").mkdir()
    (tmp_path / "out" / "notes" / "runs.txt").write_text("run 1")
    before = snapshot(out)
    with pytest.raises(FileExistsError, match="earlier pyprune output.*overwrite"):
        save_model(model, out)
    with pytest.raises(FileExistsError, match="earlier pyprune output"):
        prepare_output_dir(out)
    assert snapshot(out) == before

    assert prepare_output_dir(out, overwrite=True) == manifest(out)["files"]
    saved = save_model(model, out, overwrite=True)  # no tokenizer this time: the old tokenizer files go
    assert set(saved.removed) >= TOKENIZER_FILES and not set(saved.removed) & set(saved.files)
    after = snapshot(out)
    assert after["my_eval.json"] == before["my_eval.json"]
    assert after[os.path.join("notes", "runs.txt")] == before[os.path.join("notes", "runs.txt")]
    assert not TOKENIZER_FILES & set(after)
    assert manifest(out)["files"] == sorted(saved.files) and manifest(out)["removed"] == list(saved.removed)
    assert output_state(out) == "finished"


def test_foreign_files_are_never_replaced(tiny, tmp_path):
    model, _ = tiny
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"not empty.*precious\.txt"):
            save_model(model, str(busy), overwrite=overwrite)
    assert os.listdir(busy) == ["precious.txt"]

    legacy = tmp_path / "legacy"  # an output of a pyprune without the manifest
    legacy.mkdir()
    for name in ("config.json", "model.safetensors", "pyprune_report.json"):
        (legacy / name).write_text("old")
    with pytest.raises(FileExistsError, match="older than the manifest"):
        save_model(model, str(legacy), overwrite=True)

    # Beside an earlier output, a model file pyprune did not write would mix with the new output: refused.
    out = str(tmp_path / "out")
    save_model(model, out)
    (tmp_path / "out" / "extra.safetensors").write_bytes(b"mine")
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=r"model files pyprune did not write \(extra\.safetensors\)"):
        save_model(model, out, overwrite=True)
    assert snapshot(out) == before
    with pytest.raises(FileExistsError, match="is not a directory"):
        save_model(model, str(tmp_path / "busy" / "precious.txt"))


def test_failed_save_leaves_the_earlier_output_intact(tiny, tmp_path):
    model, _ = tiny
    out = str(tmp_path / "out")
    save_model(model, out, tokenizer=byte_tokenizer())
    before = snapshot(out)

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_model(model, out, tokenizer=Broken(), overwrite=True)
    assert snapshot(out) == before and output_state(out) == "finished"
    with pytest.raises(OSError, match="disk full"):
        save_model(model, str(tmp_path / "new"), tokenizer=Broken())
    assert not os.path.exists(tmp_path / "new")  # nothing written: not even the directory


KILL_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from pyprune.models import io, outdir
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    model.config._name_or_path = ""
    outdir.OutputDir.finish = lambda self: os.kill(os.getpid(), signal.SIGKILL)
    io.save_model(model, sys.argv[2], overwrite=True)
""")


def test_killed_save_is_unfinished_and_cleaned_by_the_next_run(tiny, tmp_path):
    """SIGKILL during a save left a complete, loadable OUT.tmp-PID/ that reruns never removed."""
    model, src = tiny
    out = tmp_path / "out"
    save_model(model, str(out), tokenizer=byte_tokenizer())  # an earlier output, then a save killed before finish
    proc = subprocess.run([sys.executable, "-c", KILL_SAVE, src, str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert output_state(out) == "unfinished"
    assert MANIFEST_NAME not in os.listdir(out) and JOURNAL_NAME in os.listdir(out)
    # Leftovers of dead processes: a temporary directory inside, an old version's sibling OUT.tmp-<pid>.
    pid = dead_pid()
    (out / f".pyprune-tmp-{pid}-abc").mkdir()
    (out / f".pyprune-tmp-{pid}-abc" / "model.safetensors").write_bytes(b"half")
    legacy = tmp_path / f"out.tmp-{pid}"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    (legacy / "model.safetensors").write_bytes(b"complete")
    not_ours = tmp_path / f"out.old-{pid}"  # holds a file no pyprune version wrote: kept
    not_ours.mkdir()
    (not_ours / "notes.txt").write_text("mine")

    saved = save_model(model, str(out))  # no overwrite needed: an interrupted save is nothing to keep
    assert f".pyprune-tmp-{pid}-abc/" in saved.removed and f"../out.tmp-{pid}/" in saved.removed
    assert set(saved.removed) >= TOKENIZER_FILES  # the earlier output's files this save did not rewrite
    assert not legacy.exists() and (not_ours / "notes.txt").read_text() == "mine"
    assert output_state(out) == "finished"
    assert set(os.listdir(out)) == set(saved.files) | {MANIFEST_NAME}


# ------------------------------------------------------------------------------------- OutputDir (streaming)
def test_streamed_output_replaces_every_stale_weight_file(tiny, tmp_path):
    """A streamed run into an earlier output left the old model.safetensors beside the new shards, and load_model
    loaded it: the report said 2:4, the weights were the earlier 50% run."""
    from safetensors.torch import save as st_bytes

    from pyprune.models.io import load_model
    model, src = tiny
    out = str(tmp_path / "out")
    save_model(model, out, tokenizer=byte_tokenizer())
    (tmp_path / "out" / "my_eval.json").write_text("{}")
    new = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    keys = sorted(new)
    shards = {"model-block-00000.safetensors": keys[: len(keys) // 2],
              "model-nonblock.safetensors": keys[len(keys) // 2:]}

    with pytest.raises(FileExistsError, match="earlier pyprune output"):
        OutputDir(out, input_path=src).prepare()
    od = OutputDir(out, input_path=src)
    replaced = od.prepare(overwrite=True)
    assert "model.safetensors" in replaced and "config.json" in replaced
    assert output_state(out) == "unfinished"  # from the first write on, never mistaken for a finished model
    index = {"metadata": {}, "weight_map": {k: shard for shard, ks in shards.items() for k in ks}}
    files = {shard: st_bytes({k: new[k].contiguous() for k in ks}, metadata={"format": "pt"})
             for shard, ks in shards.items()}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    files["config.json"] = open(os.path.join(src, "config.json"), "rb").read()
    write_files(od, files)
    removed = od.finish()
    assert "model.safetensors" in removed and set(removed) >= TOKENIZER_FILES
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    assert os.path.exists(os.path.join(out, "my_eval.json"))
    assert manifest(out)["files"] == sorted(files) and output_state(out) == "finished"
    loaded = load_model(out)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, new[k]), k


def test_claim_rules(tmp_path):
    out = tmp_path / "out"
    fake_output(out, {"a.bin": b"1", "sub/b.json": b"2"})
    assert manifest(out)["files"] == ["a.bin", "sub/b.json"]
    (out / "user.txt").write_text("mine")
    od = OutputDir(out)
    assert od.prepare(overwrite=True) == ["a.bin", "sub/b.json"]
    for bad in ("../x", "/etc/passwd", "", "a/../b", MANIFEST_NAME, JOURNAL_NAME, ".pyprune-tmp-1-x"):
        with pytest.raises(ValueError):
            od.claim(bad)
    with pytest.raises(FileExistsError, match="not written by pyprune"):
        od.claim("user.txt")
    (tmp_path / "outside").mkdir()
    (out / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(ValueError, match="outside the output directory"):
        od.claim("link/x.bin")
    with pytest.raises(RuntimeError):
        with od.open("c.bin") as f:  # an error inside the block: nothing appears, no temporary stays
            f.write(b"half")
            raise RuntimeError("killed")
    assert not (out / "c.bin").exists() and not [n for n in os.listdir(out) if n.startswith(".pyprune-tmp")]
    with od.open("state/acts.bin") as f:
        f.write(b"x")
    od.discard("state/acts.bin")
    with pytest.raises(ValueError, match="not claimed"):
        od.discard("user.txt")
    assert not (out / "state").exists()
    write_files(od, {"a.bin": b"new"})
    assert od.finish() == ["sub/b.json"]
    assert sorted(os.listdir(out)) == ["a.bin", "link", MANIFEST_NAME, "user.txt"]
    assert (out / "a.bin").read_bytes() == b"new" and (out / "user.txt").read_text() == "mine"
    with pytest.raises(RuntimeError, match="finished"):
        od.claim("d.bin")
    with pytest.raises(RuntimeError, match="prepare"):
        OutputDir(tmp_path / "other").claim("x")


KILL_STREAM = textwrap.dedent("""
    import os, signal, sys
    from pyprune.models.outdir import OutputDir
    od = OutputDir(sys.argv[1])
    od.prepare(overwrite=True, resume=sys.argv[2] == "1")
    with od.open("model-block-00000.safetensors") as f:
        f.write(b"block 0")
    with od.open("model-block-00001.safetensors") as f:
        f.write(b"half of block 1")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("resumable", [True, False])
def test_killed_streamed_run(resumable, tmp_path):
    out = tmp_path / "out"
    fake_output(out, {"model.safetensors": b"earlier 50% run", "config.json": b"{}"})
    proc = subprocess.run([sys.executable, "-c", KILL_STREAM, str(out), "1" if resumable else "0"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert output_state(out) == "unfinished" and MANIFEST_NAME not in os.listdir(out)
    temps = [n for n in os.listdir(out) if n.startswith(".pyprune-tmp-")]
    assert len(temps) == 1 and not (out / "model-block-00001.safetensors").exists()
    before = snapshot(out)
    if resumable:
        with pytest.raises(FileExistsError, match="resumable"):
            OutputDir(out).prepare()  # a resumable run is worth keeping: replacing it needs overwrite
        assert snapshot(out) == before
        od = OutputDir(out)
        assert od.prepare(resume=True) == ["config.json", "model.safetensors"]
        assert od.files == ["model-block-00000.safetensors", "model-block-00001.safetensors"]
        write_files(od, {"model-block-00001.safetensors": b"block 1", "config.json": b"{}"})
        assert od.finish() == [temps[0], "model.safetensors"]
        assert manifest(out)["files"] == ["config.json", "model-block-00000.safetensors",
                                          "model-block-00001.safetensors"]
    else:
        od = OutputDir(out)
        assert od.prepare() == ["config.json", "model-block-00000.safetensors", "model.safetensors"]
        write_files(od, {"model-block-00000.safetensors": b"new block 0"})
        assert od.finish() == [temps[0], "config.json", "model.safetensors"]
        assert sorted(os.listdir(out)) == ["model-block-00000.safetensors", MANIFEST_NAME]
    assert output_state(out) == "finished"


def test_a_live_writer_is_not_disturbed(tmp_path):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.makedirs(out)
        (out / JOURNAL_NAME).write_text(json.dumps({"pid": sleeper.pid, "resumable": False, "replacing": [],
                                                    "written": ["model.safetensors"]}))
        (out / f".pyprune-tmp-{sleeper.pid}-x").write_bytes(b"being written")
        with pytest.raises(FileExistsError, match=f"another pyprune process \\(pid {sleeper.pid}\\)"):
            OutputDir(out).prepare(overwrite=True)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert (out / f".pyprune-tmp-{sleeper.pid}-x").exists()
    od = OutputDir(out)
    od.prepare()
    assert od.finish() == [f".pyprune-tmp-{sleeper.pid}-x"]
    assert os.listdir(out) == [MANIFEST_NAME]


def test_output_state_and_bad_manifest(tmp_path):
    assert output_state(tmp_path / "none") == "missing"
    assert output_state(tmp_path) == "empty"
    (tmp_path / f".pyprune-tmp-{dead_pid()}").mkdir()
    assert output_state(tmp_path) == "empty"
    (tmp_path / "x.txt").write_text("x")
    assert output_state(tmp_path) == "other"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"files": ["../../etc/passwd"]}))
    assert output_state(tmp_path) == "finished"
    with pytest.raises(ValueError, match="not a valid pyprune manifest"):
        OutputDir(tmp_path).prepare(overwrite=True)
