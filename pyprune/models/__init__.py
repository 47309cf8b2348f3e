"""Model-level pruning: the architecture table, the sequential block driver, shard streaming, model I/O.

Importing this package does not import transformers; ``io`` and ``streaming`` import it when called.
"""
from .architectures import ARCHITECTURES, Architecture, Group, UnsupportedArchitectureError, architecture_for
from .driver import prune_model
from .streaming import prune_checkpoint

__all__ = ["ARCHITECTURES", "Architecture", "Group", "UnsupportedArchitectureError", "architecture_for",
           "prune_checkpoint", "prune_model"]
