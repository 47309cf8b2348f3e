"""Model path in, pruned model directory out: the whole job as the CLI runs it, for library users too.

``prune_pretrained`` decides between pruning in memory (load, ``prune_model``, ``save_model``) and streaming from
the safetensors shards (``prune_checkpoint``), by the size of the weights against the memory available.
``inspect_model`` shows what a run would prune, without calibration text.
"""
from __future__ import annotations

import contextlib
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


def causal_lm_is_a_part(source) -> bool:
    """Whether the causal LM transformers loads from the checkpoint ``source`` (a ``ModelSource``) is only a part of
    it: its class reads another config type than the checkpoint's (a multimodal Llama 4 or Qwen 3.5 loads as its text
    model), so an in-memory run would write the text model alone. The config is ``io.model_config``'s."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    from .io import model_config
    try:
        cfg = model_config(source)
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]
    except Exception:  # noqa: BLE001 - not a checkpoint pyprune can build: the loader reports it
        return False
    return getattr(cls.config_class, "model_type", cfg.model_type) != cfg.model_type


def should_stream(source, stream: str = "auto", copies: int = 1) -> bool:
    """Whether a run streams the checkpoint block by block: ``on``/``off`` as asked (``on`` needs an HF directory
    with safetensors shards); ``auto`` when the weights times ``copies`` (processes on this machine that each hold
    the model) exceed half of the available memory, or when the causal LM is only a part of the checkpoint
    (``causal_lm_is_a_part``): streaming writes the whole checkpoint back, the parts it does not prune as they were;
    always for an FP8 checkpoint (``fp8.weight_format``; ``off`` is refused), whose pruned weights it writes back in
    FP8. Other quantized checkpoints raise ``UnsupportedModelError``."""
    from .io import ModelSource
    if stream not in STREAM_CHOICES:
        raise ValueError(f"stream must be one of {', '.join(STREAM_CHOICES)}, got {stream!r}")
    if isinstance(source, ModelSource) and source.kind == "hf":
        from .fp8 import weight_format
        from .io import model_config
        fp8 = weight_format(model_config(source), source.path)  # other quantized formats: refused here
        if fp8 is not None:  # FP8: streamed, which writes the pruned weights back in FP8
            if stream == "off":
                raise ValueError(f"{source.path}: the checkpoint's weights are {fp8.describe()}; pyprune prunes such "
                                 "a checkpoint streamed (each block dequantized, pruned and written back in FP8), "
                                 "so stream='off' (--stream off) cannot be used with it")
            return True
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
    if causal_lm_is_a_part(source):
        return True
    available = mem_available()
    return available is not None and size * copies > available // 2


def prune_pretrained(model: str, out, calibration, config: PruneConfig | None = None, *,
                     stream: str = "auto", tokenizer=None, dtype=None, overwrite: bool = False, resume: bool = True,
                     copies: int = 1, labels: dict | None = None, times: dict | None = None,
                     **kwargs) -> PruneReport:
    """Prune the model at ``model`` (HF directory, .gguf file or "builtin") into the directory ``out`` and return
    the report (also written there as ``pyprune_report.json``, once, complete). ``stream``: "auto" | "on" | "off"
    (see ``should_stream``); ``tokenizer`` is saved with the model when given (streamed runs copy the input's
    tokenizer files); ``dtype`` the dtype to load in (in-memory runs); ``overwrite``/``resume`` as ``save_model`` /
    ``prune_checkpoint``; ``labels``: further settings the report records as given (e.g. the calibration text's
    name and seed); ``times``: seconds spent before the call (e.g. tokenizing), first among the report's times.
    ``out`` may be an ``outdir.OutputDir`` already checked against the input (not yet prepared). Other keyword
    arguments go to ``prune_model`` / ``prune_checkpoint`` (modules, dense, blocks, device, batch_size,
    true_sequential, calibrate_all_experts, expert_min_tokens, progress, comm, sparsity_profile, owl_m,
    owl_lambda)."""
    from ..owl import make_profile
    from .io import check_supported, load_model, resolve_model, save_model
    from .outdir import OutputDir
    # the profile's options fail before the model loads (plan_run checks them again against the model)
    make_profile(kwargs.get("sparsity_profile"), (config or PruneConfig()).sparsity, kwargs.get("owl_m"),
                 kwargs.get("owl_lambda"))
    source = resolve_model(model)
    od = out if isinstance(out, OutputDir) else OutputDir(out, input_path=str(source))  # checks it, once
    check_supported(source)
    comm = kwargs.get("comm")
    main = comm is None or comm.is_main
    if should_stream(source, stream, copies):
        from .streaming import prune_checkpoint
        return prune_checkpoint(source.path, od, calibration, config, resume=resume, overwrite=overwrite,
                                labels=labels, times=times, **kwargs)
    if main:
        od.check(overwrite)
    from .driver import prune_model
    import time
    t0 = time.perf_counter()
    loaded = load_model(source, dtype=dtype)
    t_load = time.perf_counter() - t0
    report = prune_model(loaded, calibration, config, labels={"source": str(source), **(labels or {})}, **kwargs)
    report.times = {**(times or {}), "load": t_load, **report.times}
    if main:
        save_model(loaded, od, tokenizer=tokenizer, report=report, overwrite=overwrite)
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
    weight_format: str | None = None  # a quantized checkpoint's weights (fp8.weight_format), None for float ones

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
        if self.weight_format:
            lines.append(f"weights: {self.weight_format}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, "blocks_path": self.blocks_path,
                "blocks": [{"index": b.index, "kind": b.kind, "experts": b.experts, "dense": b.dense,
                            "groups": [[{"name": n, "shape": list(s)} for n, s in g] for g in b.groups]}
                           for b in self.blocks],
                "outside": [{"name": n, "shape": list(s)} for n, s in self.outside],
                "weight_format": self.weight_format}


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
    """What ``prune_model`` would prune in ``model``: every block is run once on a short synthetic batch, every expert
    on every token, under the same observer the pruning run uses; no Hessian is collected and nothing is changed.

    ``model``: a loaded model, or a path / "builtin": then no weight is read. The model is built from its config on
    the meta device (``io.meta_model``, as streaming builds it) and observed there, buffers included (seconds for a
    70B model: benchmarks/results/inspect_config.md); a model whose forward needs values (the data-dependent expert
    dispatch of MoE blocks) is observed with zero-filled weights instead, one block at a time, each block getting
    memory of its own shapes and dtypes for its turn (what a block does with its weights does not depend on their
    values: every expert runs, routers and gates are found by their use); a block of the same class and parameter
    shapes as an observed one (sharing no parameter with another block) is not run again."""
    if isinstance(model, (str, os.PathLike)):
        from .discover import UnsupportedModelError
        from .fp8 import weight_format
        from .io import check_supported, meta_model, resolve_model
        source = resolve_model(model)
        config = check_supported(source)
        try:
            fmt = weight_format(config, str(source)) if source.kind == "hf" else None
            wf = fmt and f"{fmt.describe()}: pruned streamed, each block written back in FP8 with new scales"
        except UnsupportedModelError as e:  # shown, not raised: inspecting is still useful
            wf = f"not prunable as they are: {e}"
        model = meta_model(config)
        model.tie_weights()  # as loading ties them: a tied LM head is the embedding, not a matrix of its own
        result = _observe_all(model, device, views=False, skeleton=True)
        result.weight_format = wf
        return result
    return _observe_all(model, device, views=False)


def _meta_tree(obj, memo: dict):
    """A block's arguments with every tensor on the meta device (shared objects stay shared)."""
    from .capture import Call
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = obj.to("meta")
    elif isinstance(obj, Call):
        out = Call(_meta_tree(obj.args, memo), _meta_tree(obj.kwargs, memo), obj.hidden_kw)
    elif isinstance(obj, (tuple, list)):
        out = type(obj)(_meta_tree(x, memo) for x in obj)
    elif isinstance(obj, dict):
        out = {k: _meta_tree(v, memo) for k, v in obj.items()}
    else:
        out = obj
    memo[id(obj)] = out
    return out


