"""What a pruning run reports: per-linear loss and sparsity, times, peak memory. Plain data plus formatting; the
memory probes read the OS and torch, they keep no state of their own."""
from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import tempfile
from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    name: str            # full module name in the model, e.g. model.layers.0.self_attn.q_proj
    block: int
    shape: tuple[int, int]  # (out_features, in_features)
    loss: float          # the layer loss prune_layer reports (NaN for magnitude without a Hessian)
    sparsity: float      # fraction of the weight that is pruned (the mask)
    seconds: float
    method: str = ""
    samples: int = 0     # calibration tokens behind the Hessian
    fallback: str | None = None  # why another method than the run's was used (an expert with too few tokens)
    damp: float | None = None    # the relative damping actually used (larger than asked after a Cholesky retry)
    exchanges: int = 0           # the joint method's mask exchanges (PruneConfig.swaps) made in this matrix
    exchange_seconds: float = 0.0  # seconds in the op that makes them and solves the final set (within the time
    #                                of the matrix's group, which `seconds` shares out evenly over the group)

    @property
    def numel(self) -> int:
        return int(self.shape[0]) * int(self.shape[1])


@dataclass
class DenseMatrix:
    """A weight matrix a run keeps dense, and why: a router or gate (found by its use), a parameter shared with an
    earlier block (pruned there; not counted again), not selected (``modules``), or outside the blocks."""
    name: str
    block: int | None         # None: outside the blocks
    shape: tuple[int, ...]
    sparsity: float | None    # fraction of zeros it holds (None: not read, outside the blocks)
    reason: str
    counted: bool = True      # part of the blocks' achieved sparsity (False: shared, counted where pruned)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n


def layer_from_dict(d: dict) -> LayerReport:
    return LayerReport(**{**d, "shape": tuple(d["shape"]), "loss": float("nan") if d["loss"] is None else d["loss"]})


def dense_from_dict(d: dict) -> DenseMatrix:
    return DenseMatrix(**{**d, "shape": tuple(d["shape"])})


