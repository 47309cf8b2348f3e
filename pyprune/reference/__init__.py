"""Plain-torch oracles for every contract in docs/ALGORITHM.md.

Each function here is the simplest correct statement of one kernel's contract; Triton and CUDA kernels are tested
against them. This package imports nothing else from pyprune, so the oracle stays independent of the code it checks.
"""
from .hessian import accumulate_hessian, hessian_update
from .masked_solve import masked_solve
from .nm_select import nm_select, nm_subsets
from .refine_solve import refine_solve
from .swap import swap_refine

__all__ = ["accumulate_hessian", "hessian_update", "masked_solve", "nm_select", "nm_subsets", "refine_solve",
           "swap_refine"]
