"""pyprune: one-shot pruning of LLMs with the joint multi-weight OBS update (Zhao et al., EMNLP Findings 2024).

Layer API (pure functions on tensors)::

    from pyprune import PruneConfig, prune_layer
    result = prune_layer(W, H, PruneConfig(method="joint", sparsity="2:4", block_size=128))

Ops (Hessian accumulation, batched submatrix solve, N:M selection) live in ``pyprune.ops``.
"""
from .algorithms import PruneResult, prune_layer
from .config import PruneConfig, Sparsity

__version__ = "0.1.0"

__all__ = ["PruneConfig", "PruneResult", "Sparsity", "prune_layer", "__version__"]
