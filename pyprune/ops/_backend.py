"""Backend choice for the ops: the compiled extension (C++ on CPU tensors, CUDA on CUDA tensors), Triton, or plain
torch (the reference, or for the Hessian the library GEMM). Nothing here holds state beyond caching what is
importable."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")


@functools.lru_cache(maxsize=None)
def native_import_error() -> str | None:
    """None when the compiled extension ``pyprune._C`` imports, else the ImportError's message (not built in this
    install, or built against another torch)."""
    try:
        importlib.import_module("pyprune._C")
    except ImportError as e:
        return str(e) or type(e).__name__
    return None


def _native_loaded() -> bool:
    return native_import_error() is None


def no_native_message() -> str | None:
    """None when ``pyprune._C`` imports, else one paragraph for the user: what is missing, what it costs, the fix."""
    err = native_import_error()
    if err is None:
        return None
    why = ("it is not in this install: built without torch (PYPRUNE_PURE_PYTHON=1), or a source checkout never "
           "built" if "No module named" in err else f"it does not load: {err}")
    return (f"pyprune's compiled ops (pyprune._C) are not available ({why}). Every op runs its plain torch "
            "reference instead: the same method, but the joint method's exchanges take 20-40x longer per layer. "
            "Build them against the installed torch: pip install --no-build-isolation --force-reinstall --no-deps "
            "<pyprune source or sdist>")


def native_has(op: str, device: torch.device) -> bool:
    """True when the compiled extension registers ``pyprune::op`` for this device type."""
    if not _native_loaded():
        return False
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else None
    if key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"pyprune::{op}", key)
    except RuntimeError:
        return False


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if device.type not in ("cpu", "cuda"):
        return False
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def resolve(backend: str, op: str, device: torch.device, *, triton_op: bool = True, float64: bool = False,
            auto_cuda: str | None = None) -> str:
    """Turn ``backend`` into one of "torch" | "native" | "triton" for ``op`` on ``device``, or raise a clear error.

    The kernels compute in float32: float64 problems (``float64=True``) go to the torch path under "auto" and are
    refused by an explicit kernel backend. "auto" takes the compiled extension, except on CUDA tensors where the
    caller names the backend its measurements on an H200 found fastest (``auto_cuda``: "torch", i.e. plain torch
    library calls, or "triton"). A backend that is unknown, or unavailable for these tensors, is a ValueError naming
    the option (the same type for every backend)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if float64:
        if backend not in ("auto", "torch"):
            raise TypeError(f"backend={backend!r} computes {op} in float32; float64 inputs need backend='torch' "
                            "(or 'auto')")
        return "torch"
    if auto_cuda not in (None, "torch", "triton"):
        raise ValueError(f"auto_cuda must be None, 'torch' or 'triton', got {auto_cuda!r}")
    if backend == "auto":
        if device.type == "cuda" and auto_cuda == "torch":
            return "torch"
        if device.type == "cuda" and auto_cuda == "triton" and triton_op and triton_usable(device):
            return "triton"
        if native_has(op, device):
            return "native"
        if device.type == "cuda" and triton_op and triton_usable(device):
            return "triton"
        if device.type in ("cpu", "cuda") and native_import_error() is not None:
            warnings.warn(no_native_message(), RuntimeWarning, stacklevel=1)  # one place: shown once
        return "torch"
    if backend in ("cpp", "cuda"):
        want = "cpu" if backend == "cpp" else "cuda"
        if device.type != want:
            raise ValueError(f"backend={backend!r} needs {want} tensors, got {device.type} tensors")
        if not native_has(op, device):
            hint = ("was the package built with CUDA (PYPRUNE_CUDA=1)?" if want == "cuda" else
                    "was the package built (pip install --no-build-isolation -e .)?")
            raise ValueError(f"backend={backend!r}: the compiled extension pyprune._C has no {want} kernel for {op} "
                             f"({hint}); choose another backend or 'auto'")
        return "native"
    if backend == "triton":
        if not triton_op:
            raise ValueError(f"backend='triton': op {op} has no Triton implementation; choose another backend or "
                             "'auto'")
        if not triton_usable(device):
            why = ("triton is not installed" if device.type in ("cpu", "cuda") and importlib.util.find_spec("triton")
                   is None else f"it needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type} "
                   "tensors")
            raise ValueError(f"backend='triton' is not available: {why}; choose another backend or 'auto'")
        return "triton"
    return "torch"