@contextlib.contextmanager
def _buffers_on_meta(block: torch.nn.Module):
    """The block's buffers on the meta device for a while (its parameters are there already)."""
    saved = [(sub, name, b) for sub in block.modules() for name, b in sub._buffers.items() if b is not None]
    for sub, name, b in saved:
        sub._buffers[name] = b.to("meta")
    try:
        yield
    finally:
        for sub, name, b in saved:
            sub._buffers[name] = b


def _zero_fill(module: torch.nn.Module, device, skip: set[int] = frozenset()) -> None:
    """Give ``module``'s meta parameters (but those in ``skip``, by id) zero-filled memory of their shapes and dtypes
    on ``device``; a parameter held by several modules (tied weights) stays one."""
    memo: dict[int, torch.nn.Parameter] = {}
    for sub in module.modules():
        for attr, p in list(sub._parameters.items()):
            if p is not None and p.device.type == "meta" and id(p) not in skip:
                if id(p) not in memo:
                    memo[id(p)] = torch.nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=device),
                                                     requires_grad=False)
                sub._parameters[attr] = memo[id(p)]


def _drop(module: torch.nn.Module, last_use: dict[int, int], index: int) -> None:
    """Back to the meta device: the parameters of the modules no later block uses."""
    for sub in module.modules():
        if last_use.get(id(sub), index) > index:
            continue
        for attr, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[attr] = torch.nn.Parameter(p.detach().to("meta"), requires_grad=False)


