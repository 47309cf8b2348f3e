"""Outlier-weighted layerwise sparsity (OWL; Yin et al., 2024, "Outlier Weighed Layerwise Sparsity"): a per-block
sparsity allocation, the pure math on plain tensors and numbers.

For every decoder block l the layerwise outlier distribution D_l is the fraction of the entries of Wanda's score
A = |W_ij| * ||X_j||_2 (every prunable matrix of the block, each with the norms of its own input columns over the
calibration tokens) that exceed M times the mean of A. As in the paper's reference code (``check_outlier_mean`` over
the block's scores concatenated) and llm-compressor's ``sparsity_profile="owl"``, the mean is taken over all the
block's entries together, not per matrix.

Blocks with more outliers are pruned less (``allocate``): the ratios are scaled by min-max to [0, 2 lambda],
D'_l = 2 lambda (D_l - min D) / (max D - min D), and S_l = S - D'_l + mean(D'), so the mean of the S_l is the target
S. pyprune takes the mean weighted by the blocks' prunable weights (``sizes``), so that the blocks together hold the
target fraction of zeros when they differ in size (the reference's unweighted mean is ``sizes=None``). Sparsities are
kept in [0, 1) with the weighted mean preserved. Defaults M = 5, lambda = 0.08 (the paper's; llm-compressor's
``owl_m``, ``owl_lmbda``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .ops._checks import all_finite

PROFILES = ("owl",)
OWL_M = 5.0
OWL_LAMBDA = 0.08
_CHUNK = 1 << 22  # entries of A formed at once (rows of a large matrix at a time)
_TOP = math.nextafter(1.0, 0.0)  # the largest sparsity below 1


@dataclass(frozen=True)
class SparsityProfile:
    """A per-block sparsity allocation: ``name`` "owl" with its threshold multiple ``m`` and range ``lam``."""

    name: str = "owl"
    m: float = OWL_M
    lam: float = OWL_LAMBDA

    def settings(self) -> dict:
        """What a report records (and a streamed run's resume fingerprint holds)."""
        return {"sparsity_profile": self.name, "owl_m": self.m, "owl_lambda": self.lam}


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def make_profile(profile: str | None, sparsity, m: float | None = None, lam: float | None = None
                 ) -> SparsityProfile | None:
    """Check a run's ``sparsity_profile`` (None or "owl"), ``owl_m`` and ``owl_lambda`` against its target
    ``sparsity`` (a ``pyprune.Sparsity``) and freeze them; None when no profile is asked for. Raises ``ValueError``
    naming the option at fault: an unknown profile, an N:M target (the pattern is fixed per group of M), M <= 0, a
    lambda outside [0, min(S, 1 - S)) (S +- lambda must stay in [0, 1)), owl_m / owl_lambda without the profile."""
    if profile is None:
        for name, value in (("owl_m", m), ("owl_lambda", lam)):
            if value is not None:
                raise ValueError(f"{name}={value!r} is an option of sparsity_profile='owl' (--sparsity-profile owl); "
                                 "give the profile too, or leave it unset")
        return None
    if profile not in PROFILES:
        raise ValueError(f"unknown sparsity_profile {profile!r} (--sparsity-profile); choose one of "
                         f"{', '.join(PROFILES)}")
    if sparsity.structured:
        raise ValueError(f"sparsity_profile={profile!r} (--sparsity-profile) gives each block its own unstructured "
                         f"fraction; {sparsity} sparsity fixes the pattern of every group of M weights, so it cannot "
                         "vary by block (give a fraction such as --sparsity 0.7, or leave the profile unset)")
    m = OWL_M if m is None else _number("owl_m", m)
    lam = OWL_LAMBDA if lam is None else _number("owl_lambda", lam)
    if not m > 0:
        raise ValueError(f"owl_m (--owl-m) must be > 0: an outlier is a score above owl_m times the block's mean "
                         f"score; got {m!r}")
    target = sparsity.fraction
    if lam < 0 or lam > target or lam >= 1 - target:
        raise ValueError(f"owl_lambda (--owl-lambda) {lam!r} is out of range for sparsity {target:g}: the blocks' "
                         f"sparsities spread around the target by about lambda, and {target:g} - lambda .. "
                         f"{target:g} + lambda must stay in [0, 1) (lambda >= 0, <= {target:g} and "
                         f"< {1 - target:g})")
    return SparsityProfile(profile, m, lam)


def _as_list(x) -> list:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def outlier_ratio(weights, col_norms, m: float = OWL_M) -> float:
    """The fraction of the entries of A = |W_ij| * col_norms_j, over all ``weights`` together (each an (out, in)
    matrix with its own ``col_norms``, the in-vector of its input columns' L2 norms ||X_j||_2), that exceed ``m``
    times the mean of A over all of them. One matrix, or sequences of matrices and norms of equal length. Computed in
    at least float32, with float64 sums, a few million entries at a time. 0 when A is all zero."""
    ws, ns = _as_list(weights), _as_list(col_norms)
    m = _number("m", m)
    if not m > 0:
        raise ValueError(f"m must be > 0, got {m!r}")
    if not ws:
        raise ValueError("outlier_ratio needs at least one weight matrix")
    if len(ws) != len(ns):
        raise ValueError(f"{len(ws)} weight matrices but {len(ns)} column-norm vectors")
    pairs = []
    for k, (w, n) in enumerate(zip(ws, ns)):
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"weights[{k}] must be a 2-D tensor (out, in), got "
                             f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
        if not isinstance(n, torch.Tensor) or n.dim() != 1 or n.numel() != w.shape[1]:
            raise ValueError(f"col_norms[{k}] must be a 1-D tensor of {w.shape[1]} input-column norms, got "
                             f"{tuple(n.shape) if isinstance(n, torch.Tensor) else type(n).__name__}")
        dtype = torch.promote_types(torch.promote_types(w.dtype, n.dtype), torch.float32)
        n = n.to(device=w.device, dtype=dtype)
        if not all_finite(n) or bool((n < 0).any()):
            raise ValueError(f"col_norms[{k}] must be finite and >= 0")
        if not all_finite(w):
            raise ValueError(f"weights[{k}] holds NaN or Inf values")
        pairs.append((w, n, dtype))

    def chunks():
        for w, n, dtype in pairs:
            rows = max(1, _CHUNK // max(1, w.shape[1]))
            for r in range(0, w.shape[0], rows):
                yield w[r:r + rows].to(dtype).abs() * n

    total = sum(w.numel() for w, _, _ in pairs)
    if total == 0:
        raise ValueError("outlier_ratio: the weight matrices are empty")
    mean = sum(float(a.sum(dtype=torch.float64)) for a in chunks()) / total
    if mean == 0:
        return 0.0
    threshold = m * mean
    return sum(int((a > threshold).sum()) for a in chunks()) / total


def allocate(ratios: Sequence[float], target: float, lam: float = OWL_LAMBDA,
             sizes: Sequence[float] | None = None) -> list[float]:
    """Per-block sparsities from per-block outlier ratios (OWL): S_l = target - D'_l + mean_w(D'), D' the ratios
    min-max scaled to [0, 2 lam], mean_w the mean weighted by ``sizes`` (the blocks' prunable weights; None: equal
    weights, the reference's). The weighted mean of the result is ``target``; more outliers, lower sparsity (equal
    ratios, equal sparsities). All equal ratios or ``lam`` = 0: every block gets ``target``. Values falling outside
    [0, 1) are clamped and the difference spread over the other blocks (one shift for all of them, repeated until
    none is out), which keeps the weighted mean and the order."""
    target = _number("target", target)
    if not 0 <= target < 1:
        raise ValueError(f"target sparsity must be in [0, 1), got {target!r}")
    lam = _number("lam", lam)
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    ratios = [_number("ratios[]", r) for r in ratios]
    if not ratios:
        raise ValueError("allocate needs the outlier ratio of at least one block")
    if any(r < 0 for r in ratios):
        raise ValueError(f"outlier ratios must be >= 0, got {ratios}")
    if sizes is None:
        sizes = [1.0] * len(ratios)
    sizes = [_number("sizes[]", s) for s in sizes]
    if len(sizes) != len(ratios):
        raise ValueError(f"{len(ratios)} ratios but {len(sizes)} sizes")
    if any(not s > 0 for s in sizes):
        raise ValueError(f"sizes must be > 0 (prunable weights per block), got {sizes}")
    d = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    spread = float(d.max() - d.min())
    if lam == 0 or spread == 0:
        return [target] * len(ratios)
    scaled = (d - d.min()) / spread * (2 * lam)
    s = target - scaled + float((w * scaled).sum() / w.sum())
    return [float(x) for x in _clamp_keep_mean(s, w, target)]


def _clamp_keep_mean(s: torch.Tensor, w: torch.Tensor, target: float) -> torch.Tensor:
    """``s`` clamped to [0, 1) with its ``w``-weighted mean held at ``target``: what the clamp removes is added back
    as one shift of the blocks not at the bound in that direction, until nothing is clamped (each round pins at least
    one more block, so at most len(s) + 1 rounds)."""
    total = float(w.sum())
    for _ in range(len(s) + 1):
        s = s.clamp(0.0, _TOP)
        gap = target * total - float((w * s).sum())
        if abs(gap) <= 1e-12 * total:
            break
        free = s < _TOP if gap > 0 else s > 0
        s = torch.where(free, s + gap / float(w[free].sum()), s)
    return s
