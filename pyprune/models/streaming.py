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

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from ..config import PruneConfig
from ..report import (DenseMatrix, LayerReport, PruneReport, atomic_open, atomic_write_text, device_peak_memory,
                      host_peak_rss, reset_device_peak_memory, reset_host_peak_rss)
from .capture import BlockInputs, capture_inputs
from .discover import eager_experts, find_blocks
from .driver import (BlockStore, MoveNonBlock, check_inputs_finite, outlier_pass, outside_matrices, plan_run,
                     profile_sparsities, run_blocks, synthetic_batches)
from .io import REPORT_NAME, ModelSource, check_supported, meta_model
from .fp8 import Fp8Format, dequantize_tensors, requantize_tensors, weight_format
from .keymap import KeyMap
from .outdir import JOURNAL_NAME, MANIFEST_NAME, OutputDir
from .resume import (STATE_DIR, ResumeMismatchError, ResumeState, acts_name, load_activations,  # noqa: F401
                     partial_run, save_activations)
from .resume import fingerprint as run_fingerprint
from .shards import (INDEX_NAME, ShardedCheckpoint, atomic_save_safetensors, checkpoint_bytes,  # noqa: F401
                     read_safetensors)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")


def _copy_atomic(src: str, dst: str) -> None:
    with open(src, "rb") as fin, atomic_open(dst) as f:
        shutil.copyfileobj(fin, f)


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


def _block_file(i: int) -> str:
    return f"model-block-{i:05d}.safetensors"


NONBLOCK_FILE = "model-nonblock.safetensors"


def _read_block(block_list: torch.nn.ModuleList, i: int, ckpt: "ShardedCheckpoint", keymap: KeyMap, device,
                src: str, fp8: Fp8Format | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Give block ``i`` its tensors from the input shards (on ``device``; FP8 weights dequantized into the block's
    float dtype); returns what the model has no place for (legacy buffers) and the FP8 weights' old scales (by
    checkpoint key, for ``requantize_tensors``)."""
    tensors = ckpt.read(keymap.block_keys[i], device=device)
    scales = {}
    if fp8 is not None:
        dtype = next((p.dtype for p in block_list[i].parameters() if p.is_floating_point()), torch.bfloat16)
        tensors, scales = dequantize_tensors(tensors, fp8, dtype)
    raw = keymap.load(tensors)
    del tensors
    still_meta = [n for n, p in block_list[i].named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise ValueError(f"checkpoint {src!r} lacks tensors of block {i}: {still_meta[:5]}")
    return raw, scales


class _DenseStore(BlockStore):
    """A read-only walk over the input checkpoint's blocks (the sparsity profile's pre-pass, ``outlier_pass``): a
    block's tensors are read for its turn and dropped after it; nothing is written."""

    def __init__(self, block_list: torch.nn.ModuleList, device, ckpt: "ShardedCheckpoint", keymap: KeyMap, src: str,
                 fp8: Fp8Format | None = None):
        super().__init__(block_list, device)
        self.ckpt, self.keymap, self.src, self.fp8 = ckpt, keymap, src, fp8

    def load(self, i: int) -> torch.nn.Module:
        _read_block(self.blocks, i, self.ckpt, self.keymap, self.device, self.src, self.fp8)
        return self.blocks[i]

    def done(self, i: int, block: torch.nn.Module, inputs: BlockInputs, reports: list[LayerReport]) -> None:
        _to_meta(block)
        release_host_memory()

    def skip(self, i: int) -> None:
        pass


# ----------------------------------------------------------------------------------------------------- the run
class _ShardStore(BlockStore):
    """The streamed ``BlockStore``: a block's tensors are read from the input shards when its turn comes; when it is
    done it is written to its own output shard, the activations entering the next block and the state naming them
    are persisted (the resume point), and its memory is released."""

    def __init__(self, run: "_StreamRun"):
        super().__init__(run.block_list, run.device)
        self.run = run
        self.raw: dict[str, torch.Tensor] = {}
        self.scales: dict[str, torch.Tensor] = {}

    def load(self, i: int) -> torch.nn.Module:
        r = self.run
        # what the model has no place for (legacy buffers): written back as is
        self.raw, self.scales = _read_block(r.block_list, i, r.ckpt, r.keymap, r.device, r.src, r.fp8)
        return r.block_list[i]

    def done(self, i: int, block: torch.nn.Module, inputs: BlockInputs, reports: list[LayerReport]) -> None:
        r = self.run
        if r.main:
            lead = f"{r.path}.{i}."
            written = r.keymap.save_form({lead + k: v for k, v in block.state_dict().items()}, r.keymap.block_keys[i])
            written.update(self.raw)
            if self.scales:  # FP8 again, with scales of the pruned weights
                written = requantize_tensors(written, r.fp8, self.scales)
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


