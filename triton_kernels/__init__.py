"""Triton implementations of pyprune's fused kernels, installed as ``pyprune.triton_kernels``.

One module per op, each holding its @triton.jit kernel(s), a ``torch.library`` op (namespace ``pyprune_triton``, with
a fake implementation for torch.compile) and the public launcher:

* ``hessian.hessian_update_triton(H, X, alpha, beta, *, allow_tf32=False)`` -> ``pyprune_triton::hessian_update``
* ``masked_solve.masked_solve_triton(G, U_B, W1, mask)`` -> ``pyprune_triton::masked_solve``
* ``nm_select.nm_select_triton(W1, G, n, m, *, exact=True)`` -> ``pyprune_triton::nm_select``
* ``refine_solve.refine_solve_triton(G, U_B, W1, mask, rounds, *, m=0, tol=1e-5)`` -> ``pyprune_triton::refine_solve``

The kernels run on CUDA tensors, and on CPU tensors in the Triton interpreter when ``TRITON_INTERPRET=1`` is set before
these modules are imported. Importing this package does not import triton; the launchers are loaded on first use.
"""
from __future__ import annotations

import importlib

_LAUNCHERS = {
    "hessian_update_triton": "hessian",
    "masked_solve_triton": "masked_solve",
    "nm_select_triton": "nm_select",
    "refine_solve_triton": "refine_solve",
}

__all__ = list(_LAUNCHERS)


def __getattr__(name: str):
    if name in _LAUNCHERS:
        return getattr(importlib.import_module(f".{_LAUNCHERS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
