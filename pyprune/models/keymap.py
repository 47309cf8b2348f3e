"""Checkpoint keys <-> model names for a streamed run: usually identical; checkpoints saved from the base model lack
its prefix; and where transformers converts a checkpoint layout when it loads one (per-expert tensors fused into 3-D
experts, renamed modules), its own conversion and its reverse are applied one block at a time."""
from __future__ import annotations

import re
from typing import Iterable

import torch

from .io import quiet_transformers


def _set_tensor(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    path, _, attr = name.rpartition(".")
    module = root.get_submodule(path) if path else root
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(name)


def _prefix_change_applies(m, keys: list[str]) -> bool:
    """Whether transformers' mapping entry ``m`` applies to a checkpoint with ``keys``: every entry but a
    ``PrefixChange``, which only where it removes a prefix that the checkpoint's keys carry (Qwen 3.5's multimodal
    ``model.language_model.layers...`` read by its text model); one that adds a prefix would match every key."""
    if type(m).__name__ != "PrefixChange":
        return True
    if getattr(m, "prefix_to_remove", None) is None:
        return False
    patterns = [re.compile(p) for p in m.source_patterns]
    return any(p.match(k) for p in patterns for k in keys)


class KeyMap:
    """Checkpoint keys <-> model names. Usually identical; checkpoints saved from the base model lack its prefix; and
    where transformers converts a checkpoint layout when it loads one (per-expert tensors fused into 3-D experts,
    renamed modules), ``load`` and ``save_form`` apply its own conversion and its reverse, one block at a time."""

    def __init__(self, model, blocks_path: str, keys: Iterable[str]):
        keys = list(keys)
        self.model = model
        from transformers.conversion_mapping import get_model_conversion_mapping
        try:
            self.mapping = [m for m in (get_model_conversion_mapping(model, add_legacy=True) or [])
                            if _prefix_change_applies(m, keys)]
        except Exception:  # noqa: BLE001 - models without a mapping
            self.mapping = []
        names = set(model.state_dict().keys())
        base = getattr(model, "base_model_prefix", "") or ""
        self.prefix = ""
        if base and not any(k in names for k in keys) and any(f"{base}.{k}" in names for k in keys):
            self.prefix = base + "."
        self.to_model = {}
        for k in keys:
            n = self.prefix + k
            if n in names:
                self.to_model[k] = n
        self.converts = bool(self.mapping) and any(k not in self.to_model for k in keys)
        rename = self._renamer(names, base) if self.converts else (lambda k: self.prefix + k)
        block_prefix = blocks_path + "."
        self.block_keys: dict[int, list[str]] = {}
        self.other_keys: list[str] = []
        for k in keys:
            n = rename(k)  # the model's name of a checkpoint key (renamed modules: NemotronH's backbone -> model)
            if n.startswith(block_prefix):
                idx = n[len(block_prefix):].split(".", 1)[0]
                if idx.isdigit():
                    self.block_keys.setdefault(int(idx), []).append(k)
                    continue
            self.other_keys.append(k)

    def _renamer(self, names: set[str], base: str):
        """A checkpoint key -> the model's name for it, by transformers' own renaming rules."""
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        renamings = [m for m in self.mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        meta = dict.fromkeys(names, True)
        return lambda k: rename_source_key(k, renamings, converters, base or None, meta)[0]

    def load(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Put checkpoint tensors into the (meta) model; returns those the model has no place for (written back
        as they were)."""
        if not self.converts:
            raw = {}
            for k, v in tensors.items():
                if k in self.to_model:
                    _set_tensor(self.model, self.to_model[k], v)
                else:
                    raw[k] = v
            return raw
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        with quiet_transformers():
            convert_and_load_state_dict_in_model(model=self.model, state_dict=dict(tensors),
                                                 load_config=LoadStateDictConfig(weight_mapping=self.mapping))
        return {}

    def save_form(self, state: dict[str, torch.Tensor], keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Model-named tensors -> checkpoint-named ones (the layout of the input checkpoint), ``keys`` the checkpoint's
        names for them. transformers' reverse conversion writes the layout its own class saves: where the model is
        part of the checkpoint's (a multimodal checkpoint's ``language_model.model.layers...``, pruned through its
        text model), a name it gives that is the end of exactly one of ``keys`` takes that key."""
        if not self.converts:
            back = {v: k for k, v in self.to_model.items()}
            return {back.get(k, k): v for k, v in state.items()}
        from transformers.core_model_loading import revert_weight_conversion
        out = dict(revert_weight_conversion(self.model, state))
        keys = set(keys)
        missing = [k for k in keys if k not in out]
        if not missing:
            return out
        moved = {}
        for name in [n for n in out if n not in keys]:
            hits = [k for k in missing if k.endswith("." + name)]
            if len(hits) == 1:
                moved[hits[0]] = out.pop(name)
        out.update(moved)
        return out