@dataclass
class _StreamRun:
    """The books of one streamed run: input checkpoint, output directory, resume state."""

    src: str
    out: str
    ckpt: ShardedCheckpoint
    keymap: KeyMap
    model: torch.nn.Module
    path: str                        # the blocks' path in the model
    block_list: torch.nn.ModuleList
    device: torch.device
    main: bool                       # this process writes the output (rank 0, or no comm)
    comm: object                     # a pyprune.distributed.Comm or None
    state_dir: str
    state_file: str
    fingerprint: str
    settings: dict
    layers: list[LayerReport]
    dense: list[DenseMatrix]
    acts_file: str | None            # the activations entering the block after the last finished one
    last: int                        # the last block to prune
    od: OutputDir | None             # rank 0's output directory
    profile: dict | None = None      # the sparsity profile's allocation (driver.outlier_pass), kept in the state
    fp8: Fp8Format | None = None     # the checkpoint's FP8 layout (fp8.weight_format), or None for float weights

    def claim(self, name: str) -> str:
        """The path to write output file ``name`` at, claimed in the output directory's journal (rank 0)."""
        return self.od.claim(name) if self.od is not None else os.path.join(self.out, name)

    def persist(self, i: int, inputs: BlockInputs | None) -> None:
        """Persist the resume point after block ``i``: the activations entering block i + 1, then the state naming
        them, then remove the previous activations."""
        comm = self.comm
        new_acts = None
        if inputs is not None and inputs.hidden:
            new_acts = acts_name(i, comm)
            if self.od is not None:  # every rank's file is pyprune's own: rank 0 claims them all ...
                self.od.claim_all([f"{STATE_DIR}/{acts_name(i, comm, r)}"
                                   for r in range(1 if comm is None else comm.world_size)])
            if comm is not None:  # ... before any rank writes its own
                comm.barrier()
            save_activations(inputs.hidden, os.path.join(self.state_dir, new_acts))
        if comm is not None:  # every rank's activations are on disk before the state names them
            comm.barrier()
        if self.main:
            self.claim(f"{STATE_DIR}/state.json")
            atomic_write_text(self.state_file, ResumeState(self.fingerprint, i, new_acts, self.layers,
                                                           self.dense, self.profile).to_json(self.settings))
        if comm is not None:  # ... and the state names the new ones before the old ones go
            comm.barrier()
        if self.acts_file is not None and self.acts_file != new_acts:
            old = os.path.join(self.state_dir, self.acts_file)
            if os.path.exists(old):
                os.unlink(old)
            if self.od is not None:
                for r in range(1 if comm is None else comm.world_size):
                    name = f"{STATE_DIR}/{acts_name(i - 1, comm, r)}"
                    if name in self.od.files:
                        self.od.discard(name)
        self.acts_file = new_acts


