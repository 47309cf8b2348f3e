"""pyprune: one-shot pruning of LLMs with the joint multi-weight OBS update (Zhao et al., EMNLP Findings 2024).

Layer API (pure functions on tensors)::

    from pyprune import PruneConfig, prune_layer
    result = prune_layer(W, H, PruneConfig(method="joint", sparsity="2:4", block_size=128))
    q, k, v = prune_group([Wq, Wk, Wv], H, config)   # modules reading one input: one setup for all

Ops (Hessian accumulation, batched submatrix solve, N:M selection) live in ``pyprune.ops``.

Model API (imported lazily, so ``import pyprune`` stays light)::

    report = pyprune.prune_model(model, calibration_ids, PruneConfig(method="joint", sparsity=0.5))
    report = pyprune.prune_checkpoint(src_dir, out_dir, calibration_ids, config)   # streamed from shards
    report = pyprune.prune_pretrained(path, out_dir, calibration_ids, config)    # either, chosen by size (the CLI)
    print(pyprune.inspect_model(model).table())    # blocks, matrices, shared-Hessian groups, what stays dense

Any decoder-only ``*ForCausalLM`` that transformers builds works: blocks, matrices (linear layers, fused MoE experts)
and shared inputs are observed from the model's own forward pass (``pyprune.models.discover``).

2:4 at inference speed (``pyprune.sparse24``)::

    print(pyprune.check_2to4(model).table())           # which Linear weights hold 2:4 (any device)
    model = pyprune.to_semi_structured(model.cuda())   # their weights as torch semi-structured sparse tensors
"""
from .algorithms import PruneResult, prune_group, prune_layer
from .config import PruneConfig, Sparsity

__version__ = "0.1.0"

_LAZY = {"prune_model": "pyprune.models.driver", "prune_checkpoint": "pyprune.models.streaming",
         "PruneReport": "pyprune.report", "LayerReport": "pyprune.report", "load_model": "pyprune.models.io",
         "save_model": "pyprune.models.io", "perplexity": "pyprune.evaluate",
         "prune_pretrained": "pyprune.models.pipeline", "inspect_model": "pyprune.models.pipeline",
         "matrix_views": "pyprune.models.pipeline", "check_2to4": "pyprune.sparse24",
         "to_semi_structured": "pyprune.sparse24"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pyprune' has no attribute {name!r}")


__all__ = ["LayerReport", "PruneConfig", "PruneReport", "PruneResult", "Sparsity", "__version__", "check_2to4",
           "inspect_model", "load_model", "matrix_views", "perplexity", "prune_checkpoint", "prune_group",
           "prune_layer", "prune_model", "prune_pretrained", "save_model", "to_semi_structured"]
