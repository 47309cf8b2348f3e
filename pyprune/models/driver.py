"""The sequential block driver: one loop for every way of running.

1. ``capture_inputs``: the hidden states entering block 0 and every block's own arguments, from the model's own
   forward pass with pass-through blocks (``capture.py``).
2. For every block: put it on the device (``BlockStore.load``), observe its forward pass over the calibration batches
   to find its weight matrices and accumulate one Hessian per group of matrices that read the same input
   (``discover.py``), prune every matrix with ``pyprune.algorithms``, run the pruned block to get the next block's
   inputs, hand it back (``BlockStore.done``: move it home, or write its shard and the resume point).

``prune_model`` runs the loop on a model in memory; ``pyprune.models.streaming.prune_checkpoint`` runs the same loop
on a checkpoint streamed from its shards; ``comm`` splits the solves over ranks in both. The math lives in
``pyprune.algorithms`` and ``pyprune.ops``; this module only moves tensors and keeps the books.
"""
from __future__ import annotations

import contextlib
import fnmatch
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from ..algorithms import prune_group, prune_layer
from ..config import PruneConfig, Sparsity
from ..owl import SparsityProfile, allocate, make_profile, outlier_ratio
from ..ops.hessian import accumulate_hessian
from ..ops._checks import all_finite
from ..report import (DenseMatrix, LayerReport, PruneReport, device_peak_memory, host_peak_rss, reset_device_peak_memory,
                      reset_host_peak_rss)
from .architectures import get_submodule
from .capture import BlockInputs, capture_inputs, run_block, run_block_all
from .discover import (MatrixObserver, PrunedParams, Site, all_experts_statistics, classify, eager_experts,
                       find_blocks)

SYNTHETIC_TOKENS = 8  # the discovery-only forward pass of a run without calibration data (magnitude)


@dataclass(frozen=True)
class Selection:
    """Which matrices are pruned: ``modules`` fnmatch patterns on the name relative to the block or the full name
    (None = every prunable matrix), ``dense`` names of normally dense modules to prune by magnitude, ``blocks``
    indices of the blocks to prune (None = all)."""

    modules: tuple[str, ...] | None = None
    dense: tuple[str, ...] = ()
    blocks: frozenset[int] | None = None

    def wants(self, rel: str, full: str) -> bool:
        if self.modules is None:
            return True
        return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(full, p) for p in self.modules)

    def wants_block(self, index: int) -> bool:
        return self.blocks is None or index in self.blocks


def make_selection(modules: Sequence[str] | str | None, dense: Sequence[str] | str | None,
                   blocks: Iterable[int] | None, num_blocks: int) -> Selection:
    """Validate the user's choices that need no forward pass (module patterns are checked against the first block's
    matrices once it is observed)."""
    if isinstance(modules, str):
        modules = [modules]
    if isinstance(dense, str):
        dense = [dense]
    modules = None if modules is None else tuple(modules)
    if modules is not None and not modules:
        raise ValueError("modules is empty: nothing to prune")
    if blocks is not None:
        blocks = frozenset(int(b) for b in blocks)
        bad = [b for b in blocks if not 0 <= b < num_blocks]
        if bad:
            raise ValueError(f"block indices {sorted(bad)} out of range: the model has {num_blocks} blocks")
        if not blocks:
            raise ValueError("blocks is empty: nothing to prune")
    return Selection(modules, tuple(dense or ()), blocks)


@dataclass
class Options:
    """Per-run settings of the loop that are not per-layer maths (see ``prune_model``)."""

    true_sequential: bool = False
    calibrate_all_experts: bool = False
    expert_min_tokens: int | None = None
    progress: bool = False
    hessian_budget: int | str | None = "auto"


# --------------------------------------------------------------------------------------------------- inputs
# Calibration tokens per forward pass when batch_size is None: windows are batched up to this many tokens. On the CPU
# (a SmolLM2-shaped 2-block model, 32 x 512 tokens, 1 thread) 4 windows per pass pruned 10% faster than 1 (bigger
# products in the forward passes and the Hessian updates), and 8 no faster; a 2048-token window stays alone, so the
# largest forward pass is never longer than one such window.
TOKENS_PER_FORWARD = 2048


