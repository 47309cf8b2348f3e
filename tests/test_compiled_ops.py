"""When the compiled ops are missing, the user is told: the build refuses to install without torch (a plain
``pip install .`` builds in isolation, without torch, and would have installed a pyprune whose every op runs its torch
reference), backend "auto" warns once when it falls back for that reason, and ``pyprune prune`` / ``demo`` say so
before any slow work."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from pyprune import PruneConfig
from pyprune.cli import _note_compiled_ops
from pyprune.ops import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def _setup_py(env_extra: dict) -> subprocess.CompletedProcess:
    """setup.py --name in a Python where `import torch` fails (as in pip's isolated build environment)."""
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__name__': '__main__', '__file__': "
            "'setup.py'})")
    env = {k: v for k, v in os.environ.items() if k != "PYPRUNE_PURE_PYTHON"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**env, **env_extra})


def test_build_without_torch_refuses_with_the_fix():
    proc = _setup_py({})
    assert proc.returncode != 0
    assert "--no-build-isolation" in proc.stderr and "PYPRUNE_PURE_PYTHON=1" in proc.stderr, proc.stderr[-2000:]


def test_build_without_torch_on_purpose():
    proc = _setup_py({"PYPRUNE_PURE_PYTHON": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "pyprune"


@pytest.mark.parametrize("err,why", [("No module named 'pyprune._C'", "not in this install"),
                                     ("/x/_C.so: undefined symbol: _ZN3c104cuda9SetDevice", "undefined symbol")])
def test_auto_warns_when_the_extension_is_missing(monkeypatch, err, why):
    monkeypatch.setattr(_backend, "native_import_error", lambda: err)
    with pytest.warns(RuntimeWarning, match=r"pyprune\._C\) are not available") as rec:
        assert _backend.resolve("auto", "refine_solve", CPU) == "torch"
    msg = str(rec[0].message)
    assert why in msg and "--no-build-isolation" in msg
    # an explicit choice is an error naming the fix, not a warning
    with pytest.raises(ValueError, match="no-build-isolation"):
        _backend.resolve("cpp", "refine_solve", CPU)
    # float64 problems take the torch path by design: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve("auto", "refine_solve", CPU, float64=True) == "torch"


def test_no_warning_with_the_extension(monkeypatch):
    monkeypatch.setattr(_backend, "native_import_error", lambda: None)
    monkeypatch.setattr(_backend, "native_has", lambda op, device: op != "hessian_update")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve("auto", "refine_solve", CPU) == "native"
        assert _backend.resolve("auto", "hessian_update", CPU) == "torch"  # no CPU kernel for it: not a missing build
    assert _backend.no_native_message() is None


def test_cli_says_so_before_slow_work(monkeypatch, capsys):
    monkeypatch.setattr(_backend, "native_import_error", lambda: "No module named 'pyprune._C'")
    with warnings.catch_warnings():
        _note_compiled_ops(PruneConfig(backend="auto"))
        err = capsys.readouterr().err
        assert err.startswith("pyprune: note: pyprune's compiled ops") and "--no-build-isolation" in err
        with warnings.catch_warnings(record=True) as rec:  # the library's warning is not repeated after the note
            warnings.simplefilter("default")
            _note_compiled_ops(PruneConfig(backend="auto"))
            capsys.readouterr()
            _backend.resolve("auto", "masked_solve", CPU)
        assert not [w for w in rec if "compiled ops" in str(w.message)]
    _note_compiled_ops(PruneConfig(backend="torch"))  # asked for torch: nothing to say
    assert capsys.readouterr().err == ""
