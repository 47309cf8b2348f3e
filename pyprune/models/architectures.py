"""Attribute paths into a model. What a model *is* (its blocks, matrices and shared inputs) is observed by
``discover.py``; no table of model types is needed."""
from __future__ import annotations

from .discover import UnsupportedModelError

UnsupportedArchitectureError = UnsupportedModelError  # the name of earlier versions


def get_submodule(root, path: str):
    """``root.a.b.0.c`` for ``path='a.b.0.c'``, with a clear error when a name is missing."""
    obj = root
    for part in path.split("."):
        if not part:
            continue
        if part.isdigit() and not hasattr(obj, part):
            obj = obj[int(part)]
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            raise AttributeError(f"{type(root).__name__} has no attribute path {path!r} (missing {part!r})")
    return obj