def windows_per_batch(batch_size: int | None, seqlen: int) -> int:
    """``batch_size``, or for None as many windows of ``seqlen`` tokens as make at most ``TOKENS_PER_FORWARD``."""
    return max(1, TOKENS_PER_FORWARD // max(1, seqlen)) if batch_size is None else batch_size


def as_batches(calibration, batch_size: int | None = None) -> list[torch.Tensor]:
    """Calibration token ids -> a list of LongTensors (batch, seq). Accepts a (n, seq) tensor, one 1-D tensor, or a
    sequence of 1-D / (1, seq) tensors of equal length. ``batch_size``: windows per batch; None: as many as make at
    most ``TOKENS_PER_FORWARD`` tokens (at least one)."""
    if calibration is None:
        return []
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
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
    batch_size = windows_per_batch(batch_size, ids.shape[1])
    return [ids[i:i + batch_size] for i in range(0, ids.shape[0], batch_size)]


# ---------------------------------------------------------------------------------------------- observation
@dataclass
class _Slot:
    """One Hessian, shared by the matrices that read the same input."""

    sites: tuple[Site, ...]
    H: torch.Tensor | None = None
    n: int = 0
    deferred: bool = False  # left for a later pass by the Hessian memory budget
    seen: bool = True       # False: an expert no calibration token reached (never ran)


@dataclass
class Observed:
    """The result of observing one block over the calibration batches: groups in forward order with their Hessians
    (None where not collected), and the dense entries with their reasons."""

    slots: list[_Slot] = field(default_factory=list)
    dense: dict[str, str] = field(default_factory=dict)
    experts: int = 0
    kept: dict[str, Site] = field(default_factory=dict)  # the dense matrices, as the forward used them


def observe_block(block: torch.nn.Module, inputs: BlockInputs, index: int, *, backend: str = "auto",
                  collect: Callable[[Site], bool] | None = None, all_experts: bool = False,
                  shared: PrunedParams | None = None, budget: int | None = None,
                  diagonal: bool = False) -> Observed:
    """Run the block over the calibration batches under a ``MatrixObserver``: find its matrices and accumulate a
    Hessian for every group with a member ``collect`` accepts (None: none, discovery only). ``all_experts``: every
    expert sees every token for its statistics (the routed outputs stay exact). ``budget``: bytes of Hessians to
    hold at once; groups beyond it (the first always fits) are left uncollected (``H`` None) for a later pass.
    ``diagonal``: collect only diag(X^T X), the squared norms of the input columns over the tokens (``H`` a float64
    vector; no budget: a vector per group), as the OWL pre-pass needs (``outlier_pass``).
    Experts no calibration token reached are listed too (``n`` = 0), with the layout of their observed siblings."""
    params = dict(block.named_parameters())
    used = 0
    observer = MatrixObserver(params)
    result = Observed()
    by_site: dict[Site, _Slot] = {}
    stats = all_experts_statistics(block, observer) if all_experts else contextlib.nullcontext()
    with torch.no_grad(), stats:
        for b in range(len(inputs.hidden)):
            observer.clear()
            call = inputs.calls[index][b]
            with observer:
                run_block(block, inputs.hidden[b], call)
            found = classify(block, observer.events, shared, observer.routers)
            result.dense.update(found.dense)
            result.kept.update(found.kept)
            result.experts = max(result.experts, found.experts)
            x_of = {}
            for site, x in observer.events:
                x_of.setdefault(site, x)
            for group in found.groups:
                slot = by_site.get(group[0])
                if slot is None:
                    slot = _Slot(group)
                    for s in group:
                        if s in by_site:
                            raise RuntimeError(f"block {index}: {s.name} read the same input as other matrices in "
                                               "one batch and a different one in another; pyprune cannot share "
                                               "their Hessian")
                        by_site[s] = slot
                    result.slots.append(slot)
                elif slot.sites != group:
                    raise RuntimeError(f"block {index}: the matrices reading the input of {group[0].name} changed "
                                       f"between batches ({[s.name for s in slot.sites]} -> "
                                       f"{[s.name for s in group]})")
                if collect is not None and not slot.deferred and any(collect(s) for s in group):
                    x = x_of[group[0]]
                    if diagonal:
                        sq = x.float().square().sum(0, dtype=torch.float64)
                        slot.H = sq if slot.H is None else slot.H.add_(sq)
                        slot.n += x.shape[0]
                        continue
                    if slot.H is None:
                        size = x.shape[1] * x.shape[1] * 4
                        if budget is not None and used and used + size > budget:
                            slot.deferred = True  # collected in a later pass
                            continue
                        used += size
                        slot.H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
                    try:
                        slot.n = accumulate_hessian(slot.H, slot.n, x, backend=backend)
                    except ValueError as e:
                        raise ValueError(f"block {index}, input of {', '.join(s.name for s in group)}: {e}") from e
            observer.clear()
    _add_unseen_experts(result, params, shared)
    return result


def _add_unseen_experts(result: Observed, params: dict, shared) -> None:
    """Experts that no calibration token reached never run, so the observer never saw them: list them with the layout
    of a sibling that ran (same parameter, the next matrix of it), each alone and without a Hessian."""
    seen: dict[str, Site] = {}
    have = set()
    for slot in result.slots:
        for site in slot.sites:
            if site.expert is not None:
                seen.setdefault(site.param, site)
                have.add((site.param, site.expert))
    for name, site in seen.items():
        p = params[name]
        if shared is not None and shared.where(p) is not None:
            continue
        size = site.shape[0] * site.shape[1]
        for e in range(site.stacked_in(p)):
            if (name, e) not in have:
                result.slots.append(_Slot((Site(name, e * size, site.shape, site.stride, site.transposed, e),),
                                          seen=False))


# ------------------------------------------------------------------------------------------------ one block
def prune_block(block: torch.nn.Module, index: int, inputs: BlockInputs, config: PruneConfig,
                selection: Selection, options: Options, *, prefix: str = "", comm=None,
                shared: PrunedParams | None = None, check_patterns: bool = False) -> tuple[list[LayerReport],
                                                                                           Observed]:
    """Prune one block in place (it must be on the compute device with its inputs). Returns its layer reports and
    what was observed. ``comm``: the inputs are this rank's shard; Hessians are reduced over the ranks and the
    solves split between them (``pyprune.distributed``)."""
    needs_h = config.method != "magnitude"

    def wanted(site: Site) -> bool:
        return selection.wants(site.name, f"{prefix}{site.name}")

    reports: list[LayerReport] = []
    done: set[Site] = set()
    stage: set[Site] | None = None  # the matrices to collect in this pass (None: all remaining, within the budget)
    observed_all = None
    bar = None
    budget = hessian_budget(options.hessian_budget, block)
    # Distributed: every rank must make the same passes and reduce the same groups in each. The budget is the least
    # of the ranks', and the groups of a pass are planned from the block's structure (the same on every rank: a
    # discovery pass first), never from what one rank's tokens happened to reach first.
    planned = None
    if comm is not None:
        known = [b for b in comm.all_gather_object(budget) if b is not None]
        budget = min(known) if known else None
        if budget is not None and needs_h and not options.true_sequential:
            planned = budget
        budget = None
    while True:
        discover_only = planned is not None and stage is None
        obs = observe_block(block, inputs, index, backend=config.backend, shared=shared, budget=budget,
                            collect=(lambda s: wanted(s) and s not in done and (stage is None or s in stage))
                            if needs_h and not discover_only else None,
                            all_experts=options.calibrate_all_experts or not needs_h)
        if observed_all is None:
            observed_all = obs
            if check_patterns and selection.modules is not None:
                names = [s.name for slot in obs.slots for s in slot.sites]
                for p in selection.modules:
                    if not any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(f"{prefix}{n}", p) for n in names):
                        raise ValueError(f"module pattern {p!r} matches none of the prunable matrices of block "
                                         f"{index}: {', '.join(names)}")
            if options.progress:
                total = sum(1 for slot in obs.slots for s in slot.sites if wanted(s)) + len(selection.dense)
                bar = _bar(total, f"block {index}", leave=False)
        order = {name: i for i, (name, _) in enumerate(block.named_parameters())}
        todo = sorted((slot for slot in obs.slots if any(wanted(s) and s not in done for s in slot.sites)),
                      key=lambda slot: (order[slot.sites[0].param], slot.sites[0].offset))  # the same on every rank
        if not todo:
            break
        if discover_only:
            stage = _fit_budget(todo, planned)
            continue
        if planned is not None:
            ready = [slot for slot in todo if any(s in stage for s in slot.sites)]
        elif not needs_h or (comm is not None and not options.true_sequential):
            ready = todo
        else:  # what this pass collected (experts no token reached have nothing to collect: ready too)
            ready = [slot for slot in todo if slot.H is not None or not slot.seen]
            if options.true_sequential:
                ready = ready[:1]
            if not ready:
                raise RuntimeError(f"block {index}: no Hessian was collected for {todo[0].sites[0].name}")
        for slot in ready:
            if comm is not None and needs_h:
                _reduce_slot(slot, comm)
            reports += _prune_slot(block, index, slot, wanted, config, options, prefix, comm)
        for slot in ready:
            done.update(slot.sites)
            slot.H = None
        if bar is not None:
            bar.update(sum(1 for slot in ready for s in slot.sites if wanted(s)))
        rest = [slot for slot in todo if not any(slot is r for r in ready)]
        if not rest:
            break
        # the next pass re-observes the partly pruned block: the next group alone (true_sequential), or every
        # remaining group within the Hessian memory budget
        stage = (set(rest[0].sites) if options.true_sequential
                 else _fit_budget(rest, planned) if planned is not None else None)
    try:
        for rel in selection.dense:
            reports.append(_prune_dense(block, rel, index, config, prefix))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return reports, observed_all


