"""Pruning a model that does not fit in memory: stream it from its safetensors shards one block at a time.

The model is built with its parameters on the meta device (no memory). The parts outside the decoder blocks are read
once to catch the first block's inputs and dropped again. Then, for every block: its tensors are read from the input
shards, it is pruned on the device by the same code as the in-memory driver, its outputs are computed for the next
block, and it is written to its own output shard. Every file is written to a temporary name, flushed and renamed,
so a killed run leaves whole files only; the input directory is only ever read.

Resume: after each block the run persists (1) the block's shard, (2) the activations that enter the next block, (3) a
small state file naming both; a restarted run with the same settings checks a fingerprint of settings, input and
calibration, reloads the activations and continues after the last finished block, giving results identical to an
uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Callable, Iterable, Sequence

import torch

from ..config import PruneConfig
from ..report import (LayerReport, PruneReport, atomic_open, atomic_write_text, dense_from_dict, device_peak_memory,
                      host_peak_rss, layer_from_dict, reset_device_peak_memory, reset_host_peak_rss)
from .capture import BlockInputs, capture_inputs
from .discover import eager_experts, find_blocks
from .driver import (BlockStore, MoveNonBlock, Options, as_batches, check_inputs_finite, make_selection,
                     outside_matrices, resolve_device, run_blocks, run_settings, synthetic_batches)
from .io import REPORT_NAME, ModelSource, check_seqlen, check_supported, meta_model, quiet_transformers
from .outdir import JOURNAL_NAME, MANIFEST_NAME, OutputDir
from .shards import (INDEX_NAME, ShardedCheckpoint, atomic_save_safetensors, checkpoint_bytes,  # noqa: F401
                     read_safetensors)

STATE_DIR = ".pyprune-partial"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")


class ResumeMismatchError(ValueError):
    """A partial output exists but was made with other settings, input or calibration."""


def _save_activations(hidden: list[torch.Tensor], path: str) -> None:
    """Raw dump, one batch at a time on the host: a JSON header line, then each tensor's bytes."""
    header = {"shapes": [list(h.shape) for h in hidden], "dtype": str(hidden[0].dtype).replace("torch.", "")}
    with atomic_open(path) as f:
        f.write((json.dumps(header) + "\n").encode())
        for h in hidden:
            f.write(h.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())


def _load_activations(path: str, device) -> list[torch.Tensor]:
    with open(path, "rb") as f:
        header = json.loads(f.readline())
        dtype = getattr(torch, header["dtype"])
        itemsize = torch.empty((), dtype=dtype).element_size()
        out = []
        for shape in header["shapes"]:
            n = 1
            for s in shape:
                n *= s
            buf = bytearray(f.read(n * itemsize))
            out.append(torch.frombuffer(buf, dtype=dtype).reshape(shape).to(device))
    return out


def _copy_atomic(src: str, dst: str) -> None:
    with open(src, "rb") as fin, atomic_open(dst) as f:
        shutil.copyfileobj(fin, f)


# ------------------------------------------------------------------------------------------------------- helpers
def _set_tensor(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    path, _, attr = name.rpartition(".")
    module = root.get_submodule(path) if path else root
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(name)


def release_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps large freed chunks otherwise, so the resident set of a
    streaming run would creep up block after block). A no-op where malloc_trim does not exist."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _to_meta(module: torch.nn.Module, skip: set[int] | None = None) -> None:
    """Drop a module's parameters (replace them by meta tensors) to free their memory."""
    for sub in module.modules():
        for attr, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta" and (skip is None or id(p) not in skip):
                sub._parameters[attr] = torch.nn.Parameter(p.detach().to("meta"), requires_grad=False)


