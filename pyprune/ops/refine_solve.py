"""The joint solve of a block after exchange refinement of its mask, one op: for every row, factor G[M, M] once,
make up to ``rounds`` exchanges of a pruned and a kept weight (each the one that lowers the row's exact block loss
the most, inside N:M groups when ``m`` > 0; the rule of ``pyprune.reference.swap``), and return the joint update,
the loss and the final mask from the same factor (csrc/kernels/refine_solve.cuh)."""
from __future__ import annotations

import torch

from .. import reference
from ..reference.swap import REL_TOL_LOW
from ._backend import native_has, resolve
from .masked_solve import check_masked_solve_args, check_status, masked_solve


def refine_solve(G: torch.Tensor, U_B: torch.Tensor, W1: torch.Tensor, mask: torch.Tensor, rounds: int, *,
                 m: int = 0, backend: str = "auto", check_values: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (E, loss, final mask, exchanges per row (int32)). G, U_B, W1, mask as ``masked_solve``'s; ``mask`` is
    the starting mask; ``rounds`` >= 0 bounds the exchanges per row; ``m`` > 0 keeps them inside groups of ``m``
    consecutive columns (N:M: the count per group never changes). ``rounds=0`` is ``masked_solve`` itself (the same
    op, bit for bit).

    Backends: "cpp" / "cuda" (the fused engine), "triton" (the same rule as a Triton kernel,
    triton_kernels/refine_solve.py), "torch" (the reference: ``reference.swap`` then the padded solve); "auto" takes
    the fused engine where it is built (on the CPU: with AVX2 and FMA), else on CUDA tensors the Triton engine, else
    torch. float64 inputs take the torch path.
    Raises the masked solve's ValueError for a row whose G[M, M] is not positive definite. ``check_values``: as
    ``masked_solve``'s."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"m (the N:M group size, 0 for none) must be an integer >= 0, got {m!r}")
    if rounds == 0:
        E, loss = masked_solve(G, U_B, W1, mask, backend=backend, check_values=check_values)
        return E, loss, mask, torch.zeros(W1.shape[0] if W1.dim() == 2 else 0, dtype=torch.int32,
                                          device=W1.device)
    check_masked_solve_args(G, U_B, W1, mask, values=check_values)
    if m and W1.shape[1] % m:
        raise ValueError(f"m={m} does not divide the block's {W1.shape[1]} columns")
    float64 = G.dtype == torch.float64 or W1.dtype == torch.float64
    which = resolve(backend, "refine_solve", G.device, float64=float64)
    if which == "native" and G.device.type == "cpu" and backend == "auto" and not cpu_engine_supported():
        which = "torch"
    if which == "native":
        E, loss, status, final, swaps = torch.ops.pyprune.refine_solve(
            G.contiguous(), U_B.contiguous(), W1.contiguous(), mask.contiguous(), rounds, m, REL_TOL_LOW)
        check_status(status, final)
        return E, loss, final, swaps
    if which == "triton":
        from ..triton_kernels.refine_solve import refine_solve_triton
        E, loss, status, final, swaps = refine_solve_triton(G.contiguous(), U_B.contiguous(), W1.contiguous(),
                                                            mask.contiguous(), rounds, m=m, tol=REL_TOL_LOW)
        check_status(status, final)
        return E, loss, final, swaps
    final, swaps = reference.swap.swap_refine_counted(W1, G, mask, rounds, m=m)
    E, loss, status = reference.masked_solve(G, U_B, W1, final)
    check_status(status, final)
    return E, loss, final, swaps


def cpu_engine_supported() -> bool:
    """True when the compiled CPU engine is built and this processor runs it (AVX2 and FMA on x86-64)."""
    return native_has("refine_solve", torch.device("cpu")) and bool(torch.ops.pyprune._refine_solve_cpu_supported())
