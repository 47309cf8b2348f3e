"""The joint solve after exchange refinement (the contract of ``pyprune.ops.refine_solve``): the exchanges of
``swap.swap_refine`` on the block's starting mask, then the masked solve of the final set."""
from __future__ import annotations

import torch

from .masked_solve import masked_solve
from .swap import swap_refine_counted


def refine_solve(G: torch.Tensor, U_B: torch.Tensor, W1: torch.Tensor, mask: torch.Tensor, rounds: int, m: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E, loss, status, final mask, exchanges per row) in G's dtype; status as ``masked_solve``'s."""
    final, swaps = swap_refine_counted(W1, G, mask, rounds, m=m)
    E, loss, status = masked_solve(G, U_B, W1, final)
    return E, loss, status, final, swaps
