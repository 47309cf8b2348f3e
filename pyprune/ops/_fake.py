"""Fake (meta) implementations of the compiled ops, so they trace under torch.compile and FakeTensor."""
from __future__ import annotations

import torch

from ._backend import _native_loaded


def _register() -> None:
    if not _native_loaded():
        return
    ops = torch.ops.pyprune

    if hasattr(ops, "nm_select"):
        @torch.library.register_fake("pyprune::nm_select")
        def _nm_select_fake(W1, G, n, m, exact):
            return torch.empty(W1.shape, dtype=torch.bool, device=W1.device)

    if hasattr(ops, "masked_solve"):
        @torch.library.register_fake("pyprune::masked_solve")
        def _masked_solve_fake(G, U_B, W1, mask):  # E, loss, status (int32 per row)
            return (torch.empty(W1.shape, dtype=G.dtype, device=G.device),
                    torch.empty(W1.shape[0], dtype=G.dtype, device=G.device),
                    torch.empty(W1.shape[0], dtype=torch.int32, device=G.device))

    if hasattr(ops, "refine_solve"):
        @torch.library.register_fake("pyprune::refine_solve")
        def _refine_solve_fake(G, U_B, W1, mask, rounds, m, tol):  # E, loss, status, final mask, exchanges
            rows = W1.shape[0]
            return (torch.empty(W1.shape, dtype=G.dtype, device=G.device),
                    torch.empty(rows, dtype=G.dtype, device=G.device),
                    torch.empty(rows, dtype=torch.int32, device=G.device),
                    torch.empty(W1.shape, dtype=torch.bool, device=G.device),
                    torch.empty(rows, dtype=torch.int32, device=G.device))

    if hasattr(ops, "hessian_update"):
        @torch.library.register_fake("pyprune::hessian_update")
        def _hessian_update_fake(H, X, alpha, beta, allow_tf32):
            return None


_register()