@dataclass
class PruneReport:
    settings: dict
    layers: list[LayerReport] = field(default_factory=list)
    times: dict = field(default_factory=dict)       # seconds: capture, prune (blocks), total
    peak_device_memory: int | None = None           # bytes (CUDA max allocated), None on CPU
    peak_host_rss: int | None = None                # bytes
    blocks: int = 0                                 # blocks processed (pruned or passed through)
    dense: list[DenseMatrix] = field(default_factory=list)    # the pruned blocks' matrices kept dense, with why
    outside: list[DenseMatrix] = field(default_factory=list)  # the weight matrices outside the blocks (dense)
    # a sparsity profile's allocation (pyprune.models.driver.outlier_pass): {"name", "m", "lambda", "target",
    # "blocks": [{"block", "outlier_ratio", "weights", "sparsity"}, ...]}; None: every block at the run's sparsity
    profile: dict | None = None

    def block_targets(self) -> dict[int, float]:
        """Block index -> the target fraction the profile gave it (empty without a profile)."""
        return {int(r["block"]): float(r["sparsity"]) for r in (self.profile or {}).get("blocks", [])}

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over every weight matrix of the pruned blocks, pruned or kept dense (weighted by size):
        the zeros the saved blocks hold. A parameter shared between blocks counts once."""
        kept = [d for d in self.dense if d.counted and d.sparsity is not None]
        total = sum(layer.numel for layer in self.layers) + sum(d.numel for d in kept)
        zeros = sum(layer.sparsity * layer.numel for layer in self.layers) + sum(d.sparsity * d.numel for d in kept)
        return zeros / total if total else 0.0

    @property
    def pruned_sparsity(self) -> float:
        """Achieved sparsity over the pruned matrices alone."""
        total = sum(layer.numel for layer in self.layers)
        return sum(layer.sparsity * layer.numel for layer in self.layers) / total if total else 0.0

    @property
    def total_loss(self) -> float:
        return float(sum(layer.loss for layer in self.layers))

    def to_dict(self) -> dict:
        return {"settings": self.settings, "sparsity": self.sparsity, "pruned_sparsity": self.pruned_sparsity,
                "total_loss": _finite(self.total_loss), "times": self.times,
                "peak_device_memory": self.peak_device_memory, "peak_host_rss": self.peak_host_rss,
                "blocks": self.blocks,
                "layers": [{**asdict(layer), "shape": list(layer.shape), "loss": _finite(layer.loss)}
                           for layer in self.layers],
                "dense": [{**asdict(d), "shape": list(d.shape)} for d in self.dense],
                "outside": [{**asdict(d), "shape": list(d.shape)} for d in self.outside],
                **({"profile": self.profile} if self.profile is not None else {})}

    @classmethod
    def from_dict(cls, data: dict) -> "PruneReport":
        return cls(settings=data["settings"], layers=[layer_from_dict(d) for d in data["layers"]],
                   times=data.get("times", {}), peak_device_memory=data.get("peak_device_memory"),
                   peak_host_rss=data.get("peak_host_rss"), blocks=data.get("blocks", 0),
                   dense=[dense_from_dict(d) for d in data.get("dense", [])],
                   outside=[dense_from_dict(d) for d in data.get("outside", [])], profile=data.get("profile"))

    def save(self, path: str) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    def table(self, per: str = "block") -> str:
        """A plain-text summary: one row per pruned module (``per="layer"``) or per block (``"block"``, the default)
        or none (``"none"``), then the totals."""
        if per not in ("layer", "block", "none"):
            raise ValueError(f"per must be 'layer', 'block' or 'none', got {per!r}")
        lines = []
        if per == "layer" and self.layers:
            width = max(len(x.name) for x in [*self.layers, *self.dense])
            lines.append(f"{'module':<{width}}  {'shape':>12}  {'sparsity':>8}  {'loss':>11}  {'tokens':>9}  "
                         f"{'time s':>7}  note")
            for layer in self.layers:
                shape = f"{layer.shape[0]}x{layer.shape[1]}"
                note = "; ".join(n for n in (layer.fallback, None if layer.damp is None or layer.damp ==
                                             self.settings.get("damp") else f"damp {layer.damp:g}") if n)
                loss = f"{layer.loss:11.4g}" if math.isfinite(layer.loss) else f"{'-':>11}"
                lines.append(f"{layer.name:<{width}}  {shape:>12}  {layer.sparsity:8.4f}  {loss}  "
                             f"{layer.samples:9d}  {layer.seconds:7.2f}  {note}".rstrip())
            for d in self.dense:
                shape = "x".join(map(str, d.shape))
                sp = f"{d.sparsity:8.4f}" if d.sparsity is not None else f"{'-':>8}"
                lines.append(f"{d.name:<{width}}  {shape:>12}  {sp}  {'-':>11}  {'-':>9}  {'-':>7}  kept dense: "
                             f"{d.reason}")
            lines.append("")
        elif per == "block" and self.layers:
            targets = self.block_targets()
            lines.append(f"{'block':>5}  {'pruned':>6}  {'kept':>4}  {'weights':>10}  "
                         + (f"{'target':>8}  " if targets else "")
                         + f"{'sparsity':>8}  {'loss':>11}  {'worst module':<28}  {'time s':>7}  note")
            for b in sorted({layer.block for layer in self.layers}):
                rows = [layer for layer in self.layers if layer.block == b]
                kept = [d for d in self.dense if d.block == b and d.counted and d.sparsity is not None]
                numel = sum(r.numel for r in rows) + sum(d.numel for d in kept)
                zeros = sum(r.sparsity * r.numel for r in rows) + sum(d.sparsity * d.numel for d in kept)
                with_loss = [r for r in rows if math.isfinite(r.loss)]
                loss = f"{sum(r.loss for r in with_loss):11.4g}" if with_loss else f"{'-':>11}"
                worst = max(with_loss, key=lambda r: r.loss).name if with_loss else "-"
                short = worst.rsplit(".", 2)
                short = ".".join(short[-2:]) if len(short) > 2 else worst
                target = ((f"{targets[b]:8.4f}  " if b in targets else f"{'-':>8}  ") if targets else "")
                lines.append(f"{b:5d}  {len(rows):6d}  {len([d for d in self.dense if d.block == b]):4d}  "
                             f"{numel:10d}  {target}{zeros / numel if numel else 0.0:8.4f}  {loss}  {short:<28}  "
                             f"{sum(r.seconds for r in rows):7.2f}  {_no_loss_note(rows)}".rstrip())
            lines.append("")
        s = self.settings
        lines.append(f"method {s.get('method')}  sparsity {s.get('sparsity')}  block size {s.get('block_size')}  "
                     + (f"shrink {s['shrink']:g}  " if s.get("shrink") else "")
                     + (f"exchanges up to {s['swaps']}  " if s.get("swaps") else "")
                     + f"modules pruned {len(self.layers)}  blocks {self.blocks}")
        if self.profile is not None:
            lines.append(_profile_line(self.profile))
        counted = [d for d in self.dense if d.counted]
        shared = len(self.dense) - len(counted)
        lines.append(f"achieved sparsity {self.sparsity:.4f} over every weight matrix of the pruned blocks "
                     f"({self.pruned_sparsity:.4f} over the {len(self.layers)} pruned; {len(counted)} kept dense"
                     + (f"; {shared} shared with an earlier block, counted there" if shared else "") + ")")
        with_loss = [r for r in self.layers if math.isfinite(r.loss)]
        if with_loss:
            lines.append(f"total loss {sum(r.loss for r in with_loss):.6g}"
                         + (f" ({_no_loss_note(self.layers)})" if len(with_loss) < len(self.layers) else ""))
        else:
            lines.append(f"total loss: none ({_no_loss_note(self.layers)})")
        if self.dense:
            lines.append("kept dense: " + _dense_summary(self.dense))
        if self.outside:
            lines.append(f"outside the blocks (dense): {len(self.outside)} matrices, "
                         f"{sum(d.numel for d in self.outside):,} weights")
        fallbacks = [r for r in self.layers if r.fallback]
        damped = [r for r in self.layers if r.damp is not None and r.damp != s.get("damp")]
        if fallbacks or damped:
            lines.append(f"fallbacks {len(fallbacks)} (e.g. {fallbacks[0].name}: {fallbacks[0].fallback})"
                         if fallbacks else "fallbacks 0")
            if damped:
                lines[-1] += (f"  damping raised for {len(damped)} matrices (max {max(r.damp for r in damped):g}; "
                              "the Cholesky of the damped Hessian failed at the asked damping)")
        lines.append("time s: " + "  ".join(f"{k} {v:.1f}" for k, v in self.times.items()))
        if any(r.exchanges or r.exchange_seconds for r in self.layers):
            made = sum(r.exchanges for r in self.layers)
            rows = sum(r.shape[0] * -(-r.shape[1] // max(1, int(s.get("block_size") or 1))) for r in self.layers
                       if r.exchange_seconds)
            lines.append(f"exchanges {made:,} made ({made / max(rows, 1):.2f} per row of a block, at most "
                         f"{s.get('swaps')}) in {sum(r.exchange_seconds for r in self.layers):.1f} s of the prune "
                         "(with the solve of their final set; --swaps 0 skips them)")
        lines.append(f"peak host RSS {format_bytes(self.peak_host_rss)}  peak device memory "
                     f"{format_bytes(self.peak_device_memory)}")
        return "\n".join(lines)


def _profile_line(profile: dict) -> str:
    """'sparsity profile owl (M 5, lambda 0.08): block targets 0.6200-0.7800, mean 0.7000 weighted by the blocks'
    prunable weights; outlier ratios 0.81%-2.10%'."""
    rows = profile.get("blocks", [])
    if not rows:
        return f"sparsity profile {profile.get('name')}: no block"
    sp = [float(r["sparsity"]) for r in rows]
    ratios = [float(r["outlier_ratio"]) for r in rows]
    weights = [float(r["weights"]) for r in rows]
    mean = sum(a * w for a, w in zip(sp, weights)) / sum(weights)
    return (f"sparsity profile {profile.get('name')} (M {profile.get('m'):g}, lambda {profile.get('lambda'):g}): "
            f"block targets {min(sp):.4f}-{max(sp):.4f}, mean {mean:.4f} weighted by the blocks' prunable weights; "
            f"outlier ratios {100 * min(ratios):.2f}%-{100 * max(ratios):.2f}% (more outliers, lower sparsity)")


