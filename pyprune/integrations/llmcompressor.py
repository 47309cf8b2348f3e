"""pyprune's joint pruning (and its SparseGPT, Wanda and magnitude) as an llm-compressor modifier.

Importing this module defines ``JointPruningModifier`` and registers it with llm-compressor's ``ModifierFactory``, so
that recipes name it like any of llm-compressor's own modifiers; llm-compressor itself is not changed::

    import pyprune.integrations.llmcompressor  # noqa: F401  (registers JointPruningModifier)
    from pyprune.integrations.llmcompressor import JointPruningModifier
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    recipe = [JointPruningModifier(sparsity=0.5, mask_structure="2:4", targets=[r"re:model\\.layers\\.\\d+$"]),
              QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])]
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=128, max_seq_length=2048)

It mirrors llm-compressor's ``SparseGPTModifier`` (it subclasses the same ``SparsityModifierBase``, so ``sparsity``,
``mask_structure``, ``targets``, ``ignore``, per-layer sparsity lists and OWL mean what they mean there): on
``CALIBRATION_START`` a forward hook on every prunable module of the sequential targets accumulates the Hessian of
its input (``pyprune.ops.accumulate_hessian``: the running mean 2/n X^T X over tokens) while llm-compressor's
sequential pipeline runs a subgraph (a decoder layer) over the calibration batches; on ``SEQUENTIAL_EPOCH_END`` the
calibrated modules are pruned with ``pyprune.algorithms.prune_group`` and written back; the pipeline then re-runs the
pruned layer to make the next layer's inputs (its ``propagate_error``, on by default). That is the loop of
``pyprune.prune_model`` with ``true_sequential`` off: every Hessian of a layer from its dense inputs, the next layer
from the pruned one's outputs.

Quantize after it with ``QuantizationModifier`` (round to nearest keeps zeros at zero); llm-compressor 0.14's
``GPTQModifier`` keeps no sparsity mask, and its error compensation writes into the pruned weights (README).

Modules that read the same input tensor in a forward pass (q/k/v, gate/up: observed from the hooks, the input object
is the same) share one Hessian and are pruned together by ``prune_group`` (one damped factor for all; each result
bit-identical to ``prune_layer`` alone). ``share_hessians=False`` gives every module its own.
"""
from __future__ import annotations

import torch

try:
    from compressed_tensors.utils import align_module_device, get_execution_device, update_offload_parameter
    from llmcompressor.core import State
    from llmcompressor.modifiers.factory import ModifierFactory
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase
    from pydantic import PrivateAttr, model_validator
except ImportError as e:
    raise ImportError(f"pyprune.integrations.llmcompressor needs llm-compressor ({e}): pip install "
                      "'llmcompressor==0.14.*' (tested with 0.14; in this repository: make peers-venv)") from e

from ..algorithms import prune_group
from ..config import METHODS, PruneConfig
from ..ops.hessian import accumulate_hessian

__all__ = ["JointPruningModifier"]


