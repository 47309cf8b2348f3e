"""The sequential block driver: data (the architecture table) plus one loop.

1. Catch the inputs of the first decoder block (a forward pre-hook that stops the forward pass).
2. For every block: move it to the device, accumulate the Hessians of its linear layers with forward hooks (one per
   group of modules reading the same input), prune every module with ``pyprune.algorithms.prune_layer``, re-run the
   block to produce the next block's inputs, move it back.

Only one block's weights, its Hessians and the calibration activations are on the device at a time. The math lives in
``pyprune.algorithms`` and ``pyprune.ops``; this module only moves tensors and bookkeeps.
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from ..algorithms import prune_layer
from ..config import PruneConfig
from ..ops.hessian import accumulate_hessian
from ..report import (LayerReport, PruneReport, device_peak_memory, host_peak_rss, reset_device_peak_memory,
                      reset_host_peak_rss)
from .architectures import Architecture, architecture_of, get_submodule


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass at the first block."""


@dataclass
class BlockInputs:
    """Calibration activations entering a block plus the other arguments the model passed to block 0.

    hidden: one tensor (batch, seq, hidden) per calibration batch. extra: per batch, (positional args after the hidden
    states, keyword args); consecutive equal entries share one object, so a causal mask is stored once.
    """

    hidden: list[torch.Tensor]
    extra: list[tuple[tuple, dict]]

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


@dataclass(frozen=True)
class Selection:
    """Which modules of a block are pruned: ``modules`` patterns (fnmatch on the name relative to the block or the
    full name; None = every linear module of the table), ``dense`` names of normally dense modules to prune by
    magnitude, ``blocks`` indices of the blocks to prune (None = all)."""

    modules: tuple[str, ...] | None = None
    dense: tuple[str, ...] = ()
    blocks: frozenset[int] | None = None

    def wants(self, rel: str, full: str) -> bool:
        if self.modules is None:
            return True
        return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(full, p) for p in self.modules)

    def wants_block(self, index: int) -> bool:
        return self.blocks is None or index in self.blocks


def make_selection(arch: Architecture, modules: Sequence[str] | str | None, dense: Sequence[str] | str | None,
                   blocks: Iterable[int] | None, num_blocks: int) -> Selection:
    """Validate the user's choices against the architecture table and the block count."""
    if isinstance(modules, str):
        modules = [modules]
    if isinstance(dense, str):
        dense = [dense]
    modules = None if modules is None else tuple(modules)
    if modules is not None:
        if not modules:
            raise ValueError("modules is empty: nothing to prune")
        names = list(arch.linear_modules) + [f"{arch.blocks}.{i}.{m}" for i in range(num_blocks)
                                              for m in arch.linear_modules]
        for p in modules:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise ValueError(f"module pattern {p!r} matches none of the prunable modules of {arch.name} blocks: "
                                 f"{', '.join(arch.linear_modules)}")
    dense = tuple(dense or ())
    for name in dense:
        if name not in arch.dense:
            raise ValueError(f"{name!r} is not one of the dense-by-default parts of {arch.name} blocks "
                             f"({', '.join(arch.dense) or 'none'})")
    if blocks is not None:
        blocks = frozenset(int(b) for b in blocks)
        bad = [b for b in blocks if not 0 <= b < num_blocks]
        if bad:
            raise ValueError(f"block indices {sorted(bad)} out of range: the model has {num_blocks} blocks")
        if not blocks:
            raise ValueError("blocks is empty: nothing to prune")
    return Selection(modules, dense, blocks)