def _no_loss_note(rows: list[LayerReport]) -> str:
    """Why some matrices have no loss: pruned by magnitude without a Hessian (the magnitude method without
    calibration, or an expert no calibration token reached)."""
    missing = [r for r in rows if not math.isfinite(r.loss)]
    if not missing:
        return ""
    why = sorted({r.fallback or (f"{r.method} without a Hessian" if r.method else "no Hessian") for r in missing})
    return (f"{len(missing)} of {len(rows)} without a loss: " + "; ".join(why[:2])
            + (f" and {len(why) - 2} more" if len(why) > 2 else ""))


def _dense_summary(dense: list[DenseMatrix]) -> str:
    """'4 router: its output chooses experts (topk) (mlp.gate), ...': the kept matrices by reason."""
    by: dict[str, list[DenseMatrix]] = {}
    for d in dense:
        by.setdefault(d.reason.split(" (")[0] if d.reason.startswith("shared with") else d.reason, []).append(d)
    parts = []
    for reason, items in by.items():
        names = sorted({d.name.split(".", 3)[-1] if d.block is not None else d.name for d in items})
        parts.append(f"{len(items)} {reason} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    return "; ".join(parts)


def _finite(x: float):
    return x if math.isfinite(x) else None


def format_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def _status_field(name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def host_rss() -> int | None:
    """Current resident set size of this process in bytes (Linux), else None."""
    return _status_field("VmRSS")


def host_peak_rss() -> int:
    """Peak resident set size in bytes: VmHWM (resettable, see ``reset_host_peak_rss``), else ru_maxrss."""
    hwm = _status_field("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_host_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); returns False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def device_peak_memory(device) -> int | None:
    import torch
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    return None


def reset_device_peak_memory(device) -> None:
    import torch
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


TEMP_PREFIX = ".pyprune-tmp-"  # + pid: a later run removes the temporaries of a dead process (models/outdir.py)


@contextlib.contextmanager
def atomic_open(path: str):
    """A binary file that appears at ``path`` only when the block ends without error: written under a temporary name
    in the same directory (``.pyprune-tmp-<pid>-*``), fsynced, given the umask's permissions, renamed into place;
    readers see the old content or the new one, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write a text file atomically (see ``atomic_open``)."""
    with atomic_open(path) as f:
        f.write(text.encode())
