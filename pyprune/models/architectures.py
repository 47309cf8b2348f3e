"""Architectures as data: where a model keeps its decoder blocks, which linear modules of a block are pruned, which
of them read the same input (and so share one Hessian), and which modules stay dense unless asked.

Adding an architecture is adding a row to ``ARCHITECTURES``; the driver (``driver.py``) is one loop over this data.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class UnsupportedArchitectureError(ValueError):
    """The model's ``model_type`` has no row in the architecture table."""


@dataclass(frozen=True)
class Group:
    """Linear modules of one block (names relative to the block) that read the same input: one Hessian for all.

    ``source`` names a module whose *output* is the group's input when the group's own modules are not called as
    modules (Mamba's ``dt_proj`` is applied as ``dt_proj.weight @ x``); ``narrow`` then names an integer attribute
    (relative to the block) giving how many leading features of that output form the input.
    """

    modules: tuple[str, ...]
    source: str | None = None
    narrow: str | None = None


@dataclass(frozen=True)
class Architecture:
    """One row of the table.

    blocks:  dotted path from the *CausalLM model to the ``nn.ModuleList`` of decoder blocks.
    groups:  the pruned linear modules of a block, grouped by shared input, in forward order.
    dense:   further modules or parameters of a block that stay dense by default (listed so that a user can ask for
             them by name: modules with a ``weight`` are then pruned by magnitude; see ``driver.prune_model``).
    transposed: module class names whose ``weight`` is stored (in_features, out_features) (GPT-2's ``Conv1D``).
    head:    modules applied in order to the last block's output to get the logits (final norm, optional
             projection, LM head); used by the block-by-block perplexity. Missing optional ones are skipped.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    groups: tuple[Group, ...]
    dense: tuple[str, ...] = ()
    transposed: tuple[str, ...] = field(default=("Conv1D",))
    head: tuple[str, ...] = ("model.norm", "lm_head")

    @property
    def linear_modules(self) -> tuple[str, ...]:
        return tuple(m for g in self.groups for m in g.modules)


_LLAMA_GROUPS = (
    Group(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Group(("self_attn.o_proj",)),
    Group(("mlp.gate_proj", "mlp.up_proj")),
    Group(("mlp.down_proj",)),
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama", "mistral", "qwen2", "qwen3"), "model.layers", _LLAMA_GROUPS),
    Architecture("opt", ("opt",), "model.decoder.layers", (
        Group(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        Group(("self_attn.out_proj",)),
        Group(("fc1",)),
        Group(("fc2",)),
    ), head=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head")),
    Architecture("gpt2", ("gpt2",), "transformer.h", (
        Group(("attn.c_attn",)),
        Group(("attn.c_proj",)),
        Group(("mlp.c_fc",)),
        Group(("mlp.c_proj",)),
    ), head=("transformer.ln_f", "lm_head")),
    Architecture("gpt_neox", ("gpt_neox",), "gpt_neox.layers", (
        Group(("attention.query_key_value",)),
        Group(("attention.dense",)),
        Group(("mlp.dense_h_to_4h",)),
        Group(("mlp.dense_4h_to_h",)),
    ), head=("gpt_neox.final_layer_norm", "lm_head")),
    Architecture("mamba", ("mamba",), "backbone.layers", (
        Group(("mixer.in_proj",)),
        Group(("mixer.x_proj",)),
        Group(("mixer.dt_proj",), source="mixer.x_proj", narrow="mixer.time_step_rank"),
        Group(("mixer.out_proj",)),
    ), dense=("mixer.conv1d", "mixer.A_log", "mixer.D"), head=("backbone.norm_f", "lm_head")),
    Architecture("mamba2", ("mamba2",), "backbone.layers", (
        Group(("mixer.in_proj",)),
        Group(("mixer.out_proj",)),
    ), dense=("mixer.conv1d", "mixer.A_log", "mixer.D", "mixer.dt_bias", "mixer.norm"),
        head=("backbone.norm_f", "lm_head")),
)

_BY_TYPE = {t: a for a in ARCHITECTURES for t in a.model_types}


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_BY_TYPE))


def architecture_for(model_type: str) -> Architecture:
    """The table row for a ``config.model_type``; raises ``UnsupportedArchitectureError`` with the supported list."""
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}; supported model types: "
            f"{', '.join(supported_model_types())}") from None


def architecture_of(model) -> Architecture:
    """The table row for a transformers model (by ``model.config.model_type``)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no config.model_type; pyprune needs a transformers *ForCausalLM model")
    return architecture_for(model_type)


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
            raise UnsupportedArchitectureError(
                f"{type(root).__name__} has no attribute path {path!r} (missing {part!r}); the model does not match "
                "pyprune's architecture table")
    return obj


def find_submodule(root, path: str):
    """Like ``get_submodule`` but None where the path is absent or ends in None (optional modules)."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