class _SkeletonStore:
    """Inspect's ``BlockStore`` for a model on the meta device: a block stays where it is for its turn (the step gives
    it memory if it must run on values), and after it the parameters no later block uses go back to meta."""

    def __init__(self, blocks: torch.nn.ModuleList, last_use: dict[int, int]):
        self.blocks, self.last_use = blocks, last_use

    def load(self, i: int):
        return self.blocks[i]

    def done(self, i: int, block, inputs, reports) -> None:
        _drop(block, self.last_use, i)

    def skip(self, i: int) -> None:
        pass


def _observe_all(model, device, views: bool, skeleton: bool = False):
    """Observe every block once (see ``inspect_model``), walking the blocks with the prune's loop
    (``driver.walk_blocks``) and a step that prunes nothing; the matrices as views, or an ``Inspection``.
    ``skeleton``: the model's parameters are on the meta device; each block gets zero-filled ones for its turn."""
    from .capture import BlockInputs, capture_inputs
    from .discover import PrunedParams, eager_experts, find_blocks
    from .driver import BlockStore, MoveNonBlock, observe_block, resolve_device, synthetic_batches, walk_blocks
    device = resolve_device(device)
    found: dict[str, torch.Tensor] = {}
    path, blocks = find_blocks(model)
    rows = []
    last_use: dict[int, int] = {}
    users: dict[int, set[int]] = {}
    for i, block in enumerate(blocks):
        for sub in block.modules():
            last_use[id(sub)] = i
            users.setdefault(id(sub), set()).add(i)
    inside = {id(p) for p in blocks.parameters()}
    outside = [(n, tuple(p.shape)) for n, p in model.named_parameters() if id(p) not in inside]
    if skeleton:  # the parts outside the blocks, zero-filled, for the capture pass
        _zero_fill(model, device, skip=inside)
    shared = PrunedParams()
    seen: dict[tuple, BlockView] = {}
    meta_inputs = None

    def observe_step(i: int, block: torch.nn.Module, inputs: BlockInputs) -> list:
        key, obs = None, None
        if skeleton:
            alone = all(len(users[id(sub)]) == 1 for sub in block.modules())
            key = (type(block).__name__, tuple((n, tuple(p.shape), p.dtype)
                                               for n, p in block.named_parameters())) if alone else None
            if key is not None and key in seen:
                rows.append(BlockView(i, seen[key].kind, seen[key].groups, dict(seen[key].dense), seen[key].experts))
                return []
            if all(p.device.type == "meta" for p in block.parameters()):
                try:  # on the meta device: no memory, no arithmetic
                    with _buffers_on_meta(block):
                        obs = observe_block(block, meta_inputs, i, all_experts=True, shared=shared)
                except (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError):
                    obs = None  # a step that needs values (an MoE dispatch's nonzero): zero-filled weights
            if obs is None:
                _zero_fill(block, device)
        if obs is None:
            obs = observe_block(block, inputs, i, all_experts=True, shared=shared)
        params = dict(block.named_parameters())
        for slot in obs.slots:
            for s in slot.sites:
                shared.add(params[s.param], f"block {i}")
                if views:
                    found[f"{path}.{i}.{s.name}"] = s.view(params)
        rows.append(BlockView(i, type(block).__name__, [[(s.name, s.out_in) for s in slot.sites]
                                                         for slot in obs.slots], dict(obs.dense), obs.experts))
        if key is not None:
            seen[key] = rows[-1]
        return []

    with torch.no_grad(), eager_experts(model):
        with MoveNonBlock(model, blocks, device):
            inputs = capture_inputs(model, blocks, synthetic_batches(model), device)
        if skeleton:
            memo: dict = {}
            meta_inputs = BlockInputs([h.to("meta") for h in inputs.hidden],
                                      [[_meta_tree(c, memo) for c in calls] for calls in inputs.calls],
                                      inputs.output_format)
            store = _SkeletonStore(blocks, last_use)
        else:
            store = BlockStore(blocks, device)
        # skeleton: every block's input is the zeros captured (no block runs on values it would pass on)
        walk_blocks(blocks, inputs, store, observe_step, advance=not skeleton)
    if views:
        return found
    return Inspection(getattr(model.config, "model_type", "?"), path, rows, outside)


__all__ = ["Inspection", "inspect_model", "matrix_views", "mem_available", "prune_pretrained", "should_stream"]