class _KeyMap:
    """Checkpoint keys <-> model names. Usually identical; checkpoints saved from the base model lack its prefix; and
    where transformers converts a checkpoint layout when it loads one (per-expert tensors fused into 3-D experts,
    renamed modules), ``load`` and ``save_form`` apply its own conversion and its reverse, one block at a time."""

    def __init__(self, model, blocks_path: str, keys: Iterable[str]):
        keys = list(keys)
        self.model = model
        from transformers.conversion_mapping import get_model_conversion_mapping
        try:
            self.mapping = [m for m in (get_model_conversion_mapping(model, add_legacy=True) or [])
                            if type(m).__name__ != "PrefixChange"]
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

    def save_form(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model-named tensors -> checkpoint-named ones (the layout of the input checkpoint)."""
        if not self.converts:
            back = {v: k for k, v in self.to_model.items()}
            return {back.get(k, k): v for k, v in state.items()}
        from transformers.core_model_loading import revert_weight_conversion
        return dict(revert_weight_conversion(self.model, state))


def _fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(str(tuple(p.shape)).encode())
            h.update(p.contiguous().view(torch.uint8).numpy().tobytes() if p.numel() else b"")
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()


def _block_file(i: int) -> str:
    return f"model-block-{i:05d}.safetensors"


NONBLOCK_FILE = "model-nonblock.safetensors"


def _acts_name(i: int, comm=None, rank: int | None = None) -> str:
    """The activations entering block i + 1 (one file per rank in a distributed run)."""
    if comm is None:
        return f"acts-{i:05d}.bin"
    return f"acts-{i:05d}-rank{comm.rank if rank is None else rank:05d}.bin"


# ----------------------------------------------------------------------------------------------------- the run
def partial_run(out: str) -> int | None:
    """The last finished block of an unfinished streamed run in ``out`` (None when there is none)."""
    try:
        with open(os.path.join(out, STATE_DIR, "state.json")) as f:
            return int(json.load(f)["done"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class _ShardStore(BlockStore):
    """The streamed ``BlockStore``: a block's tensors are read from the input shards when its turn comes; when it is
    done it is written to its own output shard, the activations entering the next block and the state naming them
    are persisted (the resume point), and its memory is released."""

    def __init__(self, run: "_StreamRun"):
        super().__init__(run.block_list, run.device)
        self.run = run
        self.raw: dict[str, torch.Tensor] = {}

    def load(self, i: int) -> torch.nn.Module:
        r = self.run
        block = r.block_list[i]
        tensors = r.ckpt.read(r.keymap.block_keys[i], device=r.device)
        self.raw = r.keymap.load(tensors)  # what the model has no place for (legacy buffers): written back as is
        del tensors
        still_meta = [n for n, p in block.named_parameters() if p.device.type == "meta"]
        if still_meta:
            raise ValueError(f"checkpoint {r.src!r} lacks tensors of block {i}: {still_meta[:5]}")
        return block

    def done(self, i: int, block: torch.nn.Module, inputs: BlockInputs, reports: list[LayerReport]) -> None:
        r = self.run
        if r.main:
            lead = f"{r.path}.{i}."
            written = r.keymap.save_form({lead + k: v for k, v in block.state_dict().items()})
            written.update(self.raw)
            missing = set(r.keymap.block_keys[i]) - set(written)
            if missing:
                raise RuntimeError(f"block {i}: cannot write {sorted(missing)[:5]} back in the checkpoint's layout")
            written = {k: written[k] for k in r.keymap.block_keys[i]}
            atomic_save_safetensors(written, r.claim(_block_file(i)))
            del written
        self.raw = {}
        _to_meta(block)
        r.layers += reports
        release_host_memory()
        r.persist(i, inputs if i < r.last else None)

    def skip(self, i: int) -> None:
        r = self.run
        if r.main:
            atomic_save_safetensors(r.ckpt.read(r.keymap.block_keys[i]), r.claim(_block_file(i)))
        r.persist(i, None)


class _StreamRun:
    """The books of one streamed run: input checkpoint, output directory, resume state."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def claim(self, name: str) -> str:
        """The path to write output file ``name`` at, claimed in the output directory's journal (rank 0)."""
        return self.od.claim(name) if self.od is not None else os.path.join(self.out, name)

    def persist(self, i: int, inputs: BlockInputs | None) -> None:
        """Persist the resume point after block ``i``: the activations entering block i + 1, then the state naming
        them, then remove the previous activations."""
        comm = self.comm
        new_acts = None
        if inputs is not None and inputs.hidden:
            new_acts = _acts_name(i, comm)
            if self.od is not None:  # every rank's file is pyprune's own: rank 0 claims them all ...
                self.od.claim_all([f"{STATE_DIR}/{_acts_name(i, comm, r)}"
                                   for r in range(1 if comm is None else comm.world_size)])
            if comm is not None:  # ... before any rank writes its own
                comm.barrier()
            _save_activations(inputs.hidden, os.path.join(self.state_dir, new_acts))
        if comm is not None:  # every rank's activations are on disk before the state names them
            comm.barrier()
        if self.main:
            self.claim(f"{STATE_DIR}/state.json")
            atomic_write_text(self.state_file, json.dumps({
                "fingerprint": self.fingerprint, "done": i, "activations": new_acts,
                **{k: v for k, v in PruneReport(self.settings, self.layers, dense=self.dense).to_dict().items()
                   if k in ("layers", "dense")}}))
        if comm is not None:  # ... and the state names the new ones before the old ones go
            comm.barrier()
        if self.acts_file is not None and self.acts_file != new_acts:
            old = os.path.join(self.state_dir, self.acts_file)
            if os.path.exists(old):
                os.unlink(old)
            if self.od is not None:
                for r in range(1 if comm is None else comm.world_size):
                    name = f"{STATE_DIR}/{_acts_name(i - 1, comm, r)}"
                    if name in self.od.files:
                        self.od.discard(name)
        self.acts_file = new_acts


def prune_checkpoint(src: str, out: str, calibration, config: PruneConfig | None = None, *,
                     modules: Sequence[str] | None = None, dense: Sequence[str] | None = None,
                     blocks: Iterable[int] | None = None, device=None, batch_size: int = 1,
                     true_sequential: bool = False, calibrate_all_experts: bool = False,
                     expert_min_tokens: int | None = None, hessian_budget: int | str | None = "auto",
                     progress: bool = False, resume: bool = True,
                     overwrite: bool = False,
                     on_block_done: Callable[[int, list[LayerReport]], None] | None = None,
                     comm=None) -> PruneReport:
    """Prune the safetensors checkpoint in directory ``src`` into directory ``out`` without ever holding the whole
    model: see the module docstring. Arguments as ``pyprune.prune_model``; ``resume`` continues a killed run found
    in ``out`` (with the same settings), ``on_block_done(i, reports)`` runs after block ``i`` is durably written.
    Returns the report (also written to ``out/pyprune_report.json``).

    comm: a ``pyprune.distributed.Comm``: every rank calls this with its calibration shard and reads each block from
    ``src``; rank 0 alone writes the output and the state; each rank persists its own activations in the state
    directory (which must therefore be on a file system that every rank sees for a resume)."""
    config = PruneConfig() if config is None else config
    src = os.path.abspath(src)
    out = os.path.abspath(out)
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise FileNotFoundError(f"{src!r} has no config.json: not a Hugging Face model directory")
    real_src, real_out = os.path.realpath(src), os.path.realpath(out)
    if (real_out == real_src or real_out.startswith(real_src + os.sep) or real_src.startswith(real_out + os.sep)):
        raise ValueError(f"the output directory {out!r} must not be the input directory {src!r}, inside it or "
                         "around it (the input is never modified)")
    ckpt = ShardedCheckpoint(src)
    device = resolve_device(device)
    batches = as_batches(calibration, batch_size)
    if not batches and config.method != "magnitude":
        raise ValueError(f"method {config.method!r} needs calibration data (token ids)")
    hf_config = check_supported(ModelSource("hf", src))  # read and checked as everywhere (io.model_config)
    if batches:
        check_seqlen(hf_config, int(batches[0].shape[1]), "the calibration window length")

    main = comm is None or comm.is_main
    if not main:
        progress = False

    def on_main(fn):  # rank 0 decides, every rank gets its answer or its exception
        return fn() if comm is None else comm.on_main(fn)

    state_dir = os.path.join(out, STATE_DIR)
    state_file = os.path.join(state_dir, "state.json")
    # The output directory's contract (outdir.OutputDir): only pyprune's own files are ever replaced or removed, an
    # earlier output only with overwrite, and a directory without a finished manifest is never taken for a model.
    od = OutputDir(out, input_path=src) if main else None
    partial = on_main(lambda: os.path.isfile(state_file))
    if partial and not resume:
        on_main(lambda: od.check(overwrite, resume=False))  # an unfinished run is replaced only with overwrite
        partial = False
    on_main(lambda: od.prepare(overwrite, resume=resume))

    reset_host_peak_rss()
    reset_device_peak_memory(device)
    t_start = time.perf_counter()
    model = meta_model(hf_config)
    path, block_list = find_blocks(model)
    num_blocks = len(block_list)
    selection = make_selection(modules, dense, blocks, num_blocks)
    keymap = _KeyMap(model, path, ckpt.weight_map)
    missing_blocks = [i for i in range(num_blocks) if i not in keymap.block_keys]
    if missing_blocks:
        raise ValueError(f"checkpoint {src!r} has no tensors for blocks {missing_blocks[:8]}")
    last = max(selection.blocks) if selection.blocks is not None else num_blocks - 1

    options = Options(true_sequential, calibrate_all_experts, expert_min_tokens, progress, hessian_budget)
    settings = run_settings(config, model_type=hf_config.model_type, blocks_path=path, batches=batches, device=device,
                            selection=selection, options=options, batch_size=batch_size, comm=comm, streaming=True,
                            source=src)
    calib_part = torch.cat([b.reshape(-1) for b in batches]) if batches else []
    if comm is not None:  # every rank's shard
        calib_part = comm.all_gather_object(_fingerprint(calib_part))
    fingerprint = _fingerprint({k: v for k, v in settings.items() if k != "device"}, ckpt.fingerprint(), calib_part)

    done, layers, dense, acts_file = -1, [], [], None
    if partial:
        def read_state():
            with open(state_file) as f:
                return json.load(f)
        state = on_main(read_state)
        if state.get("fingerprint") != fingerprint:
            raise ResumeMismatchError(f"{out!r} holds a partial run made with other settings, input or calibration; "
                                      "use the same ones to resume, or another output directory")
        done = int(state["done"])
        resumed_after = done
        layers = [layer_from_dict(d) for d in state["layers"]]
        dense = [dense_from_dict(d) for d in state.get("dense", [])]
        acts_file = state.get("activations")
        if acts_file is not None and comm is not None:
            acts_file = _acts_name(done, comm)
    os.makedirs(state_dir, exist_ok=True)

    times = {}
    t0 = time.perf_counter()
    # The parts outside the blocks: copied unchanged, and loaded (once) to capture every block's inputs.
    nonblock_path = os.path.join(out, NONBLOCK_FILE)
    if main and (not os.path.isfile(nonblock_path) or NONBLOCK_FILE not in od.files):
        atomic_save_safetensors(ckpt.read(keymap.other_keys), od.claim(NONBLOCK_FILE))
    inputs = BlockInputs([])
    with eager_experts(model):
        if done < last:
            keymap.load(ckpt.read(keymap.other_keys))
            with MoveNonBlock(model, block_list, device):
                inputs = capture_inputs(model, block_list, batches or synthetic_batches(model), device)
            check_inputs_finite(inputs, model, block_list)
            _to_meta(model)
            release_host_memory()
            if acts_file is not None:
                inputs.hidden = _load_activations(os.path.join(state_dir, acts_file), device)
        times["capture"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        run = _StreamRun(src=src, out=out, ckpt=ckpt, keymap=keymap, model=model, path=path, block_list=block_list,
                         device=device, main=main, comm=comm, state_dir=state_dir, state_file=state_file,
                         fingerprint=fingerprint, settings=settings, layers=layers, dense=dense, acts_file=acts_file,
                         last=last,
                         od=od)
        run_blocks(block_list, path, inputs, config, selection, options, _ShardStore(run), start=done + 1, last=last,
                   comm=comm, on_block_done=on_block_done, layers=[], dense=run.dense)
    layers = run.layers
    outside = outside_matrices(model, block_list)
    times["prune"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_start
    if comm is not None:
        comm.barrier()
        if not main:
            return PruneReport(settings, layers, times, device_peak_memory(device), host_peak_rss(), num_blocks,
                               run.dense, outside)

    # Finish: index, config and tokenizer files, report; removing the state directory marks completion.
    weight_map = {k: NONBLOCK_FILE for k in keymap.other_keys}
    for i in range(num_blocks):
        weight_map.update({k: _block_file(i) for k in keymap.block_keys[i]})
    total = sum(os.path.getsize(os.path.join(out, f)) for f in set(weight_map.values()))
    atomic_write_text(od.claim(INDEX_NAME),
                      json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    for name in os.listdir(src):
        p = os.path.join(src, name)
        if (os.path.isfile(p) and not name.endswith(WEIGHT_SUFFIXES) and name != INDEX_NAME
                and name not in (REPORT_NAME, MANIFEST_NAME, JOURNAL_NAME)):
            _copy_atomic(p, od.claim(name))
    for name in list(od.files):  # the resume state is not part of the output
        if name.startswith(STATE_DIR + "/"):
            od.discard(name)
    if os.path.isdir(state_dir) and not os.listdir(state_dir):
        os.rmdir(state_dir)
    report = PruneReport(settings, layers, times, device_peak_memory(device), host_peak_rss(), num_blocks, run.dense,
                         outside)
    if partial:
        report.settings["resumed_after_block"] = resumed_after
    report.settings["replaced_files"] = sorted(set(od.replaced) - set(od.files))
    report.save(od.claim(REPORT_NAME))
    od.finish()
    return report