def prune_checkpoint(src: str, out, calibration, config: PruneConfig | None = None, *,
                     modules: Sequence[str] | None = None, dense: Sequence[str] | None = None,
                     blocks: Iterable[int] | None = None, device=None, batch_size: int | None = None,
                     true_sequential: bool = False, calibrate_all_experts: bool = False,
                     expert_min_tokens: int | None = None, hessian_budget: int | str | None = "auto",
                     progress: bool = False, resume: bool = True,
                     overwrite: bool = False,
                     on_block_done: Callable[[int, list[LayerReport]], None] | None = None,
                     comm=None, labels: dict | None = None, times: dict | None = None,
                     sparsity_profile: str | None = None, owl_m: float | None = None,
                     owl_lambda: float | None = None) -> PruneReport:
    """Prune the safetensors checkpoint in directory ``src`` into directory ``out`` without ever holding the whole
    model: see the module docstring. Arguments as ``pyprune.prune_model``; ``resume`` continues a killed run found
    in ``out`` (with the same settings), ``on_block_done(i, reports)`` runs after block ``i`` is durably written.
    Returns the report (also written to ``out/pyprune_report.json``, once, when the run is complete). ``out`` may be
    an ``outdir.OutputDir`` already checked against ``src`` (not yet prepared); ``labels`` are settings the report
    records as given, outside the resume fingerprint (the calibration text's name, its seed); ``times`` seconds spent
    before the call (e.g. tokenizing), recorded first among the report's times.

    comm: a ``pyprune.distributed.Comm``: every rank calls this with its calibration shard and reads each block from
    ``src``; rank 0 alone writes the output and the state; each rank persists its own activations in the state
    directory (which must therefore be on a file system that every rank sees for a resume).

    sparsity_profile, owl_m, owl_lambda: as ``prune_model``; the pre-pass reads every block from ``src`` once more
    (dense, nothing written), and the allocation is kept in the resume state, so a resumed run uses the same one."""
    config = PruneConfig() if config is None else config
    src = os.path.abspath(src)
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise FileNotFoundError(f"{src!r} has no config.json: not a Hugging Face model directory")
    # The output directory's contract (outdir.OutputDir): only pyprune's own files are ever replaced or removed, an
    # earlier output only with overwrite, and a directory without a finished manifest is never taken for a model.
    # Built on every rank: its constructor checks (once) that the output is not where the input lives.
    given = out if isinstance(out, OutputDir) else OutputDir(out, input_path=src)
    out = os.path.abspath(given.given)
    ckpt = ShardedCheckpoint(src)
    hf_config = check_supported(ModelSource("hf", src))  # read and checked as everywhere (io.model_config)
    fp8 = weight_format(hf_config, src)
    if fp8 is not None:  # what the weights are, in the report
        labels = {**(labels or {}), "weight_format": fp8.describe() + ": dequantized per block to prune, written "
                  "back in FP8 with new scales (amax / 448)"}
    model = meta_model(hf_config)
    # the run's choices, checked against the model before anything is written (as prune_model does)
    plan = plan_run(model, calibration, config, modules=modules, dense=dense, blocks=blocks, device=device,
                    batch_size=batch_size, true_sequential=true_sequential,
                    calibrate_all_experts=calibrate_all_experts, expert_min_tokens=expert_min_tokens,
                    hessian_budget=hessian_budget, progress=progress, comm=comm, streaming=True, labels=labels,
                    sparsity_profile=sparsity_profile, owl_m=owl_m, owl_lambda=owl_lambda, source=src)
    device, batches, settings, last = plan.device, list(plan.batches), plan.settings, plan.last
    path, block_list = find_blocks(model)
    num_blocks = len(block_list)
    keymap = KeyMap(model, path, ckpt.weight_map)
    missing_blocks = [i for i in range(num_blocks) if i not in keymap.block_keys]
    if missing_blocks:
        raise ValueError(f"checkpoint {src!r} has no tensors for blocks {missing_blocks[:8]}")
    main = comm is None or comm.is_main

    def on_main(fn):  # rank 0 decides, every rank gets its answer or its exception
        return fn() if comm is None else comm.on_main(fn)

    state_dir = os.path.join(out, STATE_DIR)
    state_file = os.path.join(state_dir, "state.json")
    od = given if main else None
    partial = on_main(lambda: os.path.isfile(state_file))
    if partial and not resume:
        on_main(lambda: od.check(overwrite, resume=False))  # an unfinished run is replaced only with overwrite
        partial = False
    on_main(lambda: od.prepare(overwrite, resume=resume))

    reset_host_peak_rss()
    reset_device_peak_memory(device)
    t_start = time.perf_counter()
    calib_part = torch.cat([b.reshape(-1) for b in batches]) if batches else []
    if comm is not None:  # every rank's shard
        calib_part = comm.all_gather_object(run_fingerprint(calib_part))
    fingerprint = run_fingerprint(plan.fingerprint_settings(), ckpt.fingerprint(), calib_part)

    done, layers, dense, acts_file, profile = -1, [], [], None, None
    if partial:
        state = on_main(lambda: ResumeState.read(state_file))
        if state.fingerprint != fingerprint:
            raise ResumeMismatchError(f"{out!r} holds a partial run made with other settings, input or calibration; "
                                      "use the same ones to resume, or another output directory")
        done = resumed_after = state.done
        layers, dense, acts_file, profile = state.layers, state.dense, state.activations, state.profile
        if acts_file is not None and comm is not None:
            acts_file = acts_name(done, comm)
    os.makedirs(state_dir, exist_ok=True)

    times = dict(times or {})
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
            if plan.profile is not None and profile is None:  # from the dense blocks, before block 0 is pruned
                t1 = time.perf_counter()
                profile = outlier_pass(block_list, path, inputs, plan, _DenseStore(block_list, device, ckpt, keymap,
                                                                                  src, fp8))
                times["outliers"] = time.perf_counter() - t1
            if acts_file is not None:
                inputs.hidden = load_activations(os.path.join(state_dir, acts_file), device)
        times["capture"] = time.perf_counter() - t0 - times.get("outliers", 0.0)

        t0 = time.perf_counter()
        run = _StreamRun(src=src, out=out, ckpt=ckpt, keymap=keymap, model=model, path=path, block_list=block_list,
                         device=device, main=main, comm=comm, state_dir=state_dir, state_file=state_file,
                         fingerprint=fingerprint, settings=settings, layers=layers, dense=dense, acts_file=acts_file,
                         last=last, od=od, profile=profile, fp8=fp8)
        run_blocks(block_list, path, inputs, plan.config, plan.selection, plan.options, _ShardStore(run),
                   start=done + 1, last=last, comm=comm, on_block_done=on_block_done, layers=[], dense=run.dense,
                   sparsities=profile_sparsities(profile))
    layers = run.layers
    outside = outside_matrices(model, block_list)
    times["prune"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_start
    if comm is not None:
        comm.barrier()
        if not main:
            return PruneReport(settings, layers, times, device_peak_memory(device), host_peak_rss(), num_blocks,
                               run.dense, outside, profile)

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
                         outside, profile)
    if partial:
        report.settings["resumed_after_block"] = resumed_after
    path = od.claim(REPORT_NAME)
    report.settings["replaced_files"] = od.to_remove()
    report.save(path)
    od.finish()
    return report
