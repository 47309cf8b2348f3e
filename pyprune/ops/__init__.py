"""Thin wrappers over the kernels: validate arguments, pick a backend (native C++/CUDA | Triton | torch), call it.

Importing this package imports the compiled extension when it is there, which registers the ``torch.ops.pyprune``
ops and their fake (meta) implementations for ``torch.compile``.
"""
from . import _fake  # noqa: F401  (registers fake implementations of the compiled ops)
from .hessian import accumulate_hessian, hessian_update_
from .masked_solve import masked_solve
from .nm_select import nm_select
from .refine_solve import refine_solve

__all__ = ["accumulate_hessian", "hessian_update_", "masked_solve", "nm_select", "refine_solve"]
