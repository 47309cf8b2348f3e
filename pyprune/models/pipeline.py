"""Model path in, pruned model directory out: the whole job as the CLI runs it, for library users too.

``prune_pretrained`` decides between pruning in memory (load, ``prune_model``, ``save_model``) and streaming from
the safetensors shards (``prune_checkpoint``), by the size of the weights against the memory available.
``inspect_model`` shows what a run would prune, without calibration text.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..config import PruneConfig
from ..report import PruneReport

STREAM_CHOICES = ("auto", "on", "off")


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def should_stream(source, stream: str = "auto", copies: int = 1) -> bool:
    """Whether a run streams the checkpoint block by block: ``on``/``off`` as asked (``on`` needs an HF directory
    with safetensors shards); ``auto`` when the weights times ``copies`` (processes on this machine that each hold
    the model) exceed half of the available memory."""
    from .io import ModelSource
    if stream not in STREAM_CHOICES:
        raise ValueError(f"stream must be one of {', '.join(STREAM_CHOICES)}, got {stream!r}")
    if not isinstance(source, ModelSource) or source.kind != "hf" or stream == "off":
        if stream == "on":
            raise ValueError("stream='on' (--stream on) needs a Hugging Face directory with safetensors shards")
        return False
    if stream == "on":
        return True
    from .streaming import checkpoint_bytes
    try:
        size = checkpoint_bytes(source.path)
    except FileNotFoundError:
        return False
    available = mem_available()
    return available is not None and size * copies > available // 2


def prune_pretrained(model: str, out: str, calibration, config: PruneConfig | None = None, *,
                     stream: str = "auto", tokenizer=None, dtype=None, overwrite: bool = False, resume: bool = True,
                     copies: int = 1, **kwargs) -> PruneReport:
    """Prune the model at ``model`` (HF directory, .gguf file or "builtin") into the directory ``out`` and return
    the report (also written there as ``pyprune_report.json``). ``stream``: "auto" | "on" | "off" (see
    ``should_stream``); ``tokenizer`` is saved with the model when given (streamed runs copy the input's tokenizer
    files); ``dtype`` the dtype to load in (in-memory runs); ``overwrite``/``resume`` as ``save_model`` /
    ``prune_checkpoint``; other keyword arguments go to ``prune_model`` / ``prune_checkpoint`` (modules, dense,
    blocks, device, batch_size, true_sequential, calibrate_all_experts, expert_min_tokens, progress, comm)."""
    from .io import check_supported, load_model, prepare_output_dir, resolve_model, save_model
    from .outdir import check_output_vs_input
    source = resolve_model(model)
    check_output_vs_input(out, str(source))
    check_supported(source)
    comm = kwargs.get("comm")
    main = comm is None or comm.is_main
    if should_stream(source, stream, copies):
        from .streaming import prune_checkpoint
        return prune_checkpoint(source.path, out, calibration, config, resume=resume, overwrite=overwrite, **kwargs)
    if main:
        prepare_output_dir(os.path.abspath(out), overwrite=overwrite, input_path=str(source))
    from .driver import prune_model
    import time
    t0 = time.perf_counter()
    loaded = load_model(source, dtype=dtype)
    t_load = time.perf_counter() - t0
    report = prune_model(loaded, calibration, config, **kwargs)
    report.settings.update(source=str(source))
    report.times = {"load": t_load, **report.times}
    if main:
        t0 = time.perf_counter()
        saved = save_model(loaded, out, tokenizer=tokenizer, report=report, overwrite=overwrite,
                           input_path=str(source))
        report.times["save"] = time.perf_counter() - t0
        report.settings["replaced_files"] = list(saved.removed)
        report.save(os.path.join(os.path.abspath(out), "pyprune_report.json"))
    return report


# ---------------------------------------------------------------------------------------------------- inspect
@dataclass
class BlockView:
    index: int
    kind: str                                   # the block's class
    groups: list[list[tuple[str, tuple[int, int]]]] = field(default_factory=list)  # shared-Hessian groups
    dense: dict[str, str] = field(default_factory=dict)
    experts: int = 0


@dataclass
class Inspection:
    model_type: str
    blocks_path: str
    blocks: list[BlockView]
    outside: list[tuple[str, tuple[int, ...]]]  # parameters outside the blocks (dense)

    def table(self, full: bool = False) -> str:
        """Blocks with their prunable matrices (shape as out x in), shared-Hessian groups in brackets, and what stays
        dense. Runs of identical blocks are folded unless ``full``."""
        lines = [f"model type {self.model_type}: {len(self.blocks)} blocks at {self.blocks_path}"]
        runs: list[list] = []  # [first index, block, last index]
        for b in self.blocks:
            if not full and runs and (runs[-1][1].kind, _signature(runs[-1][1])) == (b.kind, _signature(b)):
                runs[-1][2] = b.index
            else:
                runs.append([b.index, b, b.index])
        for start, b, end in runs:
            label = f"block {start}" if end == start else f"blocks {start}-{end}"
            lines.append(f"{label} ({b.kind}){f', {b.experts} experts' if b.experts else ''}:")
            for g in _folded_groups(b.groups):
                lines.append("  " + g)
            for name, why in sorted(b.dense.items()):
                lines.append(f"  dense: {name} ({why})")
        lines.append("outside the blocks (dense): " + ", ".join(f"{n} {'x'.join(map(str, s))}"
                                                               for n, s in self.outside))
        total = sum(r * c for b in self.blocks for g in b.groups for _, (r, c) in g)
        lines.append(f"prunable weights: {total:,} in {sum(len(g) for b in self.blocks for g in b.groups)} "
                     "matrices")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, "blocks_path": self.blocks_path,
                "blocks": [{"index": b.index, "kind": b.kind, "experts": b.experts, "dense": b.dense,
                            "groups": [[{"name": n, "shape": list(s)} for n, s in g] for g in b.groups]}
                           for b in self.blocks],
                "outside": [{"name": n, "shape": list(s)} for n, s in self.outside]}


def _signature(b: BlockView):
    return (tuple(tuple(g) for g in b.groups), tuple(sorted(b.dense.items())), b.experts)


def _folded_groups(groups) -> list[str]:
    """One line per shared-Hessian group; the groups of experts 1..E-1 folded into expert 0's line."""
    out, experts = [], {}
    for g in groups:
        names = [n for n, _ in g]
        if all("[" in n for n in names):
            key = tuple(n.split("[")[0] for n in names)
            if key in experts:
                experts[key][1] += 1
                continue
            experts[key] = [len(out), 1, g]
            out.append(None)
            continue
        out.append("[" + ", ".join(f"{n} {r}x{c}" for n, (r, c) in g) + "]")
    for key, (pos, count, g) in experts.items():
        one = ", ".join(f"{n.split('[')[0]}[e] {r}x{c}" for n, (r, c) in g)
        out[pos] = f"[{one}] for each of {count} experts (own Hessian each)"
    return out