def _fit_budget(slots: list[_Slot], budget: int) -> set[Site]:
    """The matrices of the longest run of ``slots`` (in their order) whose fp32 Hessians fit in ``budget`` bytes (the
    first always)."""
    used, out = 0, set()
    for slot in slots:
        cols = slot.sites[0].out_in[1]
        if out and used + cols * cols * 4 > budget:
            break
        used += cols * cols * 4
        out.update(slot.sites)
    return out


def hessian_budget(setting, block) -> int | None:
    """Bytes of Hessians a block may hold at once: ``setting`` in bytes, or "auto": on CUDA, half of the device
    memory free when the block's turn comes (MoE blocks of hundreds of experts otherwise need tens of GB of them);
    on the CPU no limit."""
    if setting is None or isinstance(setting, int):
        return setting
    dev = device_of(block)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free // 2
    return None


def _layer_config(site: Site, n: int, H, config: PruneConfig, options: Options):
    """The method a matrix is pruned with: the run's, or for an expert with too few calibration tokens for a
    meaningful Hessian (fewer than ``expert_min_tokens``, default its input width), Wanda's mask and no update
    (magnitude when no token reached it). Returns (config, reason or None)."""
    if config.method == "magnitude" or site.expert is None:
        return config, None
    cols = site.out_in[1]
    least = cols if options.expert_min_tokens is None else options.expert_min_tokens
    if n >= least:
        return config, None
    if n == 0 or H is None:
        return config.replace(method="magnitude", mask=None, mask_scope=None), "no tokens: magnitude"
    return config.replace(method="wanda", mask=None, mask_scope=None), f"{n} tokens < {least}: wanda"


def _reduce_slot(slot: _Slot, comm) -> None:
    """Distributed: the group's Hessian summed over the ranks (every rank reduces every group in the same order; an
    expert this rank's tokens never reached joins with an empty Hessian (n = 0); one that no rank's tokens reached
    keeps none, and falls back in ``_layer_config``)."""
    if slot.H is None:
        cols = slot.sites[0].out_in[1]
        slot.H = torch.zeros(cols, cols, dtype=torch.float32, device=comm.device)
    if comm.sum_int(slot.n) == 0:
        slot.H, slot.n = None, 0
    else:
        slot.H, slot.n = comm.reduce_hessian(slot.H, slot.n)


