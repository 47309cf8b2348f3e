"""Settings of a pruning run: the sparsity target and the per-layer method configuration.

Plain frozen dataclasses with validation in ``__post_init__``: no global state.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

METHODS = ("joint", "sparsegpt", "wanda", "magnitude")
MASKS = ("diag", "sparsegpt", "exact", "greedy", "wanda")
MASK_SCOPES = ("block", "row")
# The joint method's default exchanges per row of a block (PruneConfig.swaps), at every sparsity. Measured on
# SmolLM2-135M (benchmarks/results/heldout.md: 16 x 512 mixed calibration tokens, 40 windows each of WikiText-2 test /
# Pride and Prejudice / Moby Dick). 2:4, seeds 0-4: without exchanges joint tied SparseGPT (paired perplexity ratio
# 0.999 / 0.990 / 0.981 over seeds 0-2, seeds on both sides of 1); with 16 it is below 1 at every seed. 4:8, seeds
# 0-2: 16 exchanges give 0.971 / 0.978 / 0.972 of joint without them. 50%, seeds 0-2: 0.974-0.987 / 0.962-0.988 /
# 0.970-0.979 of joint without them, every seed below 1. Cost: about 2-2.5x the prune time of joint without them at
# 16 calibration samples on 2 CPU cores (50%: 224-260 s against 89-120 s; 2:4: 211-221 s against 72-75 s for
# SparseGPT under the same load); the calibration forward passes, the same for both, dominate at 128 samples.
DEFAULT_SWAPS = 16
# The joint method's default PruneConfig.shrink, the fraction of the Hessian's off-diagonal removed before the solve:
# a rule in the pruned fraction (default_shrink), DEFAULT_SHRINK = 0.5 up to 60% (2:4 and 4:8 included),
# HIGH_SPARSITY_SHRINK = 0.25 from 70%, linear between. Chosen from benchmarks/results/heldout_domains.md (SmolLM2-135M
# calibrated on one kind of text and scored on others, 3 seeds; the README's "Text unlike the calibration text" reads
# it): at 2:4, 50% and 60% 0.5 did best on text unlike the calibration text (0.25, and 0.4 at 60%, fit the calibration
# kind closer and lost on some other kinds); at 70% 0.5 left joint 6% behind SparseGPT on the calibration kind itself,
# and 0.25 was lower than 0.5 on every text (0.3 in between). The more weights a row loses, the more its update has to
# rely on the inputs' correlations.
DEFAULT_SHRINK = 0.5
HIGH_SPARSITY_SHRINK = 0.25
_SHRINK_KNOTS = ((0.6, DEFAULT_SHRINK), (0.7, HIGH_SPARSITY_SHRINK))  # (pruned fraction, shrink)


def default_shrink(sparsity: "Sparsity | float | str") -> float:
    """The joint method's shrink when none is given, from the pruned fraction (N:M: N/M): DEFAULT_SHRINK up to 60%,
    HIGH_SPARSITY_SHRINK from 70%, linear between."""
    f = Sparsity.parse(sparsity).fraction
    (f0, s0), (f1, s1) = _SHRINK_KNOTS
    if f <= f0:
        return s0
    if f >= f1:
        return s1
    return round(s0 + (f - f0) / (f1 - f0) * (s1 - s0), 6)


@dataclass(frozen=True)
class Sparsity:
    """A sparsity target: an unstructured fraction, or N:M (exactly ``n`` of every ``m`` consecutive weights of a
    row are pruned, as in SparseGPT's ``prunen:prunem``; "2:4" keeps 2 of 4)."""

    fraction: float
    n: int = 0
    m: int = 0

    def __post_init__(self):
        if self.m:
            if not (0 < self.n < self.m):
                raise ValueError(f"N:M sparsity needs 0 < N < M, got {self.n}:{self.m}")
            object.__setattr__(self, "fraction", self.n / self.m)
        elif not (isinstance(self.fraction, (int, float)) and math.isfinite(self.fraction)
                  and 0.0 <= self.fraction < 1.0):
            raise ValueError(f"sparsity must be a fraction in [0, 1) or 'N:M', got {self.fraction!r}")

    @property
    def structured(self) -> bool:
        return self.m > 0

    @classmethod
    def parse(cls, value: "Sparsity | float | str") -> "Sparsity":
        if isinstance(value, Sparsity):
            return value
        if isinstance(value, str):
            text = value.strip()
            if ":" in text:
                parts = text.split(":")
                try:
                    n, m = (int(p) for p in parts)
                except ValueError:
                    raise ValueError(f"invalid N:M sparsity {value!r}: expected two integers like '2:4'") from None
                return cls(fraction=0.0, n=n, m=m)
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"invalid sparsity {value!r}: expected a fraction like 0.5 or N:M like 2:4") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"invalid sparsity {value!r}: expected a fraction like 0.5 or N:M like 2:4")
        return cls(fraction=float(value))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.fraction:g}"