def matrix_views(model, *, device=None) -> dict[str, torch.Tensor]:
    """Every prunable matrix of a loaded model by its report name (``model.layers.0.mlp.experts.down_proj[3]``), as
    an (out_features, in_features) view into the model's weights: what a run prunes, found the way it finds them."""
    return _observe_all(model, device, views=True)


def inspect_model(model, *, device=None) -> Inspection:
    """What ``prune_model`` would prune in ``model`` (a loaded model, or a path / "builtin" that is loaded): every
    block is run once on a short synthetic batch, every expert on every token, under the same observer the pruning
    run uses; no Hessian is collected and nothing is changed."""
    if isinstance(model, (str, os.PathLike)):
        from .io import check_supported, load_model, resolve_model
        source = resolve_model(model)
        if source.kind == "hf":  # a GGUF file's metadata costs about what loading it does (10 s of 30 s, builtin)
            check_supported(source)
        model = load_model(source)
    return _observe_all(model, device, views=False)


def _observe_all(model, device, views: bool):
    """Observe every block once (see ``inspect_model``); the matrices as views, or an ``Inspection``."""
    from .capture import capture_inputs, run_block_all
    from .discover import PrunedParams, eager_experts, find_blocks
    from .driver import BlockStore, MoveNonBlock, observe_block, resolve_device, synthetic_batches
    device = resolve_device(device)
    found: dict[str, torch.Tensor] = {}
    path, blocks = find_blocks(model)
    rows = []
    with torch.no_grad(), eager_experts(model):
        with MoveNonBlock(model, blocks, device):
            inputs = capture_inputs(model, blocks, synthetic_batches(model), device)
        store = BlockStore(blocks, device)
        shared = PrunedParams()
        for i in range(len(blocks)):
            block = store.load(i)
            obs = observe_block(block, inputs, i, all_experts=True, shared=shared)
            params = dict(block.named_parameters())
            for slot in obs.slots:
                for s in slot.sites:
                    shared.add(params[s.param], f"block {i}")
                    if views:
                        found[f"{path}.{i}.{s.name}"] = s.view(params)
            rows.append(BlockView(i, type(block).__name__,
                                   [[(s.name, s.out_in) for s in slot.sites] for slot in obs.slots],
                                   dict(obs.dense), obs.experts))
            if i + 1 < len(blocks):
                inputs.hidden = run_block_all(block, inputs, i)
            store.done(i, block, inputs, [])
    if views:
        return found
    inside = {id(p) for p in blocks.parameters()}
    outside = [(n, tuple(p.shape)) for n, p in model.named_parameters() if id(p) not in inside]
    return Inspection(getattr(model.config, "model_type", "?"), path, rows, outside)


__all__ = ["Inspection", "inspect_model", "matrix_views", "mem_available", "prune_pretrained", "should_stream"]
