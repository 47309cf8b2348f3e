"""Model-level pruning: discovery of blocks and matrices, the sequential block driver, shard streaming, model I/O.

Importing this package does not import transformers; ``io`` and ``streaming`` import it when called.
"""
from .discover import UnsupportedModelError, find_blocks
from .driver import prune_model
from .streaming import prune_checkpoint

UnsupportedArchitectureError = UnsupportedModelError

__all__ = ["UnsupportedArchitectureError", "UnsupportedModelError", "find_blocks", "prune_checkpoint",
           "prune_model"]