def _prune_slot(block, index: int, slot: _Slot, wanted, config: PruneConfig, options: Options,
                prefix: str, comm=None) -> list[LayerReport]:
    """Prune the wanted matrices of one group: those on the run's method together (``prune_group``: one damped
    factor of the shared Hessian for all; with ``comm`` the group's rows split over the ranks, each calling
    ``prune_group`` on its share: ``distributed.solve_group``), the ones falling back alone (on every rank alike)."""
    params = dict(block.named_parameters())
    sites = [s for s in slot.sites if wanted(s)]
    H = slot.H
    for site in sites:
        if config.method != "magnitude" and H is not None and H.shape[0] != site.out_in[1]:
            raise RuntimeError(f"{prefix}{site.name}: Hessian is {H.shape[0]}x{H.shape[0]} but the matrix has "
                               f"{site.out_in[1]} input features")
    plans: dict = {}
    for site in sites:
        cfg, fallback = _layer_config(site, slot.n, H, config, options)
        plans.setdefault((cfg, fallback), []).append(site)
    out: dict[Site, LayerReport] = {}
    for (cfg, fallback), members in plans.items():
        t0 = time.perf_counter()
        views = [s.view(params) for s in members]
        Hc = H if cfg.method != "magnitude" else None
        if comm is None or fallback is not None:
            results = prune_group([v.detach().contiguous() for v in views], Hc, cfg)
        else:
            from ..distributed import solve_group
            results = solve_group(comm, [v.detach() for v in views], Hc, cfg)
        secs = (time.perf_counter() - t0) / len(members)
        if comm is not None:  # rank 0's seconds: every rank's report the same
            secs = comm.broadcast_object(secs)
        for site, view, result in zip(members, views, results):
            with torch.no_grad():
                view.copy_(result.weight.to(view.dtype))
            out[site] = LayerReport(f"{prefix}{site.name}", index, tuple(view.shape), float(result.loss),
                                    float((view == 0).float().mean()), secs, cfg.method, slot.n,
                                    fallback or result.fallback, _finite_or_none(result.damp), result.exchanges,
                                    result.exchange_s)
        del results
    return [out[s] for s in sites]


def _finite_or_none(x: float) -> float | None:
    return x if x == x else None


def _prune_dense(block, rel: str, index: int, config: PruneConfig, prefix: str) -> LayerReport:
    """A normally dense module (e.g. Mamba's depthwise conv1d), asked for by name: magnitude pruning of its weight
    viewed as (out, -1). Plain parameters (A_log, D, dt_bias) are not weights of a linear map and are refused."""
    try:
        target = get_submodule(block, rel)
    except Exception:  # noqa: BLE001 - the name is the user's
        raise ValueError(f"{prefix}{rel}: no such module in block {index} (--dense names a module relative to a "
                         "block, e.g. mixer.conv1d)") from None
    if not isinstance(target, torch.nn.Module) or getattr(target, "weight", None) is None:
        raise ValueError(f"{prefix}{rel} is a plain parameter, not a weight matrix; pyprune only prunes modules "
                         "with a weight (e.g. mixer.conv1d)")
    if isinstance(target, torch.nn.Linear):
        raise ValueError(f"{prefix}{rel} is a linear module, not one of the dense-by-default parts (norms, "
                         "convolutions); select linear modules with modules=...")
    t0 = time.perf_counter()
    w = target.weight
    W = w.detach().reshape(w.shape[0], -1)
    cfg = config.replace(method="magnitude", mask=None, mask_scope=None)
    if cfg.sparsity.structured and W.shape[1] % cfg.sparsity.m:
        raise ValueError(f"{prefix}{rel}: {W.shape[1]} columns is not a multiple of M={cfg.sparsity.m}")
    result = prune_layer(W.contiguous(), None, cfg)
    with torch.no_grad():
        w.copy_(result.weight.reshape(w.shape).to(w.dtype))
    return LayerReport(f"{prefix}{rel}", index, tuple(W.shape), float(result.loss), float((w == 0).float().mean()),
                       time.perf_counter() - t0, "magnitude", 0)


def _bar(total, desc, leave=True):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=leave, unit="module" if not leave else "block", dynamic_ncols=True)


def resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r} (expected cpu, cuda, cuda:N or auto): {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available (torch {torch.__version__})")
    return device


def settings_dict(config: PruneConfig, **extra) -> dict:
    return {**config.settings(), **extra}


class MoveNonBlock:
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


# ------------------------------------------------------------------------------------------------- the loop
class BlockStore:
    """Where blocks live between their turns. In memory: on their home device, moved to the compute device for their
    turn (this class). Streamed: read from the input shards and written to the output ones
    (``streaming._ShardStore``)."""

    def __init__(self, blocks: torch.nn.ModuleList, device: torch.device):
        self.blocks, self.device = blocks, device
        self.homes: dict[int, torch.device] = {}

    def load(self, i: int) -> torch.nn.Module:
        block = self.blocks[i]
        home = device_of(block)
        self.homes[i] = home
        if home != self.device:
            block.to(self.device)
        return block

    def done(self, i: int, block: torch.nn.Module, inputs: BlockInputs, reports: list[LayerReport]) -> None:
        home = self.homes.pop(i)
        if home != self.device:
            block.to(home)

    def skip(self, i: int) -> None:
        """Block ``i`` lies past the last block to prune: nothing to do in memory."""


def kept_matrices(block: torch.nn.Module, index: int, obs: Observed, prefix: str,
                  pruned: set[str]) -> list[DenseMatrix]:
    """The matrices of an observed block that stay dense, with why and the zeros they hold: what ``classify`` kept
    (routers, gates, parameters shared with an earlier block) and the prunable ones the selection left out."""
    params = dict(block.named_parameters())
    out = []
    for name, site in obs.kept.items():
        view = site.view(params)
        out.append(DenseMatrix(f"{prefix}{name}", index, tuple(site.out_in), float((view == 0).float().mean()),
                               obs.dense[name], counted=not obs.dense[name].startswith("shared with")))
    for slot in obs.slots:
        for site in slot.sites:
            if f"{prefix}{site.name}" not in pruned:
                view = site.view(params)
                out.append(DenseMatrix(f"{prefix}{site.name}", index, tuple(site.out_in),
                                       float((view == 0).float().mean()), "not selected (modules)"))
    return out


def outside_matrices(model: torch.nn.Module, blocks: torch.nn.ModuleList) -> list[DenseMatrix]:
    """The weight matrices outside the decoder blocks (embeddings, LM head): never pruned."""
    inside = {id(p) for p in blocks.parameters()}
    return [DenseMatrix(n, None, tuple(p.shape), None, "outside the blocks", counted=False)
            for n, p in model.named_parameters() if id(p) not in inside and p.dim() >= 2]


def run_settings(config: PruneConfig, *, model_type, blocks_path: str, batches: list[torch.Tensor], device,
                 selection: Selection, options: Options, batch_size: int, comm=None, streaming: bool = False,
                 **extra) -> dict:
    """The settings a report records, the same for every way of running (in memory, streamed, distributed); the
    streamed resume fingerprint is made from them too."""
    nsamples = sum(b.shape[0] for b in batches)
    return settings_dict(config, model_type=model_type, blocks_path=blocks_path,
                         nsamples=nsamples if comm is None else comm.sum_int(nsamples),
                         seqlen=int(batches[0].shape[1]) if batches else 0, device=str(device),
                         modules=list(selection.modules) if selection.modules else None,
                         dense=list(selection.dense), blocks=sorted(selection.blocks) if selection.blocks else None,
                         true_sequential=options.true_sequential, calibrate_all_experts=options.calibrate_all_experts,
                         expert_min_tokens=options.expert_min_tokens, hessian_budget=options.hessian_budget,
                         batch_size=batch_size, streaming=streaming,
                         **({} if comm is None else {"world_size": comm.world_size}), **extra)


def walk_blocks(blocks: torch.nn.ModuleList, inputs: BlockInputs, store: BlockStore, step, *, start: int = 0,
                last: int | None = None, advance: bool = True, progress: bool = False, on_block_done=None,
                layers: list[LayerReport] | None = None, desc: str = "blocks") -> list[LayerReport]:
    """The one block loop of every run (prune in memory, streamed, distributed; inspect; the OWL pre-pass): for
    blocks ``start..`` load (``store``), ``step(i, block, inputs)`` (prune it, or observe it: returns its layer
    reports), compute the next block's inputs (``advance``), hand it back (``store.done``). Blocks past ``last`` are
    ``store.skip``-ped. ``layers`` receives each block's layer reports before ``store.done``. ``desc``: the progress
    bar's label."""
    layers = [] if layers is None else layers
    last = len(blocks) - 1 if last is None else last
    outer = _bar(len(blocks), desc) if progress else None
    if outer is not None:
        outer.update(start)
    try:
        for i in range(start, len(blocks)):
            if i > last:
                store.skip(i)
                if outer is not None:
                    outer.update(1)
                continue
            block = store.load(i)
            new = step(i, block, inputs)
            if advance and i < last and inputs.hidden:
                inputs.hidden = run_block_all(block, inputs, i)
            layers += new
            store.done(i, block, inputs, new)
            if on_block_done is not None:
                on_block_done(i, new)
            if outer is not None:
                outer.update(1)
    finally:
        if outer is not None:
            outer.close()
    return layers


def run_blocks(blocks: torch.nn.ModuleList, path: str, inputs: BlockInputs, config: PruneConfig,
               selection: Selection, options: Options, store: BlockStore, *, start: int = 0, last: int,
               comm=None, on_block_done=None, layers: list[LayerReport] | None = None,
               dense: list[DenseMatrix] | None = None, sparsities: dict[int, float] | None = None
               ) -> list[LayerReport]:
    """A prune's walk over the blocks (``walk_blocks``) with the prune step: each block's weights checked finite, a
    selected block pruned (``prune_block``). ``layers`` and ``dense`` receive each pruned block's layer reports and
    kept matrices before ``store.done``. ``sparsities``: a block's own target fraction (a sparsity profile's
    allocation, ``outlier_pass``) by block index; blocks not in it, and every block without it, get ``config``'s."""
    dense = [] if dense is None else dense
    sparsities = sparsities or {}
    shared = PrunedParams()
    checked = False

    def prune_step(i: int, block: torch.nn.Module, inputs: BlockInputs) -> list[LayerReport]:
        nonlocal checked
        check_finite(block, f"{path}.{i}")
        if not selection.wants_block(i):
            return []
        cfg = config if i not in sparsities else block_config(config, sparsities[i])
        new, obs = prune_block(block, i, inputs, cfg, selection, options, prefix=f"{path}.{i}.", comm=comm,
                               shared=shared, check_patterns=not checked)
        checked = True
        names = {r.name for r in new}
        params = dict(block.named_parameters())
        for slot in obs.slots:
            for s in slot.sites:
                if f"{path}.{i}.{s.name}" in names:
                    shared.add(params[s.param], f"block {i}")
        dense.extend(kept_matrices(block, i, obs, f"{path}.{i}.", names))
        return new

    return walk_blocks(blocks, inputs, store, prune_step, start=start, last=last, progress=options.progress,
                       on_block_done=on_block_done, layers=layers)


def block_config(config: PruneConfig, fraction: float) -> PruneConfig:
    """``config`` with the unstructured target ``fraction`` and every other choice as given (``PruneConfig.replace``
    alone would re-derive mask, mask scope, exchanges and shrink)."""
    return config.replace(sparsity=Sparsity(fraction), mask=config.mask, mask_scope=config.mask_scope,
                          swaps=config.swaps, shrink=config.shrink)


def outlier_pass(blocks: torch.nn.ModuleList, path: str, inputs: BlockInputs, plan: "RunPlan",
                 store: BlockStore) -> dict:
    """The sparsity profile's pre-pass (``plan.profile``, OWL: ``pyprune.owl``): walk the blocks with their dense
    weights, each selected block observed over the calibration batches for the L2 norms of its matrices' input
    columns alone (``observe_block(diagonal=True)``: no Hessian), its outlier ratio computed, the next block's inputs
    from the dense block; then every selected block's sparsity allocated (``owl.allocate``, weighted by the blocks'
    prunable weights, so the pruned matrices together hold the target). ``inputs`` is left as it was, for the prune
    that follows. With ``plan.comm`` the norms are summed over the ranks. Returns the record the report keeps:
    {"name", "m", "lambda", "target", "blocks": [{"block", "outlier_ratio", "weights", "sparsity"}, ...]}."""
    profile, selection, comm = plan.profile, plan.selection, plan.comm
    work = BlockInputs(list(inputs.hidden), inputs.calls, inputs.output_format)
    shared = PrunedParams()
    rows: list[dict] = []

    def step(i: int, block: torch.nn.Module, inp: BlockInputs) -> list[LayerReport]:
        check_finite(block, f"{path}.{i}")
        if not selection.wants_block(i):
            return []
        prefix = f"{path}.{i}."

        def wanted(site: Site) -> bool:
            return selection.wants(site.name, f"{prefix}{site.name}")

        obs = observe_block(block, inp, i, backend=plan.config.backend, shared=shared, collect=wanted,
                            diagonal=True)
        sites = [(slot, s) for slot in obs.slots for s in slot.sites if wanted(s)]
        squares = {s.name: (slot.H.cpu() if slot.H is not None else None) for slot, s in sites}
        if comm is not None:  # every rank's tokens (an expert one rank's tokens missed: the others')
            total: dict[str, torch.Tensor | None] = dict.fromkeys(squares)
            for part in comm.all_gather_object(squares):
                for name, sq in part.items():
                    if sq is not None:
                        total[name] = sq if total.get(name) is None else total[name] + sq
            squares = total
        params = dict(block.named_parameters())
        weights, norms = [], []
        for slot, s in sites:
            w = s.view(params).detach()
            sq = squares[s.name]
            weights.append(w)
            norms.append(torch.zeros(w.shape[1], dtype=torch.float64) if sq is None else sq.sqrt())
            shared.add(params[s.param], f"block {i}")
        if weights:
            rows.append({"block": i, "outlier_ratio": outlier_ratio(weights, norms, profile.m),
                         "weights": sum(w.numel() for w in weights)})
        return []

    walk_blocks(blocks, work, store, step, last=plan.last, progress=plan.options.progress, desc="outliers")
    if not rows:
        raise ValueError("sparsity_profile: no block has a prunable matrix to allocate sparsity to")
    fractions = allocate([r["outlier_ratio"] for r in rows], plan.config.sparsity.fraction, profile.lam,
                         sizes=[r["weights"] for r in rows])
    for r, f in zip(rows, fractions):
        r["sparsity"] = f
    return {"name": profile.name, "m": profile.m, "lambda": profile.lam, "target": plan.config.sparsity.fraction,
            "blocks": rows}


def profile_sparsities(record: dict | None) -> dict[int, float] | None:
    """Block index -> target fraction from ``outlier_pass``'s record (None: no profile)."""
    return None if record is None else {int(r["block"]): float(r["sparsity"]) for r in record["blocks"]}


def nonfinite_params(module: torch.nn.Module, skip: set[int] | None = None) -> list[str]:
    """Names of the floating-point parameters of ``module`` (not on meta, not in ``skip`` by id) holding NaN or Inf."""
    return [name for name, p in module.named_parameters()
            if p.is_floating_point() and p.device.type != "meta" and (skip is None or id(p) not in skip)
            and not all_finite(p)]


def _damaged(names: list[str], prefix: str = "") -> ValueError:
    return ValueError(f"{prefix}{names[0]} holds NaN or Inf values: the model's weights are damaged (check the "
                      "checkpoint file that holds it)")


def check_finite(module: torch.nn.Module, prefix: str) -> None:
    """Refuse NaN/Inf in a block's weights before its turn, naming the parameter (otherwise it would surface as
    'the activations contain NaN' in a later block, or be written into the output)."""
    bad = nonfinite_params(module)
    if bad:
        raise _damaged(bad, f"{prefix}.")


def check_inputs_finite(inputs: BlockInputs, model, blocks: torch.nn.ModuleList) -> None:
    """The weights outside the blocks (embeddings, LM head, final norm) and the hidden states entering block 0 must be
    finite; the error names the parameter."""
    bad = nonfinite_params(model, skip={id(p) for p in blocks.parameters()})
    if bad:
        raise _damaged(bad)
    for h in inputs.hidden:
        if not all_finite(h):
            raise ValueError("the hidden states entering the first block hold NaN or Inf values (the embeddings' "
                             "output overflows its dtype?)")


def synthetic_batches(model) -> list[torch.Tensor]:
    """One short batch of token ids for a discovery-only forward pass (magnitude pruning without calibration)."""
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    return [torch.arange(SYNTHETIC_TOKENS).remainder(vocab).reshape(1, -1)]


@dataclass(frozen=True)
class RunPlan:
    """One run, built and checked once before any slow work (``plan_run``): what ``prune_model`` and
    ``streaming.prune_checkpoint`` both execute with ``run_blocks``, differing only in where blocks come from and go to
    (the ``BlockStore``). The report's settings and the streamed resume fingerprint derive from it."""

    config: PruneConfig
    selection: Selection
    options: Options
    batches: tuple[torch.Tensor, ...]
    device: torch.device
    comm: object
    blocks_path: str
    num_blocks: int
    last: int                                        # the last block to prune (the loop stops after it)
    settings: dict = field(compare=False, hash=False)
    labels: tuple[str, ...] = ()                     # settings that only label the report (e.g. the text's name)
    profile: SparsityProfile | None = None           # a per-block sparsity allocation (``outlier_pass``)

    def fingerprint_settings(self) -> dict:
        """The settings a streamed run's resume fingerprint is made from: all but the device (a run may resume on
        another one) and the labels (they describe the calibration, whose tokens the fingerprint holds)."""
        return {k: v for k, v in self.settings.items() if k != "device" and k not in self.labels}


def check_float_weights(block_list: torch.nn.ModuleList, path: str) -> None:
    """The blocks' parameters must be float weights pyprune can prune and update: a quantized model in memory (FP8
    weights of transformers' FP8Linear on a GPU, packed integers of GPTQ/AWQ/bitsandbytes layers) raises
    ``UnsupportedModelError`` naming the parameter and the fix, before any work."""
    from .discover import UnsupportedModelError
    for name, p in block_list.named_parameters():
        if p.is_floating_point() and p.element_size() >= 2:
            continue
        raise UnsupportedModelError(
            f"{path}.{name} holds {p.dtype} values: the model's weights are quantized in memory, and pyprune prunes "
            "float weights. Load the model dequantized (for FP8: quantization_config=FineGrainedFP8Config("
            "dequantize=True)), or give pyprune the checkpoint directory: it prunes an FP8 checkpoint streamed and "
            "writes it back in FP8")


def plan_run(model, calibration, config: PruneConfig | None = None, *, modules=None, dense=None, blocks=None,
             device=None, batch_size: int | None = None, true_sequential: bool = False,
             calibrate_all_experts: bool = False, expert_min_tokens: int | None = None,
             hessian_budget: int | str | None = "auto", progress: bool = False, comm=None, streaming: bool = False,
             labels: dict | None = None, sparsity_profile: str | None = None, owl_m: float | None = None,
             owl_lambda: float | None = None, **extra_settings) -> RunPlan:
    """Check a run's choices against ``model`` (loaded, or on the meta device: nothing is run) and freeze them:
    selection, device, calibration batches (token ids, windows no longer than the model's positions), options, the
    sparsity profile (``owl.make_profile``) and the settings the report records (``extra_settings`` and ``labels``
    among them: the labels, e.g. the calibration text's name and seed, are left out of the resume fingerprint).
    Raises ``ValueError`` naming the option at fault."""
    labels = dict(labels or {})
    config = PruneConfig() if config is None else config
    profile = make_profile(sparsity_profile, config.sparsity, owl_m, owl_lambda)
    path, block_list = find_blocks(model)
    check_float_weights(block_list, path)
    selection = make_selection(modules, dense, blocks, len(block_list))
    device = resolve_device(comm.device if comm is not None and device is None else device)
    batches = as_batches(calibration, batch_size)
    # the report records the windows per pass (the same on every rank: a rank's shard may have fewer windows)
    batch_size = windows_per_batch(batch_size, int(batches[0].shape[1]) if batches else TOKENS_PER_FORWARD)
    if not batches and config.method != "magnitude":
        raise ValueError(f"method {config.method!r} needs calibration data (token ids)")
    if not batches and profile is not None:
        raise ValueError(f"sparsity_profile={profile.name!r} weighs the weights by their inputs' norms over the "
                         "calibration tokens: it needs calibration data (token ids), also with method 'magnitude'")
    if batches and getattr(model, "config", None) is not None:
        from .io import check_seqlen
        check_seqlen(model.config, int(batches[0].shape[1]), "the calibration window length")
    if comm is not None and not comm.is_main:
        progress = False
    options = Options(true_sequential, calibrate_all_experts, expert_min_tokens, progress, hessian_budget)
    last = max(selection.blocks) if selection.blocks is not None else len(block_list) - 1
    settings = run_settings(config, model_type=getattr(getattr(model, "config", None), "model_type", None),
                            blocks_path=path, batches=batches, device=device, selection=selection, options=options,
                            batch_size=batch_size, comm=comm, streaming=streaming,
                            **(profile.settings() if profile is not None else {}), **{**extra_settings, **labels})
    return RunPlan(config, selection, options, tuple(batches), device, comm, path, len(block_list), last, settings,
                   tuple(labels), profile)


def prune_model(model, calibration, config: PruneConfig | None = None, *, modules: Sequence[str] | None = None,
                dense: Sequence[str] | None = None, blocks: Iterable[int] | None = None, device=None,
                batch_size: int | None = None, true_sequential: bool = False, calibrate_all_experts: bool = False,
                expert_min_tokens: int | None = None, hessian_budget: int | str | None = "auto",
                progress: bool = False, on_block_done: Callable[[int, list[LayerReport]], None] | None = None,
                comm=None, labels: dict | None = None, sparsity_profile: str | None = None,
                owl_m: float | None = None, owl_lambda: float | None = None) -> PruneReport:
    """Prune a transformers causal LM in place, one decoder block at a time, and return a ``PruneReport``.

    model:        any ``*ForCausalLM`` (decoder-only) that transformers builds: its blocks, their weight matrices and
                  which of them share an input are observed (``pyprune.models.discover``). Its weights may live on
                  the CPU: each block is moved to ``device`` in turn and back.
    calibration:  token ids: a (nsamples, seqlen) LongTensor or a list of equal-length 1-D tensors. May be None only
                  for ``method="magnitude"`` (losses are then NaN).
    config:       the per-layer settings (method, sparsity, block size, damping, mask, backend).
    modules:      fnmatch patterns of matrices to prune (relative to a block, e.g. "mlp.*", or full names); default
                  every prunable matrix.
    dense:        normally dense parts to prune as well (by magnitude), e.g. ("mixer.conv1d",) for Mamba.
    blocks:       indices of the blocks to prune (default all); the loop stops after the last one.
    device:       where each block, its Hessians and the activations live while it is pruned (default CUDA when
                  available).
    batch_size:   calibration windows per forward pass; None: as many as make at most 2048 tokens
                  (``TOKENS_PER_FORWARD``), at least one.
    true_sequential: prune the groups of a block one after the other, re-collecting each group's Hessian from the
                  partly pruned block (more forward passes).
    calibrate_all_experts: MoE: every expert's Hessian from every token (its routed outputs stay exact), instead of
                  the tokens its router sends it.
    expert_min_tokens: MoE: an expert with fewer calibration tokens than this (default: its input width) gets Wanda's
                  mask and no update (magnitude with no token); the report says so.
    hessian_budget: bytes of Hessians a block may hold at once ("auto": half the free device memory on CUDA, no
                  limit on the CPU; None: no limit). Groups beyond it are collected in further passes over the
                  block, after the earlier ones are pruned (as true_sequential does); a MoE block of hundreds of
                  experts needs this. With ``comm`` the least of the ranks' budgets, the passes planned alike on
                  every rank.
    on_block_done: called as ``f(block_index, layer_reports)`` after each block.
    comm:         a ``pyprune.distributed.Comm`` to prune on several ranks (torchrun): every rank calls this with the
                  same model and its own calibration shard; all ranks end with identical weights and reports.
    labels:       further settings for the report to record as given (e.g. the source, the calibration text's name).
    sparsity_profile: None (every block at ``config``'s sparsity) or "owl": each block its own unstructured fraction
                  by its outlier ratio (OWL, Yin et al. 2024; ``pyprune.owl``): a pre-pass over the dense blocks
                  collects the input column norms, blocks with more outliers of Wanda's score (above ``owl_m``
                  times the block's mean, default 5) are pruned less, the fractions spread over about
                  +-``owl_lambda`` (default 0.08) around the target with their mean weighted by the blocks' prunable
                  weights equal to it. The report's ``profile`` records each block's ratio and target.

    If a block fails, the blocks before it are pruned and the failing one may be partly pruned; the error says which.
    """
    plan = plan_run(model, calibration, config, modules=modules, dense=dense, blocks=blocks, device=device,
                    batch_size=batch_size, true_sequential=true_sequential,
                    calibrate_all_experts=calibrate_all_experts, expert_min_tokens=expert_min_tokens,
                    hessian_budget=hessian_budget, progress=progress, comm=comm, labels=labels,
                    sparsity_profile=sparsity_profile, owl_m=owl_m, owl_lambda=owl_lambda)
    path, block_list = find_blocks(model)
    device = plan.device

    reset_host_peak_rss()
    reset_device_peak_memory(device)
    t_start = time.perf_counter()
    was_training = model.training
    model.eval()
    times = {}
    try:
        with eager_experts(model):
            t0 = time.perf_counter()
            with MoveNonBlock(model, block_list, device):
                inputs = capture_inputs(model, block_list, list(plan.batches) or synthetic_batches(model), device)
            check_inputs_finite(inputs, model, block_list)
            times["capture"] = time.perf_counter() - t0
            profile = None
            if plan.profile is not None:
                t0 = time.perf_counter()
                profile = outlier_pass(block_list, path, inputs, plan, BlockStore(block_list, device))
                times["outliers"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            layers, dense = [], []
            try:
                run_blocks(block_list, path, inputs, plan.config, plan.selection, plan.options,
                           BlockStore(block_list, device), last=plan.last, comm=comm, on_block_done=on_block_done,
                           layers=layers, dense=dense, sparsities=profile_sparsities(profile))
            except Exception as e:
                done = sorted({r.block for r in layers})
                e.add_note(f"pyprune: blocks {done[0]}-{done[-1]} of {path} were pruned before this error; the "
                           "model is partly pruned" if done else "pyprune: no block was pruned before this error")
                raise
            times["prune"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    times["total"] = time.perf_counter() - t_start
    return PruneReport(dict(plan.settings), layers, times, device_peak_memory(device), host_peak_rss(), plan.last + 1,
                       dense, outside_matrices(model, block_list), profile)


def device_of(module: torch.nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