# ----------------------------------------------------------------------------------------------------------- inputs
def as_batches(calibration, batch_size: int = 1) -> list[torch.Tensor]:
    """Calibration token ids -> a list of LongTensors (batch, seq). Accepts a (n, seq) tensor, one 1-D tensor, or a
    sequence of 1-D / (1, seq) tensors of equal length."""
    if calibration is None:
        return []
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(calibration, torch.Tensor):
        ids = calibration if calibration.dim() == 2 else calibration.reshape(1, -1)
    else:
        rows = [torch.as_tensor(t).reshape(-1) for t in calibration]
        if not rows:
            raise ValueError("calibration is empty")
        lengths = {r.numel() for r in rows}
        if len(lengths) != 1:
            raise ValueError(f"calibration samples must all have the same length, got lengths {sorted(lengths)}")
        ids = torch.stack(rows)
    if ids.numel() == 0 or ids.shape[1] == 0:
        raise ValueError("calibration is empty")
    if ids.is_floating_point() or ids.is_complex():
        raise ValueError("calibration must be integer token ids")
    ids = ids.long()
    return [ids[i:i + batch_size] for i in range(0, ids.shape[0], batch_size)]


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable ==
        return False


def _detach(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(_detach(x) for x in obj)
    if isinstance(obj, list):
        return [_detach(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def capture_block_inputs(model, blocks: torch.nn.ModuleList, batches: list[torch.Tensor],
                         device: torch.device) -> BlockInputs:
    """Run the model on every batch up to its first block and keep what the first block receives."""
    hidden: list[torch.Tensor] = []
    extra: list[tuple[tuple, dict]] = []

    def pre_hook(module, args, kwargs):
        kwargs = dict(kwargs)
        h = args[0] if args else kwargs.pop("hidden_states")
        rest = (_detach(tuple(args[1:])), _detach(kwargs))
        if extra and _same(extra[-1], rest):
            rest = extra[-1]
        hidden.append(h.detach())
        extra.append(rest)
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _StopForward:
                    pass
                else:
                    raise RuntimeError("the model's forward pass did not reach its first decoder block")
    finally:
        handle.remove()
    return BlockInputs(hidden, extra)


def run_block(block: torch.nn.Module, inputs: BlockInputs, hidden: list[torch.Tensor] | None = None
              ) -> list[torch.Tensor]:
    """The block's outputs for every calibration batch (``hidden`` overrides the inputs' hidden states)."""
    outs = []
    with torch.no_grad():
        for h, (args, kwargs) in zip(hidden if hidden is not None else inputs.hidden, inputs.extra):
            out = block(h, *args, **kwargs)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outs


# ------------------------------------------------------------------------------------------------------ one block
def weight_2d(module: torch.nn.Module, arch: Architecture) -> torch.Tensor:
    """The module's weight as (out_features, in_features) (a view; transposed for GPT-2's Conv1D)."""
    w = module.weight
    return w.t() if type(module).__name__ in arch.transposed else w.reshape(w.shape[0], -1)


def _set_weight(module: torch.nn.Module, arch: Architecture, value: torch.Tensor) -> None:
    with torch.no_grad():
        weight_2d(module, arch).copy_(value.to(module.weight.dtype))


class _HessianHook:
    """Accumulates one group's Hessian from the module's input (or its source module's narrowed output)."""

    def __init__(self, name: str, width: int | None, use_output: bool, backend: str):
        self.name, self.width, self.use_output, self.backend = name, width, use_output, backend
        self.H: torch.Tensor | None = None
        self.n = 0

    def __call__(self, module, inputs, output):
        x = output if self.use_output else inputs[0]
        if isinstance(x, (tuple, list)):
            x = x[0]
        x = x.detach()
        if self.width is not None:
            x = x[..., :self.width]
        x = x.reshape(-1, x.shape[-1])
        if self.H is None:
            self.H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        self.n = accumulate_hessian(self.H, self.n, x, backend=self.backend)


def prune_block(block: torch.nn.Module, index: int, arch: Architecture, inputs: BlockInputs, config: PruneConfig,
                selection: Selection, *, prefix: str = "", true_sequential: bool = False, progress: bool = False,
                comm=None) -> list[LayerReport]:
    """Prune one block in place (it must already be on the compute device with its inputs). Returns its reports.
    ``comm`` (a ``pyprune.distributed.Comm``): the inputs are this rank's shard; Hessians are reduced over the ranks
    and the modules' solves split between them (see ``pyprune.distributed``)."""
    groups = [(g, [m for m in g.modules if selection.wants(m, f"{prefix}{m}")]) for g in arch.groups]
    groups = [(g, mods) for g, mods in groups if mods]
    needs_h = bool(inputs.hidden)
    stages = [[gm] for gm in groups] if true_sequential else ([groups] if groups else [])
    total = sum(len(mods) for _, mods in groups) + len(selection.dense)
    bar = _bar(total, f"block {index}", leave=False) if progress else None
    reports: list[LayerReport] = []
    try:
        for stage in stages:
            hooks: dict[int, _HessianHook] = {}
            handles = []
            if needs_h:
                for gi, (g, _) in enumerate(stage):
                    src = g.source or g.modules[0]
                    width = int(get_submodule(block, g.narrow)) if g.narrow else None
                    hook = _HessianHook(f"{prefix}{src}", width, g.source is not None, config.backend)
                    hooks[gi] = hook
                    handles.append(get_submodule(block, src).register_forward_hook(hook))
                try:
                    run_block(block, inputs)
                finally:
                    for h in handles:
                        h.remove()
            if comm is not None:
                reports += _prune_stage_distributed(block, index, arch, stage, hooks, config, comm, prefix, needs_h)
                if bar is not None:
                    bar.update(sum(len(mods) for _, mods in stage))
                continue
            for gi, (g, mods) in enumerate(stage):
                hook = hooks.get(gi)
                if needs_h and hook.n == 0:
                    raise RuntimeError(f"{hook.name} was not called as a module during the forward pass of block "
                                       f"{index}, so its inputs could not be collected")
                H = hook.H if hook else None
                for rel in mods:
                    module = get_submodule(block, rel)
                    t0 = time.perf_counter()
                    W = weight_2d(module, arch).detach()
                    if H is not None and H.shape[0] != W.shape[1]:
                        raise RuntimeError(f"{prefix}{rel}: Hessian is {H.shape[0]}x{H.shape[0]} but the weight has "
                                           f"{W.shape[1]} input features; the architecture table is wrong")
                    result = prune_layer(W.contiguous(), H, config)
                    _set_weight(module, arch, result.weight)
                    reports.append(LayerReport(f"{prefix}{rel}", index, tuple(W.shape), float(result.loss),
                                               result.sparsity, time.perf_counter() - t0, config.method,
                                               hook.n if hook else 0))
                    del result
                    if bar is not None:
                        bar.update(1)
                if hook is not None:
                    hook.H = None
        for rel in selection.dense:
            reports.append(_prune_dense(block, rel, index, arch, config, prefix))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return reports


def _prune_stage_distributed(block, index: int, arch: Architecture, stage, hooks: dict, config: PruneConfig, comm,
                             prefix: str, needs_h: bool) -> list[LayerReport]:
    """One stage of ``prune_block`` over the ranks of ``comm``: reduce each group's Hessian, then split the solves."""
    from ..distributed import prune_units
    items, setters, counts = [], [], []
    for gi, (g, mods) in enumerate(stage):
        hook = hooks.get(gi)
        if needs_h and hook.n == 0:
            raise RuntimeError(f"{hook.name} was not called as a module during the forward pass of block "
                               f"{index}, so its inputs could not be collected")
        if hook is not None:
            hook.H, hook.n = comm.reduce_hessian(hook.H, hook.n)
        for rel in mods:
            module = get_submodule(block, rel)
            W = weight_2d(module, arch).detach()
            if hook is not None and hook.H.shape[0] != W.shape[1]:
                raise RuntimeError(f"{prefix}{rel}: Hessian is {hook.H.shape[0]}x{hook.H.shape[0]} but the weight "
                                   f"has {W.shape[1]} input features; the architecture table is wrong")
            items.append((f"{prefix}{rel}", W, hook.H if hook else None))
            setters.append(lambda rows, v, m=module: _set_rows(m, arch, rows, v))
            counts.append(hook.n if hook else 0)
    stats = prune_units(comm, items, config, setters)
    for hook in hooks.values():
        hook.H = None
    return [LayerReport(name, index, tuple(W.shape), loss, sparsity, secs, config.method, n)
            for (name, W, _), (loss, sparsity, secs), n in zip(items, stats, counts)]


def _set_rows(module: torch.nn.Module, arch: Architecture, rows: slice, value: torch.Tensor) -> None:
    with torch.no_grad():
        weight_2d(module, arch)[rows].copy_(value.to(module.weight.dtype))


def _prune_dense(block, rel: str, index: int, arch: Architecture, config: PruneConfig, prefix: str) -> LayerReport:
    """A normally dense module (e.g. Mamba's depthwise conv1d), asked for by name: magnitude pruning of its weight
    viewed as (out, -1). Plain parameters (A_log, D, dt_bias) are not weights of a linear map and are refused."""
    target = get_submodule(block, rel)
    if not isinstance(target, torch.nn.Module) or getattr(target, "weight", None) is None:
        raise ValueError(f"{prefix}{rel} is a parameter of the state-space model, not a weight matrix; pyprune only "
                         "prunes modules with a weight (e.g. mixer.conv1d)")
    t0 = time.perf_counter()
    W = weight_2d(target, arch).detach()
    cfg = config.replace(method="magnitude", mask=None)
    if cfg.sparsity.structured and W.shape[1] % cfg.sparsity.m:
        raise ValueError(f"{prefix}{rel}: {W.shape[1]} columns is not a multiple of M={cfg.sparsity.m}")
    result = prune_layer(W.contiguous(), None, cfg)
    _set_weight(target, arch, result.weight)
    return LayerReport(f"{prefix}{rel}", index, tuple(W.shape), float(result.loss), result.sparsity,
                       time.perf_counter() - t0, "magnitude", 0)


def _bar(total, desc, leave=True):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=leave, unit="module" if not leave else "block", dynamic_ncols=True)


def resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available (torch {torch.__version__})")
    return device


def settings_dict(config: PruneConfig, **extra) -> dict:
    return {"method": config.method, "sparsity": str(config.sparsity), "block_size": config.block_size,
            "damp": config.damp, "mask": config.mask, "mask_scope": config.mask_scope, "backend": config.backend,
            **extra}


class _MoveNonBlock:
    """Context: the parameters and buffers outside the decoder blocks live on ``device`` (for the capture pass)."""

    def __init__(self, model, blocks, device):
        self.model, self.device = model, device
        inside = {id(t) for t in list(blocks.parameters()) + list(blocks.buffers())}
        self.tensors = []
        seen = set()
        for t in list(model.parameters()) + list(model.buffers()):
            if id(t) in inside or id(t) in seen or t.device.type == "meta":
                continue
            seen.add(id(t))
            self.tensors.append((t, t.device))

    def __enter__(self):
        for t, _ in self.tensors:
            if t.device != self.device:
                t.data = t.data.to(self.device)
        return self

    def __exit__(self, *exc):
        for t, dev in self.tensors:
            if t.device != dev:
                t.data = t.data.to(dev)


def prune_model(model, calibration, config: PruneConfig | None = None, *, modules: Sequence[str] | None = None,
                dense: Sequence[str] | None = None, blocks: Iterable[int] | None = None, device=None,
                batch_size: int = 1, true_sequential: bool = False, progress: bool = False,
                on_block_done: Callable[[int, list[LayerReport]], None] | None = None, comm=None) -> PruneReport:
    """Prune a transformers causal LM in place, one decoder block at a time, and return a ``PruneReport``.

    model:        a ``*ForCausalLM`` whose ``config.model_type`` is in the architecture table; its weights may live
                  on the CPU: each block is moved to ``device`` in turn and back.
    calibration:  token ids: a (nsamples, seqlen) LongTensor or a list of equal-length 1-D tensors. May be None only
                  for ``method="magnitude"`` (then no forward pass runs and losses are NaN).
    config:       the per-layer settings (method, sparsity, block size, damping, mask, backend).
    modules:      fnmatch patterns of modules to prune (relative to a block, e.g. "mlp.*", or full names); default all
                  linear modules of the architecture table.
    dense:        normally dense parts to prune as well (by magnitude), e.g. ("mixer.conv1d",) for Mamba.
    blocks:       indices of the blocks to prune (default all); the loop stops after the last one.
    device:       where each block, its Hessians and the activations live while it is pruned ("cuda", "cpu"; default
                  CUDA when available).
    true_sequential: prune the groups of a block one after the other, re-collecting each group's Hessian from the
                  partly pruned block (more forward passes; the default collects all Hessians from the dense block).
    on_block_done: called as ``f(block_index, layer_reports)`` after each block (progress reporting, tests).
    comm:         a ``pyprune.distributed.Comm`` to prune on several ranks (torchrun): every rank calls this with the
                  same model and its own calibration shard (``pyprune.distributed.shard_samples``); all ranks end
                  with identical weights and reports. None (default): one process.
    """
    config = PruneConfig() if config is None else config
    arch = architecture_of(model)
    block_list = get_submodule(model, arch.blocks)
    selection = make_selection(arch, modules, dense, blocks, len(block_list))
    device = resolve_device(comm.device if comm is not None and device is None else device)
    batches = as_batches(calibration, batch_size)
    if not batches and config.method != "magnitude":
        raise ValueError(f"method {config.method!r} needs calibration data (token ids)")
    if comm is not None and not comm.is_main:
        progress = False

    reset_host_peak_rss()
    reset_device_peak_memory(device)
    t_start = time.perf_counter()
    was_training = model.training
    model.eval()
    last = max(selection.blocks) if selection.blocks is not None else len(block_list) - 1
    layers: list[LayerReport] = []
    times = {}
    try:
        t0 = time.perf_counter()
        if batches:
            with _MoveNonBlock(model, block_list, device):
                inputs = capture_block_inputs(model, block_list, batches, device)
        else:
            inputs = BlockInputs([], [])
        times["capture"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        outer = _bar(last + 1, "blocks") if progress else None
        try:
            for i in range(last + 1):
                block = block_list[i]
                home = _device_of(block)
                if home != device:
                    block.to(device)
                if selection.wants_block(i):
                    layers += prune_block(block, i, arch, inputs, config, selection, prefix=f"{arch.blocks}.{i}.",
                                          true_sequential=true_sequential, progress=progress, comm=comm)
                if i < last and inputs.hidden:
                    inputs.hidden = run_block(block, inputs)
                if home != device:
                    block.to(home)
                if on_block_done is not None:
                    on_block_done(i, [r for r in layers if r.block == i])
                if outer is not None:
                    outer.update(1)
        finally:
            if outer is not None:
                outer.close()
        times["prune"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    times["total"] = time.perf_counter() - t_start
    nsamples = sum(b.shape[0] for b in batches)
    extra = {} if comm is None else {"world_size": comm.world_size}
    settings = settings_dict(config, model_type=model.config.model_type, architecture=arch.name,
                             nsamples=nsamples if comm is None else comm.sum_int(nsamples),
                             seqlen=int(batches[0].shape[1]) if batches else 0, device=str(device),
                             modules=list(selection.modules) if selection.modules else None,
                             dense=list(selection.dense), blocks=sorted(selection.blocks) if selection.blocks else None,
                             true_sequential=true_sequential, **extra)
    return PruneReport(settings, layers, times, device_peak_memory(device), host_peak_rss(), last + 1)


def _device_of(module: torch.nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
