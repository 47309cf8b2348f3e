"""Safetensors checkpoints read and written without safetensors' memory map: which tensor lives in which shard, each
tensor read into its own buffer, files written tensor by tensor to a temporary name and renamed. A shard that is cut
short or damaged is refused when the checkpoint is opened, naming the file and the fault."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable

import torch

from ..report import atomic_open

INDEX_NAME = "model.safetensors.index.json"


class ShardedCheckpoint:
    """Read-only view of a safetensors checkpoint: which tensor lives in which shard; reads tensors by name."""

    def __init__(self, path: str):
        """Opens the checkpoint in directory ``path``: its index, or every ``*.safetensors`` file, and the header of
        every shard, each checked against the file's size (``safetensors_header``)."""
        self.path = os.path.abspath(path)
        index = os.path.join(self.path, INDEX_NAME)
        headers = {}
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    self.weight_map: dict[str, str] = dict(json.load(f)["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a readable safetensors index ({type(e).__name__}: {e})") from None
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.path!r} holds no safetensors weights (streaming needs *.safetensors "
                                        "shards; convert .bin checkpoints first)")
            self.weight_map = {}
            for name in files:
                headers[name] = safetensors_header(os.path.join(self.path, name))[0]
                for key in headers[name]:
                    if key != "__metadata__":
                        self.weight_map[key] = name
        for shard in sorted(set(self.weight_map.values())):
            file = os.path.join(self.path, shard)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"shard {shard!r} named in the index of {self.path!r} is missing")
            header = headers.get(shard) or safetensors_header(file)[0]
            absent = [k for k, v in self.weight_map.items() if v == shard and k not in header]
            if absent:
                raise ValueError(f"{file}: holds no tensor {absent[0]!r}, which {INDEX_NAME} places there "
                                 f"({len(absent)} such tensors; a damaged or mismatched shard?)")

    def read(self, keys: Iterable[str], device="cpu") -> dict[str, torch.Tensor]:
        """The named tensors, read with plain file reads into fresh tensors (no memory map, so the resident set
        holds each tensor once), one shard open at a time."""
        by_shard: dict[str, list[str]] = {}
        for k in keys:
            by_shard.setdefault(self.weight_map[k], []).append(k)
        out = {}
        for shard, names in sorted(by_shard.items()):
            out.update(read_safetensors(os.path.join(self.path, shard), names, device))
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for shard in sorted(set(self.weight_map.values())):
            st = os.stat(os.path.join(self.path, shard))
            h.update(f"{shard}:{st.st_size}:{st.st_mtime_ns};".encode())
        h.update(json.dumps(sorted(self.weight_map.items())).encode())
        return h.hexdigest()

    def total_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.path, s)) for s in set(self.weight_map.values()))


def checkpoint_bytes(path: str) -> int:
    return ShardedCheckpoint(path).total_bytes()


# ---------------------------------------------------------------------------------------------------- file writes
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_NAMES = {v: k for k, v in _DTYPES.items()}


def _safetensors_header(f) -> tuple[dict, int]:
    """The header of an open safetensors file and where its tensor data starts, checked against the file's size:
    ``ValueError`` naming the file and the fault (cut short, not safetensors, a damaged header)."""
    name = getattr(f, "name", "file")
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError(f"{name}: not a safetensors file: {size} bytes, too short for a header (truncated?)")
    n = int.from_bytes(raw, "little")
    if not 0 < n < 1 << 30:
        raise ValueError(f"{name}: not a safetensors file (its first 8 bytes give a header of {n} bytes)")
    if 8 + n > size:
        raise ValueError(f"{name}: truncated safetensors file: its header alone needs {8 + n} bytes, the file has "
                         f"{size} (copy or download it again)")
    try:
        header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{name}: damaged safetensors header ({type(e).__name__}: {e})") from None
    if 8 + n + end > size:
        raise ValueError(f"{name}: truncated safetensors file: its header describes {end} bytes of tensor data, the "
                         f"file holds {size - 8 - n} (copy or download it again)")
    return header, 8 + n


def safetensors_header(path: str) -> tuple[dict, int]:
    """``_safetensors_header`` of the file at ``path``."""
    with open(path, "rb") as f:
        return _safetensors_header(f)


def read_safetensors(path: str, names: Iterable[str] | None = None, device="cpu") -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file (all, or the given names), each read straight into its own buffer."""
    out = {}
    with open(path, "rb") as f:
        header, start = _safetensors_header(f)
        header.pop("__metadata__", None)
        for name in (sorted(header) if names is None else names):
            info = header[name]
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            b0, b1 = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=dtype)
            view = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else None
            if b1 - b0 != (view.size if view is not None else 0):
                raise ValueError(f"{path}: tensor {name!r} has {b1 - b0} bytes, expected "
                                 f"{0 if view is None else view.size}")
            if view is not None:
                f.seek(start + b0)
                if f.readinto(view) != b1 - b0:
                    raise ValueError(f"{path}: file ends inside tensor {name!r}")
            out[name] = t if torch.device(device).type == "cpu" else t.to(device)
    return out


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    """Write a safetensors file tensor by tensor from the tensors' own memory (no serialised copy in between), to a
    temporary name, fsync, rename."""
    items = []
    offset = 0
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.dtype not in _NAMES:
            raise ValueError(f"cannot write tensor {name!r} of dtype {t.dtype} to safetensors")
        t = t.to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        items.append(t)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_open(path) as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in items:
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