@dataclass(frozen=True)
class PruneConfig:
    """How to prune one linear layer.

    method:      joint (Zhao et al.: multi-weight OBS per block) | sparsegpt | wanda | magnitude
    sparsity:    fraction in [0, 1) or "N:M"
    block_size:  B, columns per block (joint: the size of the joint solve; sparsegpt: lazy-update and mask block)
    damp:        relative damping, H + damp * mean(diag(H)) * I
    shrink:      OBS methods (joint, SparseGPT): the fraction of H's off-diagonal removed before the damping,
                 H_s = (1 - shrink) H + shrink diag(H) (docs/ALGORITHM.md section 1). 0 is the calibration Hessian as
                 measured; 1 keeps only each input's own curvature, where the joint method's "sparsegpt" mask is
                 Wanda's score and no weight is updated. Between them the update trusts the calibration text's
                 correlations between inputs less: they move between kinds of text far more than the diagonal does
                 (benchmarks/results/heldout_domains.md). None picks the default: default_shrink(sparsity) for the
                 joint method (0.5 up to 60% pruned, 0.25 from 70%), 0 for SparseGPT (the published method, kept as
                 the baseline).
    mask:        how the joint method picks the pruned weights of a block (docs/ALGORITHM.md section 4):
                 "diag"      saliency w^2 / G_jj (the joint scheme's own diagonal),
                 "sparsegpt" saliency w^2 / U_jj^2 (SparseGPT's),
                 "exact"     N:M only: best subset of each group by the exact group loss under G;
                 "greedy"    exact OBS order: per row remove the cheapest weight, update, repeat (the count per
                             row is that of the "diag" choice; N:M: until every group holds N);
                 "wanda"     Wanda's score |w_ij| * sqrt(H_jj) (= |w_ij| * ||x_j||) on the block's current weights
                             (per row or per block by mask_scope; N:M: the N smallest of each group); the joint
                             update then reconstructs, which Wanda itself does not;
                 None picks the default: "exact" for N:M, "sparsegpt" for unstructured. Other methods: must be None.
    mask_scope:  unstructured only: "block" (the fraction of the whole rows x B block; per-row counts vary) or
                 "row" (the fraction of every row of the block). None picks the default: "row" for the joint
                 method's unstructured masks, "block" otherwise (SparseGPT's own rule). On SmolLM2-135M at 50-70% the
                 per-row mask raised the joint method's layer loss but lowered its perplexity: on the book in all
                 six runs, on WikiText-2 in five of six (benchmarks/results/accuracy.md), as Wanda's per-output
                 comparison group does.
    swaps:       joint method only: after a block's mask is chosen, at most this many exchanges of a pruned and a kept
                 weight per row of the block (N:M: inside a group), each the one that lowers the row's exact block
                 loss the most (pyprune/reference/swap.py); 0 leaves the mask as chosen. None picks the default:
                 DEFAULT_SWAPS (16) for the joint method, 0 for the others.
    backend:     kernel backend for the ops: "auto" | "torch" | "cpp" | "cuda" | "triton".
    """

    method: str = "joint"
    sparsity: Sparsity = dataclasses.field(default_factory=lambda: Sparsity(0.5))
    block_size: int = 128
    damp: float = 0.01
    mask: str | None = None
    mask_scope: str | None = None
    backend: str = "auto"
    swaps: int | None = None
    shrink: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "sparsity", Sparsity.parse(self.sparsity))
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if not (isinstance(self.damp, (int, float)) and math.isfinite(self.damp) and self.damp >= 0):
            raise ValueError(f"damp must be a finite number >= 0, got {self.damp!r}")
        if self.shrink is None:
            object.__setattr__(self, "shrink", default_shrink(self.sparsity) if self.method == "joint" else 0.0)
        if isinstance(self.shrink, bool) or not (isinstance(self.shrink, (int, float)) and 0.0 <= self.shrink <= 1.0):
            raise ValueError(f"shrink must be a fraction in [0, 1], got {self.shrink!r}")
        if self.shrink and self.method not in ("joint", "sparsegpt"):
            raise ValueError(f"shrink={self.shrink:g} changes the Hessian of the OBS methods (joint, sparsegpt) only; "
                             f"{self.method} does not use H's off-diagonal (leave shrink at 0)")
        # Options belong to the methods that read them: ``mask`` to the joint method, ``mask_scope`` to the joint
        # method and SparseGPT with an unstructured fraction. Elsewhere they stay None (reports list what was used).
        uses_mask = self.method == "joint"
        uses_scope = self.method in ("joint", "sparsegpt") and not self.sparsity.structured
        if self.mask is not None and not uses_mask:
            raise ValueError(f"mask={self.mask!r} is an option of the joint method only; {self.method} chooses its "
                             "pruned weights its own way (leave mask unset)")
        if self.mask_scope is not None and not uses_scope:
            where = ("N:M sparsity fixes the pattern per group" if self.sparsity.structured
                     else f"{self.method} has one rule")
            raise ValueError(f"mask_scope={self.mask_scope!r} applies to the joint method and SparseGPT with an "
                             f"unstructured fraction only ({where}); leave it unset")
        if uses_mask and self.mask is None:
            object.__setattr__(self, "mask", "exact" if self.sparsity.structured else "sparsegpt")
        if uses_scope and self.mask_scope is None:
            object.__setattr__(self, "mask_scope", "row" if self.method == "joint" else "block")
        if uses_mask and self.mask not in MASKS:
            raise ValueError(f"unknown mask {self.mask!r}; choose one of {', '.join(MASKS)}")
        if self.mask == "exact" and not self.sparsity.structured:
            raise ValueError("mask='exact' (best subset per group) needs an N:M sparsity")
        if uses_scope and self.mask_scope not in MASK_SCOPES:
            raise ValueError(f"unknown mask_scope {self.mask_scope!r}; choose one of {', '.join(MASK_SCOPES)}")
        if self.sparsity.structured and self.block_size % self.sparsity.m:
            raise ValueError(f"block_size={self.block_size} must be a multiple of M={self.sparsity.m} for "
                             f"{self.sparsity} sparsity")
        if self.swaps is None:
            object.__setattr__(self, "swaps", DEFAULT_SWAPS if uses_mask else 0)
        if isinstance(self.swaps, bool) or not isinstance(self.swaps, int) or self.swaps < 0:
            raise ValueError(f"swaps must be an integer >= 0, got {self.swaps!r}")
        if self.swaps and self.method != "joint":
            raise ValueError(f"swaps={self.swaps} refines the joint method's mask only; {self.method} chooses its "
                             "pruned weights its own way (leave swaps at 0)")
        if self.backend not in ("auto", "torch", "cpp", "cuda", "triton"):
            raise ValueError(f"unknown backend {self.backend!r}; choose auto, torch, cpp, cuda or triton")

    def replace(self, **changes) -> "PruneConfig":
        """A copy with ``changes``. A new method or sparsity re-derives the defaults of ``mask`` and ``mask_scope``
        (the new method may not use them), and of ``swaps``, unless they are given too."""
        if "method" in changes or "sparsity" in changes:
            changes.setdefault("mask", None)
            changes.setdefault("mask_scope", None)
            changes.setdefault("swaps", None)
            changes.setdefault("shrink", None)
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict:
        """The settings this configuration really uses (for reports): options the method ignores are left out."""
        out = {"method": self.method, "sparsity": str(self.sparsity), "block_size": self.block_size,
               "damp": self.damp, "mask": self.mask, "mask_scope": self.mask_scope, "backend": self.backend}
        if self.swaps:
            out["swaps"] = self.swaps
        if self.shrink:
            out["shrink"] = self.shrink
        if self.method in ("wanda", "magnitude"):
            del out["block_size"]  # a per-row or per-group rule: no column blocks
        return {k: v for k, v in out.items() if v is not None}
