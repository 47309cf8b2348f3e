"""N:M mask selection: per row and group of M columns, the N weights to prune."""
from __future__ import annotations

import torch

from .. import reference
from ._backend import resolve
from ._checks import check_matrix, check_same_device, check_symmetric


def nm_select(W1: torch.Tensor, G: torch.Tensor, n: int, m: int, *, exact: bool = True,
              backend: str = "auto", check_values: bool = True) -> torch.Tensor:
    """Bool mask (rows, B), True = prune, exactly ``n`` per group of ``m`` consecutive columns of every row.

    exact=True: best subset by ``1/2 w_S^T G[S,S]^{-1} w_S`` (G's diagonal m x m blocks); exact=False: the n
    smallest ``w_j^2 / G_jj``. Pass a diagonal G to select by any per-column saliency denominator. G must be
    symmetric within rounding (checked: the kernels read one triangle of each group's block). ``check_values=False``
    skips the checks that read every value (finite entries, G's symmetry), as ``masked_solve``'s.
    """
    check_matrix("W1", W1, finite=check_values)
    B = W1.shape[1]
    check_matrix("G", G, dtypes=(torch.float32, torch.float64), shape=(B, B), finite=check_values)
    if check_values:
        check_symmetric("G", G)
    check_same_device(W1=W1, G=G)
    if not (isinstance(n, int) and isinstance(m, int) and not isinstance(n, bool) and not isinstance(m, bool)
            and 0 < n < m):
        raise ValueError(f"N:M needs integers 0 < N < M, got {n}:{m}")
    if m > 16:
        raise ValueError(f"M={m} is too large for best-subset enumeration (at most 16)")
    if B % m:
        raise ValueError(f"the block has {B} columns, not a multiple of M={m}")
    which = resolve(backend, "nm_select", W1.device, float64=W1.dtype == torch.float64)
    if which == "native":
        return torch.ops.pyprune.nm_select(W1.contiguous(), G.to(torch.float32).contiguous(), n, m, bool(exact))
    if which == "triton":
        from ..triton_kernels.nm_select import nm_select_triton
        return nm_select_triton(W1.contiguous(), G.to(torch.float32).contiguous(), n, m, exact=bool(exact))
    return reference.nm_select(W1, G, n, m, exact=exact)