class JointPruningModifier(SparsityModifierBase):
    """Prune with pyprune's layer functions inside llm-compressor's sequential pipeline.

    sparsity, mask_structure, targets, ignore, sparsity_profile, owl_m, owl_lmbda: as llm-compressor's
    SparseGPTModifier (``mask_structure`` "N:M" prunes N of every M, pyprune's ``Sparsity("N:M")``; otherwise
    ``sparsity``, one value or one per target layer, is the fraction).
    method:          pyprune's method: "joint" (default), "sparsegpt", "wanda", "magnitude".
    block_size, dampening_frac, mask, mask_scope, swaps, shrink, backend: ``pyprune.PruneConfig``'s block_size,
                     damp, mask, mask_scope, swaps, shrink and backend (None: pyprune's defaults for the method).
    share_hessians:  one Hessian for the modules that read the same input tensor (default True).

    After ``oneshot``, ``results`` maps each pruned module's name to its layer loss, the fraction of its weights
    that are zero, the calibration tokens its Hessian saw and the damping used."""

    method: str = "joint"
    block_size: int = 128
    dampening_frac: float = 0.01
    mask: str | None = None
    mask_scope: str | None = None
    swaps: int | None = None
    shrink: float | None = None
    backend: str = "auto"
    share_hessians: bool = True

    _hessians: dict = PrivateAttr(default_factory=dict)      # leader module -> H (float32, execution device)
    _counts: dict = PrivateAttr(default_factory=dict)        # leader module -> tokens in H
    _leader: dict = PrivateAttr(default_factory=dict)        # module -> the module whose H it shares
    _previous: tuple | None = PrivateAttr(default=None)      # (input tensor, leader) of the latest hooked call
    _results: dict = PrivateAttr(default_factory=dict)

    @property
    def results(self) -> dict:
        """Module name -> {"loss", "sparsity", "tokens", "damp"} of every module pruned so far."""
        return self._results

    @model_validator(mode="after")
    def _check_pyprune_settings(self) -> "JointPruningModifier":
        if self.method not in METHODS:
            raise ValueError(f"JointPruningModifier: unknown method {self.method!r}; choose one of "
                             f"{', '.join(METHODS)}")
        if isinstance(self.sparsity, (int, float)) or self._prune_n:
            self.config_for(self.sparsity if not self._prune_n else None)  # pyprune's own validation, now
        return self

    def config_for(self, sparsity) -> PruneConfig:
        """The ``PruneConfig`` of a module whose layer has ``sparsity`` (a fraction; ignored under N:M)."""
        target = f"{self._prune_n}:{self._prune_m}" if self._prune_n else float(sparsity)
        try:
            return PruneConfig(method=self.method, sparsity=target,
                               block_size=self.block_size, damp=self.dampening_frac, mask=self.mask,
                               mask_scope=self.mask_scope, swaps=self.swaps, shrink=self.shrink,
                               backend=self.backend)
        except ValueError as e:
            raise ValueError(f"JointPruningModifier: {e}") from None

    # ---------------------------------------------------------------------------------------- calibration
    def calibrate_module(self, module: torch.nn.Module, args: tuple, _output) -> None:
        """Forward hook: add this call's input to the module's Hessian (or to the one it shares). Only ``nn.Linear``
        modules are pruned: the convolutions llm-compressor's base class also hooks (Mamba's depthwise conv1d, say)
        stay dense, as in ``pyprune.prune_model``."""
        if not isinstance(module, torch.nn.Linear):
            return
        inp = args[0]
        prev = self._previous
        if module not in self._leader:  # first call: does it read the tensor the previous hooked module read?
            shares = self.share_hessians and prev is not None and prev[0] is inp and prev[1] in self._hessians
            self._leader[module] = prev[1] if shares else module
        leader = self._leader[module]
        if leader is not module:  # it follows its leader on the same tensor in every batch, or sharing is wrong
            if prev is None or prev[0] is not inp or prev[1] is not leader:
                raise RuntimeError(f"JointPruningModifier: {self._module_names.get(module)} read the same input as "
                                   f"{self._module_names.get(leader)} in the first batch but not in a later one; "
                                   "set share_hessians=False")
            return
        if module not in self._hessians:
            self._hessians[module] = torch.zeros(inp.shape[-1], inp.shape[-1], dtype=torch.float32,
                                                 device=get_execution_device(module))
            self._counts[module] = 0
        x = inp.detach().reshape(-1, inp.shape[-1]).to(device=self._hessians[module].device)
        try:
            self._counts[module] = accumulate_hessian(self._hessians[module], self._counts[module], x,
                                                      backend=self.backend)
        except ValueError as e:
            raise ValueError(f"JointPruningModifier: input of {self._module_names.get(module)}: {e}") from e
        self._previous = (inp, module)

    def compress_modules(self) -> None:
        """Prune every calibrated module (called at the end of each sequential subgraph)."""
        groups: dict = {}
        for module, leader in self._leader.items():
            if leader in self._hessians:
                groups.setdefault(leader, []).append(module)
        for leader, members in groups.items():
            H = self._hessians.pop(leader)
            n = self._counts.pop(leader)
            by_config: dict = {}
            for m in members:
                by_config.setdefault(self.config_for(self._module_sparsities[m]), []).append(m)
            for cfg, mods in by_config.items():
                with torch.no_grad():
                    weights = []
                    for m in mods:
                        with align_module_device(m):
                            weights.append(m.weight.detach().to(H.device).contiguous())
                    results = prune_group(weights, H if cfg.method != "magnitude" else None, cfg)
                    for m, r in zip(mods, results):
                        with align_module_device(m):
                            update_offload_parameter(m, "weight", r.weight.to(m.weight.device, m.weight.dtype))
                        self._results[self._module_names[m]] = {"loss": float(r.loss), "sparsity": r.sparsity,
                                                               "tokens": n, "damp": r.damp}
                del weights, results
            del H
        for module in [m for m, lead in self._leader.items() if lead in groups]:
            del self._leader[module]
        self._previous = None

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.on_end(state, None)  # removes the hooks
        if self._hessians:
            names = ", ".join(self._module_names.get(m, "?") for m in self._hessians)
            raise ValueError(f"JointPruningModifier: {len(self._hessians)} calibrated modules were never pruned: "
                             f"{names}")
        self._leader.clear()
        self._previous = None
        return True


ModifierFactory.register("JointPruningModifier", JointPruningModifier)
