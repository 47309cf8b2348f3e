"""The resume point of a streamed run (``streaming.prune_checkpoint``): the activations entering the next block, dumped
raw per rank, and a small state file naming them with the finished block, the run's fingerprint (settings, input,
calibration) and the reports so far. Everything is written atomically; a run finds a partial one with
``partial_run``."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from ..report import DenseMatrix, LayerReport, PruneReport, atomic_open, dense_from_dict, layer_from_dict

STATE_DIR = ".pyprune-partial"


class ResumeMismatchError(ValueError):
    """A partial output exists but was made with other settings, input or calibration."""


@dataclass
class ResumeState:
    """What ``state.json`` holds: the run's fingerprint, the last finished block, the activations file entering the
    next block (None: none needed), the reports of the finished blocks, and a sparsity profile's allocation (made
    from the dense model before block 0: a resumed run prunes the remaining blocks with the same one)."""
    fingerprint: str
    done: int
    activations: str | None
    layers: list[LayerReport] = field(default_factory=list)
    dense: list[DenseMatrix] = field(default_factory=list)
    profile: dict | None = None

    def to_json(self, settings: dict) -> str:
        reports = PruneReport(settings, self.layers, dense=self.dense).to_dict()
        return json.dumps({"fingerprint": self.fingerprint, "done": self.done, "activations": self.activations,
                           "layers": reports["layers"], "dense": reports["dense"], "profile": self.profile})

    @classmethod
    def read(cls, path: str) -> "ResumeState":
        with open(path) as f:
            data = json.load(f)
        return cls(data.get("fingerprint"), int(data["done"]), data.get("activations"),
                   [layer_from_dict(d) for d in data["layers"]], [dense_from_dict(d) for d in data.get("dense", [])],
                   data.get("profile"))


def partial_run(out: str) -> int | None:
    """The last finished block of an unfinished streamed run in ``out`` (None when there is none)."""
    try:
        with open(os.path.join(out, STATE_DIR, "state.json")) as f:
            return int(json.load(f)["done"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_activations(hidden: list[torch.Tensor], path: str) -> None:
    """Raw dump, one batch at a time on the host: a JSON header line, then each tensor's bytes."""
    header = {"shapes": [list(h.shape) for h in hidden], "dtype": str(hidden[0].dtype).replace("torch.", "")}
    with atomic_open(path) as f:
        f.write((json.dumps(header) + "\n").encode())
        for h in hidden:
            f.write(h.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())


def load_activations(path: str, device) -> list[torch.Tensor]:
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


def acts_name(i: int, comm=None, rank: int | None = None) -> str:
    """The activations entering block i + 1 (one file per rank in a distributed run)."""
    if comm is None:
        return f"acts-{i:05d}.bin"
    return f"acts-{i:05d}-rank{comm.rank if rank is None else rank:05d}.bin"


def fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(str(tuple(p.shape)).encode())
            h.update(p.contiguous().view(torch.uint8).numpy().tobytes() if p.numel() else b"")
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()
